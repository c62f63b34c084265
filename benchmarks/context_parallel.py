"""Context parallelism: temp memory and step time vs sequence length, per device.

Run:  python benchmarks/context_parallel.py [--lengths 256 512 1024 2048]
One attention layer (4 heads of 8, 2 K/V heads: GQA, causal
`jax.nn.dot_product_attention`) plus embedding and head, batch 1, forward +
backward. For each sequence length S it compiles the step with the
sequence whole (one device) and with `ContextParallel` over a 'context'
axis of cp = 4 and 8 devices, all_gather and ring, and prints each one's
compiled temp memory per device and median step time as ratios to the
whole-sequence run of the same length, measured in the same run.

Step times on simulated CPU devices are not device speed: the cp devices
share this machine's cores, so a cp run does the same total work on the
same cores plus the collectives. Only memory is meaningful here.
"""

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
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import nnx_parallel as npx  # noqa: E402
from tests.context_models import DPALM, VOCAB  # noqa: E402

SETUPS = (
    ("whole", 1, None),
    *((s, cp, s) for cp in (4, 8) for s in ("all_gather", "ring", "ring+lb")),
)


def step_fn(graphdef):
    def step(state, tokens):
        def loss(state):
            return jnp.mean(nnx.merge(graphdef, state)(tokens) ** 2)

        return jax.value_and_grad(loss)(state)

    return step


def measure(seq: int, cp: int, strategy: str | None, steps: int = 3) -> tuple[int, float]:
    """(temp bytes per device, median step seconds) of one setup."""
    mesh = jax.make_mesh((cp,), ("context",), devices=jax.devices()[:cp])
    model = DPALM(2, (None,), rngs=nnx.Rngs(0))
    if strategy is not None:
        balanced = strategy == "ring+lb"  # ring with the head-tail load balancer
        style = npx.ContextParallel(
            "context", strategy="ring" if balanced else strategy, load_balance=balanced
        )
        npx.parallelize(model, mesh, {"layers.*": style})
    graphdef, state = nnx.split(model)
    tokens = jax.random.randint(jax.random.key(0), (1, seq), 0, VOCAB)
    tokens = jax.device_put(tokens, NamedSharding(mesh, P(None, "context" if strategy else None)))
    with jax.set_mesh(mesh):
        compiled = jax.jit(step_fn(graphdef)).lower(state, tokens).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        jax.block_until_ready(compiled(state, tokens))
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            jax.block_until_ready(compiled(state, tokens))
            times.append(time.perf_counter() - start)
    return temp, statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    args = parser.parse_args(argv)
    print("temp memory per device / whole-sequence run (step time ratio in brackets)")
    names = [f"{s}@{cp}" for s, cp, _ in SETUPS[1:]]
    print(f"{'S':>6} {'whole temp':>12} " + " ".join(f"{n:>18}" for n in names))
    for seq in args.lengths:
        results = [measure(seq, cp, strategy) for _, cp, strategy in SETUPS]
        (base_temp, base_time), rest = results[0], results[1:]
        cells = [f"{t / base_temp:7.3f} ({s / base_time:5.2f}x)" for t, s in rest]
        print(f"{seq:>6} {base_temp:>12} " + " ".join(f"{c:>18}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
