"""Memory and communication of DP, ZeRO-1, ZeRO-2 and FSDP on 8 simulated devices.

Run:  python benchmarks/fsdp_zero.py
Prints ratios against baselines measured in the same run (naive GSPMD
annotation of the same model, and the ZeRO paper's formulas in f32).
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import nnx_parallel as npx  # noqa: E402
from nnx_parallel.views.collectives import bytes_by_kind, collectives  # noqa: E402

N = 8
WIDTH, DEPTH, BATCH = 512, 4, 64


class Stack(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(WIDTH, WIDTH, rngs=rngs) for _ in range(DEPTH)])

    def __call__(self, x):
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return x


def loss_fn(model, x):
    return jnp.mean(model(x) ** 2)


def build(kind, mesh, make=None):
    model = (make or (lambda: Stack(nnx.Rngs(0))))()
    if kind == "fsdp":
        npx.parallelize(model, mesh, npx.FSDP("data", min_size=1))
    elif kind == "naive":  # annotate like FSDP, no hooks: GSPMD propagates
        res = npx.resolve(model, mesh, npx.FSDP("data", min_size=1))
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            spec = res.params[".".join(map(str, path))].spec
            var.set_value(jax.device_put(var.get_value(), NamedSharding(mesh, spec)))
            var.set_metadata(out_sharding=tuple(spec), mesh=mesh)
    elif kind in ("zero1", "zero2"):
        npx.parallelize(model, mesh, npx.ZeRO(stage=int(kind[-1]), axis="data", min_size=1))
    else:
        npx.parallelize(model, mesh, npx.Replicated())
    return model


def measure(kind, mesh, x, make=None, loss=None):
    loss_fn_ = loss or loss_fn
    model = build(kind, mesh, make)
    with jax.set_mesh(mesh):
        opt = npx.ShardedOptimizer(model, optax.adam(1e-3), wrt=nnx.Param)
        grad_fn = (
            npx.zero.value_and_grad(loss_fn_) if kind == "zero2" else nnx.value_and_grad(loss_fn_)
        )

        @nnx.jit
        def step(model, opt, x):
            loss, grads = grad_fn(model, x)
            opt.update(model, grads)
            return loss, grads

        compiled = step.lower(model, opt, x).compile()
        _, grads = step(model, opt, x)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(step(model, opt, x))
            times.append(time.perf_counter() - t0)
    mem = npx.zero.memory_per_device(model, opt, grads)
    mem["optimizer"] -= 4  # the int32 step counter
    ops = collectives(compiled, mesh)
    mem["wire"] = sum(c.traffic for c in ops)
    return (
        mem,
        bytes_by_kind(ops),
        compiled.memory_analysis().temp_size_in_bytes,
        statistics.median(times),
    )


def main():
    mesh = jax.make_mesh((N,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x = jax.device_put(
        jax.random.normal(jax.random.key(1), (BATCH, WIDTH)), NamedSharding(mesh, P("data"))
    )
    psi = DEPTH * (WIDTH * WIDTH + WIDTH)  # parameter count
    formulas = {
        "dp": 16 * psi,
        "zero1": 8 * psi + 8 * psi / N,
        "zero2": 4 * psi + 12 * psi / N,
        "fsdp": 16 * psi / N,
    }
    results = {k: measure(k, mesh, x) for k in ("dp", "zero1", "zero2", "fsdp", "naive")}

    print(f"model: {DEPTH} x Linear({WIDTH},{WIDTH}), psi = {psi} params, f32 Adam, {N} devices\n")
    print(
        "1. per-device param + grad + optimizer bytes vs ZeRO formulas (f32: 4 param + 4 grad + 8 Adam)"
    )
    print(f"   {'setup':7} {'measured':>10} {'formula':>10} {'ratio':>6}")
    for k, f in formulas.items():
        total = sum(v for n, v in results[k][0].items() if n != "wire")
        print(f"   {k:7} {total:>10} {int(f):>10} {total / f:6.3f}")

    optimum = 2 * psi * 4 * (N - 1) / N  # psi gathered + psi scattered, ring wire bytes per device
    print(
        "\n2. collective bytes of one train step (full-tensor bytes by kind; wire bytes/device vs optimum"
    )
    print("   2*psi*4*(N-1)/N; ring all-reduce costs twice an all-gather)")
    print(
        f"   {'setup':7} {'all-gather':>11} {'red-scatter':>11} {'all-reduce':>11} {'wire/opt':>10}"
    )
    for k in ("dp", "zero1", "zero2", "fsdp", "naive"):
        b = results[k][1]
        wire = results[k][0]["wire"]
        print(
            f"   {k:7} {b['all-gather']:>11} {b['reduce-scatter']:>11} {b['all-reduce']:>11} {wire / optimum:10.3f}"
        )

    print("\n3. compiled temp memory, FSDP vs naive annotation")
    t_fsdp, t_naive = results["fsdp"][2], results["naive"][2]
    print(f"   fsdp {t_fsdp} B, naive {t_naive} B, ratio {t_fsdp / t_naive:.3f}")
    print("\n4. median step time vs naive (5 steps, CPU, noisy)")
    for k in ("dp", "zero1", "zero2", "fsdp"):
        print(f"   {k:7} {results[k][3] / results['naive'][3]:.2f}x")
    transformer(mesh)


def transformer(mesh):
    """The same comparison on a small GPT (2 blocks, d=256, vocab 512)."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from tests.models import GPT

    make = lambda: GPT(vocab=512, d=256, heads=8, layers=2, max_len=32, rngs=nnx.Rngs(0))  # noqa: E731
    tokens = jax.random.randint(jax.random.key(2), (BATCH, 32), 0, 512)
    tokens = jax.device_put(tokens, NamedSharding(mesh, P("data")))

    def lm_loss(model, t):
        return optax.softmax_cross_entropy_with_integer_labels(model(t)[:, :-1], t[:, 1:]).mean()

    psi = sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(make(), nnx.Param)))
    res = {k: measure(k, mesh, tokens, make, lm_loss) for k in ("fsdp", "naive")}
    optimum = 2 * psi * 4 * (N - 1) / N
    print(f"\n5. small GPT (psi = {psi}): FSDP vs naive annotation, min_size=1")
    for k in ("fsdp", "naive"):
        b = res[k][1]
        print(
            f"   {k:6} all-gather {b['all-gather']:>9} reduce-scatter {b['reduce-scatter']:>9} "
            f"all-reduce {b['all-reduce']:>9}  wire/optimum {res[k][0]['wire'] / optimum:.3f}  temp {res[k][2]}"
        )
    print(f"   temp memory ratio fsdp/naive: {res['fsdp'][2] / res['naive'][2]:.3f}")


if __name__ == "__main__":
    main()
