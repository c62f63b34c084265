"""A style of your own, end to end: specs, an activation layout, ZeRO-1 beside it, one step.

Run:  python examples/custom_style.py      (8 simulated CPU devices, a few seconds)

`OutputFeatures(axis)` shards a layer's output features over `axis` (what
`ColumnParallel` does, written here from the `Style` protocol alone) and lays
its output out feature-sharded through a `Layout` hook. It is used in one
plan with the built-in `RowParallel` and with `ZeRO(1)` over the data axis,
which writes `optimizer_sharding` metadata through the same protocol's
optional `param_metadata`. The script checks the specs, the forward against
the unsharded model, and one Adam step against the unsharded step.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import nnx_parallel as npx  # noqa: E402


@dataclasses.dataclass(frozen=True)
class OutputFeatures:
    """Shards the last dim of every parameter the matched module owns over `axis`,
    and constrains the call's output to be feature-sharded the same way."""

    axis: str = "model"
    subtree = False  # only the matched module's own parameters

    def param_specs(self, ctx: npx.ModuleContext) -> dict[str, P]:
        ctx.check_axes(self, self.axis)  # a PlanError naming this style if the mesh lacks it
        out = {}
        for name, shape in ctx.shapes.items():
            if shape[-1] % ctx.mesh.shape[self.axis]:
                raise ctx.fail(
                    self,
                    name,
                    f"its last dim {shape[-1]} does not split over {self.axis!r}",
                    "Pick a size the axis divides, or leave this layer out of the plan",
                )
            out[name] = P(*[None] * (len(shape) - 1), self.axis)
        return out

    def hooks(self, ctx: npx.ModuleContext, specs) -> npx.ModuleHooks:
        # Trailing-dim layouts: the output's last dim is sharded over `axis`.
        return npx.ModuleHooks(layout=npx.Layout(output=(self.axis,)))


class MLP(nnx.Module):
    def __init__(self, d: int = 32, hidden: int = 128, *, rngs: nnx.Rngs):
        self.up = nnx.Linear(d, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, d, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))


def loss_fn(model, x):
    return jnp.mean(model(x) ** 2)


def train_step(model, opt, x):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x)
    opt.update(model, grads)
    return loss


def main() -> dict:
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    plan = {
        "": npx.ZeRO(1, axis="data", min_size=64),  # optimizer state sharded over 'data'
        "up": OutputFeatures("model"),
        "down": npx.RowParallel("model"),
    }
    model = npx.parallelize(MLP(rngs=nnx.Rngs(0)), mesh, plan)
    reference = MLP(rngs=nnx.Rngs(0))

    specs = {path: var[...].sharding.spec for path, var in nnx.to_flat_state(nnx.state(model))}
    specs = {".".join(map(str, path)): spec for path, spec in specs.items()}
    assert specs["up.kernel"] == P(None, "model") and specs["up.bias"] == P("model"), specs
    print(npx.summary(model))

    x = jax.random.normal(jax.random.key(1), (16, 32))
    x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh):
        y = nnx.jit(lambda m, x: m(x))(model, x_sharded)
    np.testing.assert_allclose(y, reference(x), rtol=1e-5, atol=1e-6)

    opt = npx.ShardedOptimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    ref_opt = nnx.Optimizer(reference, optax.adam(1e-2), wrt=nnx.Param)
    with jax.set_mesh(mesh):
        loss = nnx.jit(train_step)(model, opt, x_sharded)
    ref_loss = nnx.jit(train_step)(reference, ref_opt, x)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(model.up.kernel[...], reference.up.kernel[...], rtol=1e-4, atol=1e-6)

    mu = opt.opt_state[0].mu["up"]["kernel"][...].sharding.spec
    print(f"up.kernel: param {model.up.kernel[...].sharding.spec}, Adam mu {mu}")
    print(f"loss {float(loss):.6f} (unsharded {float(ref_loss):.6f}); forward and step match")
    return {"specs": specs, "mu": mu, "loss": float(loss), "ref_loss": float(ref_loss)}


if __name__ == "__main__":
    main()
