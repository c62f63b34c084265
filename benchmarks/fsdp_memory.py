"""FSDP train-step memory vs depth on 8 simulated devices, against DP and naive annotation.

Run:  python benchmarks/fsdp_memory.py            (about 5 minutes on 2 CPU cores)
      python benchmarks/fsdp_memory.py --quick    (depths 4 and 8 only)

Temp memory is `compiled.memory_analysis().temp_size_in_bytes` per device of
one jitted Adam train step on L x Linear(512, 512) + ReLU, batch 64, printed
in units of one layer's f32 kernel (1 MiB). Setups:

  dp      every param replicated, batch sharded (plain data parallelism)
  naive   params annotated like FSDP, no hooks: GSPMD decides the gathers
  fsdp    FSDP("fsdp"): prefetch=0 (default)
  fsdp-p1 FSDP(prefetch=1)
  keep    FSDP(reshard_after_forward=False)

Stacks: unrolled (`nnx.List`) and scanned (`nnx.vmap` + `nnx.scan`,
`FSDP(scan_axes=1)`). Also the per-device compiled footprint (arguments +
temp + outputs - aliases) of FSDP at the deepest L as a fraction of the same
step's footprint on one device; the target is <= 1/N + 3 layers' share.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import nnx_parallel as npx  # noqa: E402
from nnx_parallel.views.collectives import bytes_by_kind, collectives  # noqa: E402
from tests import real_models as rm  # noqa: E402

SETUPS = ("dp", "naive", "fsdp", "fsdp-p1", "keep")


def make(stack: str, depth: int, width: int):
    if stack == "unrolled":
        return rm.LinearList(width, depth, rngs=nnx.Rngs(0))
    return rm.ScannedLinears(width, depth, rngs=nnx.Rngs(0))


def build(setup: str, stack: str, depth: int, width: int, mesh):
    model = make(stack, depth, width)
    scan = int(stack == "scanned")
    options = {"fsdp": {}, "fsdp-p1": {"prefetch": 1}, "keep": {"reshard_after_forward": False}}
    if setup in options:
        npx.parallelize(model, mesh, npx.FSDP("fsdp", min_size=1, scan_axes=scan, **options[setup]))
    elif setup == "naive":  # annotate like FSDP, no hooks: GSPMD propagates
        res = npx.resolve(model, mesh, npx.FSDP("fsdp", min_size=1, scan_axes=scan))
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            spec = res.params[".".join(map(str, path))].spec
            var.set_value(jax.device_put(var.get_value(), NamedSharding(mesh, spec)))
            var.set_metadata(out_sharding=tuple(spec), mesh=mesh)
    else:
        npx.parallelize(model, mesh, npx.Replicated())
    return model


def loss_fn(model, x):
    return jnp.mean(model(x).astype(jnp.float32) ** 2)


@nnx.jit
def train_step(model, opt, x):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x)
    opt.update(model, grads)
    return loss


def compile_step(model, mesh, x):
    """(compiled step, the jitted step, optimizer): the optimizer made on `mesh`."""
    with jax.set_mesh(mesh):
        opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
        return train_step.lower(model, opt, x).compile(), opt


def batch(mesh, width: int, size: int = 64):
    x = jax.random.normal(jax.random.key(1), (size, width))
    axis = mesh.axis_names[0]
    return jax.device_put(x, NamedSharding(mesh, P(axis)))


def measure(setup, stack, depth, width, mesh):
    model = build(setup, stack, depth, width, mesh)
    compiled, _ = compile_step(model, mesh, batch(mesh, width))
    mem = compiled.memory_analysis()
    ops = bytes_by_kind(collectives(compiled, mesh))
    footprint = (
        mem.argument_size_in_bytes
        + mem.temp_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
    )
    return {"temp": mem.temp_size_in_bytes, "footprint": footprint, **ops}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="depths 4 and 8 only")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--setups", default=",".join(SETUPS), help="comma-separated subset")
    args = parser.parse_args(argv)
    depths = (4, 8) if args.quick else (4, 8, 16, 32)
    width = args.width
    unit = width * width * 4
    n = 8
    mesh = jax.make_mesh((n,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    print(
        f"{n} devices ({jax.devices()[0].platform}), L x Linear({width},{width}) + ReLU, "
        f"batch 64, f32 Adam; temp memory per device in units of one {unit >> 20} MiB kernel\n"
    )
    header = f"{'stack':9} {'setup':8}" + "".join(f" {'L=' + str(d):>8}" for d in depths)
    print(header + "   all-gather / psi  reduce-scatter / psi  all-reduce / psi (deepest L)")
    for stack in ("unrolled", "scanned"):
        for setup in args.setups.split(","):
            row = [measure(setup, stack, d, width, mesh) for d in depths]
            psi = depths[-1] * (width * width + width) * 4
            last = row[-1]
            note = "   (per scan iteration)" if stack == "scanned" else ""
            print(
                f"{stack:9} {setup:8}"
                + "".join(f" {r['temp'] / unit:8.2f}" for r in row)
                + f"   {last['all-gather'] / psi:16.3f}  {last['reduce-scatter'] / psi:20.3f}"
                f"  {last['all-reduce'] / psi:16.3f}{note}",
                flush=True,
            )
    deepest = depths[-1]
    fsdp = measure("fsdp", "unrolled", deepest, width, mesh)["footprint"]
    single = jax.make_mesh((1,), ("fsdp",), devices=jax.devices()[:1])
    one = measure("dp", "unrolled", deepest, width, single)["footprint"]
    target = 1 / n + 3 / deepest
    print(
        f"\nfootprint (args + temp + outputs - aliases), FSDP unrolled L={deepest}: "
        f"{fsdp / one:.3f} of one device's ({fsdp} / {one} B); target <= 1/{n} + 3/{deepest} "
        f"= {target:.3f}"
    )
    print(
        "scanned rows: the HLO parser counts a while body once, so their collective bytes are"
        " one layer's (x L per step)."
    )


if __name__ == "__main__":
    main()
