"""Initialise a model 8x bigger than one device's share, without ever holding it whole.

Eight simulated CPU devices. The model is a stack of wide MLP layers; FSDP
shards every kernel over the 8 devices. We

  1. preview the plan: per-device bytes from the Resolution, nothing allocated;
  2. compile the sharded init and read XLA's memory analysis: what one device
     holds at its peak, against the whole model;
  3. create the model in its shards (`parallelize(factory, ...)`) and check a
     value against eager init with the same seed;
  4. reshard it onto tensor parallelism over 4 devices, device to device.

Run: python examples/init_large_model.py [--layers 8] [--width 512]
"""

import os

# The device count is fixed when JAX starts: set it before importing jax.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import nnx_parallel as npx  # noqa: E402


class WideStack(nnx.Module):
    def __init__(self, layers: int, width: int, *, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [nnx.Linear(width, width, use_bias=False, rngs=rngs) for _ in range(layers)]
        )

    def __call__(self, x):
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return x


def mib(n: int) -> str:
    return f"{n / 2**20:8.2f} MiB"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    args = parser.parse_args()

    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    factory = lambda: WideStack(args.layers, args.width, rngs=nnx.Rngs(0))  # noqa: E731
    plan = npx.FSDP("fsdp")

    # 1. Preview: shapes only.
    live = len(jax.live_arrays())
    abstract, resolution = npx.abstract_parallelize(factory, mesh, plan)
    assert len(jax.live_arrays()) == live, "the preview allocated device memory"
    whole = sum(
        int(np.prod(e.shape)) * np.dtype(e.dtype).itemsize for e in resolution.params.values()
    )
    per_device = sum(e.bytes_per_device(mesh) for e in resolution.params.values())
    kernel = abstract.layers[0].kernel.get_value()
    print(f"plan preview   : layers.0.kernel {kernel.shape} -> {kernel.sharding.spec}")
    print(f"whole model    : {mib(whole)}")
    print(f"per device     : {mib(per_device)}  ({whole / per_device:.1f}x smaller)")

    # 2. What XLA says one device needs while creating it.
    mem = npx.init_memory(factory, mesh, plan)
    print(
        f"compiled init  : {mem.programs} programs; per device output {mib(mem.output_bytes)}, "
        f"peak (output + temp) {mib(mem.peak_bytes)}"
    )
    print(
        f"bound          : share + largest param = {mib(mem.model_bytes // 8 + mem.largest_bytes)}"
        f"  -> {'OK' if mem.peak_bytes <= mem.model_bytes // 8 + mem.largest_bytes else 'EXCEEDED'}"
    )

    # 3. Create it, shard by shard.
    start = time.perf_counter()
    model = npx.parallelize(factory, mesh, plan)
    value = model.layers[0].kernel[...]
    jax.block_until_ready(value)
    print(
        f"sharded init   : {time.perf_counter() - start:.2f} s; one shard is {value.addressable_shards[0].data.shape}"
    )
    eager = nnx.Linear(args.width, args.width, use_bias=False, rngs=nnx.Rngs(0))
    same = np.array_equal(np.asarray(value), np.asarray(eager.kernel[...]))
    print(f"same as eager  : {same} (layers.0.kernel, same seed)")

    # 4. Move it to tensor parallelism over 4 devices.
    mesh4 = jax.make_mesh(
        (4,), ("model",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4]
    )
    npx.reshard(model, mesh4, {"layers.*": npx.ColumnParallel("model")})
    moved = model.layers[0].kernel[...]
    print(
        f"resharded      : {moved.sharding.spec} on {len(moved.devices())} devices, "
        f"bit-identical: {np.array_equal(np.asarray(moved), np.asarray(value))}"
    )


if __name__ == "__main__":
    main()
