"""Sharded models compute what the unsharded model computes (f32, 1e-5)."""

import jax
import pytest
from flax import nnx

from nnx_parallel import FSDP, ColumnParallel, RowParallel, parallelize
from tests import helpers, models

BUILDERS = {
    "mlp": lambda: models.MLP(rngs=nnx.Rngs(0)),
    "attention": lambda: models.Attention(rngs=nnx.Rngs(0)),
    "gpt": lambda: models.GPT(rngs=nnx.Rngs(0)),
}
MESHES = {"mesh8": ((8,), ("model",)), "mesh2x4": ((2, 4), ("data", "model"))}


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_tensor_parallel_matches_unsharded(name, mesh_name, kind):
    shape, axes = MESHES[mesh_name]
    mesh = jax.make_mesh(shape, axes, axis_types=(kind,) * len(axes))
    model, ref = BUILDERS[name](), BUILDERS[name]()
    parallelize(model, mesh, helpers.tp_plans()[name])
    x, xs = helpers.batch_for(name, mesh)
    helpers.check_equivalence(model, ref, mesh, xs, x)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_fsdp_matches_unsharded(name, fsdp8):
    model, ref = BUILDERS[name](), BUILDERS[name]()
    parallelize(model, fsdp8, FSDP("fsdp", min_size=64))
    x, _ = helpers.batch_for(name, fsdp8)
    x = jax.numpy.concatenate([x, x], axis=0)  # batch 8 or 16: splits over 8 devices
    xs = jax.device_put(x, jax.NamedSharding(fsdp8, jax.P("fsdp")))
    helpers.check_equivalence(model, ref, fsdp8, xs, x)


def test_fsdp_composes_with_tensor_parallel(kind):
    mesh = jax.make_mesh((4, 2), ("fsdp", "model"), axis_types=(kind, kind))
    model, ref = models.MLP(rngs=nnx.Rngs(0)), models.MLP(rngs=nnx.Rngs(0))
    fsdp = FSDP("fsdp", min_size=16)
    parallelize(model, mesh, {"up": (ColumnParallel("model"), fsdp), "down": (RowParallel("model"), fsdp)})
    assert model.up.kernel[...].sharding.spec == jax.P("fsdp", "model")
    assert model.down.kernel[...].sharding.spec == jax.P("model", "fsdp")
    x, xs = helpers.batch_for("mlp", mesh, batch_axes=("fsdp",))
    helpers.check_equivalence(model, ref, mesh, xs, x)
