"""FSDP's cost on the GPT of examples/train_gpt.py: FLOPs, temp memory, collectives, step time.

Run:  python benchmarks/step_time.py             (about 4 minutes on 2 CPU cores)
      python benchmarks/step_time.py --pairs 4   (fewer timed steps)

The model is the GPT of `examples/train_gpt.py` (d = 256, 8 blocks, 8 heads,
vocab 512, sequence 128, batch 32) with an Adam train step on an 8-device
`('fsdp',)` mesh with Auto axes. Setups, all in one run:

  naive       params sharded like FSDP, no hooks: GSPMD decides the gathers
  dp          params replicated (plain data parallelism)
  fsdp        FSDP("fsdp"): one unit per block, re-gathered in backward
  fsdp-p1     FSDP(prefetch=1)
  keep        FSDP(reshard_after_forward=False)
  leaf        FSDP(units="leaf"): each module gathers its own params
  fsdp+remat  FSDP plus Remat() on every block
  dp+remat    DP plus Remat() on every block

Columns: FLOPs of the gradient alone (no optimizer: Adam on shards would
flatter FSDP) over DP's, from `cost_analysis()`; temp memory of the train
step (`memory_analysis()`, MiB per device); collectives in the compiled step;
step time over naive's: steps of all setups interleaved, the median of
`--pairs` ratios. Step times are XLA:CPU's: on a GPU or TPU the collectives
are real links and their launch latency counts more (see docs/fsdp_zero.md).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

from train_gpt import GPT  # noqa: E402

import nnx_parallel as npx  # noqa: E402
from nnx_parallel.views.collectives import collectives  # noqa: E402

SETUPS = ("naive", "dp", "fsdp", "fsdp-p1", "keep", "leaf", "fsdp+remat", "dp+remat")
MIN_SIZE = 512


def plan_for(setup: str):
    fsdp = {
        "naive": {},
        "fsdp": {},
        "fsdp-p1": {"prefetch": 1},
        "keep": {"reshard_after_forward": False},
        "leaf": {"units": "leaf"},
        "fsdp+remat": {},
    }
    if setup.startswith("dp"):
        plan = {"": npx.Replicated()}
    else:
        plan = {"": npx.FSDP("fsdp", min_size=MIN_SIZE, **fsdp[setup])}
    if setup.endswith("+remat"):
        plan["blocks.*"] = npx.Remat()
    return plan


def build(setup: str, cfg: dict, mesh):
    model = GPT(cfg["vocab"], cfg["d"], cfg["heads"], cfg["layers"], cfg["seq"], rngs=nnx.Rngs(0))
    if setup == "naive":  # annotate like FSDP, no hooks: GSPMD propagates
        res = npx.resolve(model, mesh, npx.FSDP("fsdp", min_size=MIN_SIZE))
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            spec = res.params[".".join(map(str, path))].spec
            var.set_value(jax.device_put(var.get_value(), NamedSharding(mesh, spec)))
            var.set_metadata(out_sharding=tuple(spec), mesh=mesh)
    else:
        npx.parallelize(model, mesh, plan_for(setup))
    return model


def loss_fn(model, tokens):
    logits = model(tokens[:, :-1]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@nnx.jit
def grad_step(model, tokens):
    return nnx.value_and_grad(loss_fn)(model, tokens)


@nnx.jit
def train_step(model, opt, tokens):
    loss, grads = nnx.value_and_grad(loss_fn)(model, tokens)
    opt.update(model, grads)
    return loss


def measure(setup: str, cfg: dict, mesh, tokens) -> dict:
    """Compiled figures of one setup, and a function that runs one step."""
    model = build(setup, cfg, mesh)
    with jax.set_mesh(mesh):
        opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
        grads = grad_step.lower(model, tokens).compile()
        step = train_step.lower(model, opt, tokens).compile()
    cost = grads.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ops = collectives(step, mesh)

    def run():
        with jax.set_mesh(mesh):
            jax.block_until_ready(train_step(model, opt, tokens))

    run()  # warm up
    return {
        "flops": cost["flops"],
        "temp": step.memory_analysis().temp_size_in_bytes,
        "collectives": len(ops),
        "run": run,
    }


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10, help="interleaved timed rounds")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--setups", default=",".join(SETUPS), help="comma-separated subset")
    args = parser.parse_args(argv)
    cfg = {"vocab": 512, "d": args.d, "heads": 8, "layers": args.layers, "seq": 128, "batch": 32}
    setups = args.setups.split(",")
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    tokens = jax.random.randint(jax.random.key(0), (cfg["batch"], cfg["seq"] + 1), 0, 512)
    tokens = jax.device_put(tokens, NamedSharding(mesh, P("fsdp")))
    rows = {s: measure(s, cfg, mesh, tokens) for s in setups}
    times: dict[str, list[float]] = {s: [] for s in setups}
    for _ in range(args.pairs):  # interleaved: every round times each setup once
        for s in setups:
            times[s].append(timed(rows[s]["run"]))
    base = "naive" if "naive" in setups else setups[0]
    dp_flops = rows["dp"]["flops"] if "dp" in rows else rows[setups[0]]["flops"]
    print(
        f"GPT d={cfg['d']}, {cfg['layers']} blocks, 8 heads, vocab 512, seq {cfg['seq']}, "
        f"batch {cfg['batch']}; Adam; 8 devices ({jax.devices()[0].platform}), Auto axes; "
        f"{args.pairs} interleaved rounds\n"
    )
    print(f"| setup | grad FLOPs / DP | temp MiB | collectives | step time / {base} |")
    print("|---|---|---|---|---|")
    for s in setups:
        ratio = statistics.median(t / b for t, b in zip(times[s], times[base]))
        r = rows[s]
        print(
            f"| {s} | {r['flops'] / dp_flops:.3f} | {r['temp'] / 2**20:.1f} | "
            f"{r['collectives']} | {ratio:.3f} |"
        )


if __name__ == "__main__":
    main()
