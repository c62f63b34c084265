"""One process of the multi-process test (tests/test_multiprocess.py).

    python tests/mp_worker.py --coordinator 127.0.0.1:PORT --num-processes 2 \
        --process-id I --local-devices 4 --out result_I.json [--ckpt DIR]

Trains the tiny GPT of tests/models.py for a few Adam steps under FSDP and
under tensor parallelism, each on a 2x4 mesh, feeding only this process's
rows of a fixed global batch, and writes the losses and per-parameter
checksums (sums computed on the devices, never a host gather) as JSON.
`run_all` is the same code in one process: the test's reference.
"""

import os
import sys

# Runnable as a script: the repo root (for `tests.models`) on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import faulthandler  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import nnx_parallel as npx  # noqa: E402

STEPS = 3
T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress on stderr (the test shows it if a worker fails or hangs)."""
    print(
        f"[process {jax.process_index()} {time.perf_counter() - T0:6.1f}s] {msg}",
        file=sys.stderr,
        flush=True,
    )


BATCH, SEQ, VOCAB, LAYERS = 8, 8, 64, 1


def setups():
    """mode -> (mesh, plan, batch spec): FSDP over all 8 devices of a 2x4 mesh; TP x data."""
    from tests.helpers import tp_plans

    return {
        "fsdp": (
            npx.make_mesh(fsdp=2, model=4, explicit=False),
            npx.FSDP(("fsdp", "model"), min_size=64),
            jax.P(("fsdp", "model")),
        ),
        "tp": (npx.make_mesh(data=2, model=4, explicit=False), tp_plans()["gpt"], None),
    }


def global_batch() -> np.ndarray:
    """The same tokens on every process; each feeds only its own rows."""
    return np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ + 1), dtype=np.int32)


def loss_fn(model, tokens):
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@nnx.jit
def train_step(model, optimizer, tokens):
    loss, grads = nnx.value_and_grad(loss_fn)(model, tokens)
    optimizer.update(model, grads)
    return loss


@jax.jit
def _sums(x):
    return jnp.stack([jnp.sum(x), jnp.sum(jnp.abs(x))])


def checksums(model) -> dict:
    """path -> [sum, abs-sum] of each param, reduced on the devices."""
    state = nnx.to_flat_state(nnx.state(model, nnx.Param))
    sums = {".".join(map(str, p)): _sums(v.get_value()) for p, v in state}
    return npx.reduce_metrics(jax.tree.map(lambda s: [s[0], s[1]], sums), op="sum")


def train(mesh, plan, spec, ckpt: str | None = None) -> dict:
    from tests.models import GPT

    model = npx.parallelize(
        GPT(vocab=VOCAB, layers=LAYERS, max_len=SEQ, rngs=nnx.Rngs(0)), mesh, plan
    )
    kernel = model.blocks[0].mlp.up.kernel.get_value()
    batch = global_batch()
    rows = npx.local_batch_slice(BATCH, mesh, spec)
    tokens = npx.shard_batch(batch[rows], mesh, spec)
    with jax.set_mesh(mesh):
        optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
        losses = [npx.reduce_metrics(train_step(model, optimizer, tokens)) for _ in range(STEPS)]
    out = {
        "losses": losses,
        "checksums": checksums(model),
        "summary": npx.summary(model),  # shapes and shardings only: works on any process
        "kernel_spec": str(kernel.sharding.spec),
        "kernel_fully_addressable": kernel.is_fully_addressable,
        "kernel_local_shards": len(kernel.addressable_shards),
        "batch_local_rows": [rows.start, rows.stop],
        "batch_fully_addressable": tokens.is_fully_addressable,
    }
    if ckpt:
        out["restored"] = save_and_restore(ckpt, model, optimizer)
        out["export"] = export(model)
    return out


def export(model) -> dict:
    """gather (a collective across processes) and render, on every process."""
    host = npx.gather(nnx.state(model, nnx.Param))
    abs_sums = {
        ".".join(map(str, p)): float(np.abs(v.get_value()).sum())
        for p, v in nnx.to_flat_state(host)
    }
    html = npx.render(model.blocks[0].mlp, compressed=False)  # arrays span processes: layouts only
    return {"abs_sums": abs_sums, "render_shows_layouts": "B/device" in html}


def save_and_restore(path: str, model, optimizer) -> dict:
    """Saves (orbax, every process writes its shards), restores onto the FSDP setup."""
    from tests.models import GPT

    log("saving")
    npx.save(path, model, optimizer)
    log("restoring")
    mesh, plan, _ = setups()["fsdp"]
    adam = lambda m: nnx.Optimizer(m, optax.adam(1e-2), wrt=nnx.Param)  # noqa: E731
    back, opt = npx.restore(
        path,
        lambda: GPT(vocab=VOCAB, layers=LAYERS, max_len=SEQ, rngs=nnx.Rngs(1)),
        mesh,
        plan,
        adam,
    )
    mu = opt.opt_state[0].mu["blocks"][0]["mlp"]["up"]["kernel"].get_value()
    log("comparing")
    # Compared on the devices (the layouts differ; jit reshards): no host gather.
    equal = {}
    for name, a, b in [("model", model, back), ("optimizer", optimizer, opt)]:
        restored = dict(nnx.to_flat_state(nnx.state(b)))
        for p, v in nnx.to_flat_state(nnx.state(a)):
            same = _equal(v.get_value(), restored[p].get_value())
            equal[".".join(map(str, (name, *p)))] = same.block_until_ready()
    return {
        "all_equal": min(npx.reduce_metrics(equal).values()) == 1.0,
        "mu_spec": str(mu.sharding.spec),
    }


@jax.jit
def _equal(a, b):
    return jnp.array_equal(a, b).astype(jnp.float32)


def run_all(ckpt: str | None = None) -> dict:
    out = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": len(jax.local_devices()),
        "devices": jax.device_count(),
        # Process-local values: reduced across processes, the same on each.
        "local_metrics": [
            npx.reduce_metrics({"index": jax.process_index()}),
            npx.reduce_metrics([float(jax.process_index() + 1)], op="sum"),
        ],
    }
    for mode, (mesh, plan, spec) in setups().items():
        log(f"training {mode}")
        out[mode] = train(mesh, plan, spec, ckpt if mode == "tp" else None)
    return out


def main(argv=None):
    parser = npx.add_distributed_flags(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--ckpt", default=None, help="also save the TP run here and restore it as FSDP"
    )
    parser.add_argument(
        "--timeout", type=float, default=200, help="dump stacks and exit after this long"
    )
    args = parser.parse_args(argv)
    faulthandler.dump_traceback_later(
        args.timeout, exit=True
    )  # a hung collective must not outlive the test
    npx.initialize_from_args(args)
    result = run_all(args.ckpt)
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
