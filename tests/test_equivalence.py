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


def test_fsdp_runs_eagerly(fsdp8):
    """Outside jit too: each hooked call runs its gathers op by op."""
    model, ref = models.MLP(rngs=nnx.Rngs(0)), models.MLP(rngs=nnx.Rngs(0))
    parallelize(model, fsdp8, FSDP("fsdp", min_size=64))
    x, _ = helpers.batch_for("mlp", fsdp8)
    xs = jax.device_put(x, jax.NamedSharding(fsdp8, jax.P("fsdp")))
    with jax.set_mesh(fsdp8):
        helpers.assert_close(model(xs), ref(x), helpers.FWD_TOL, "eager forward")


def test_fsdp_composes_with_tensor_parallel(kind):
    mesh = jax.make_mesh((4, 2), ("fsdp", "model"), axis_types=(kind, kind))
    model, ref = models.MLP(rngs=nnx.Rngs(0)), models.MLP(rngs=nnx.Rngs(0))
    fsdp = FSDP("fsdp", min_size=16)
    parallelize(
        model, mesh, {"up": (ColumnParallel("model"), fsdp), "down": (RowParallel("model"), fsdp)}
    )
    assert model.up.kernel[...].sharding.spec == jax.P("fsdp", "model")
    assert model.down.kernel[...].sharding.spec == jax.P("model", "fsdp")
    x, xs = helpers.batch_for("mlp", mesh, batch_axes=("fsdp",))
    helpers.check_equivalence(model, ref, mesh, xs, x)


class HeadsOut(nnx.Module):
    """A custom output projection with a heads-first weight named `w`."""

    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (8, 4, 32)) * 0.1)

    def __call__(self, x):
        return jax.numpy.einsum("btnh,nhd->btd", x, self.w[...])


class Mixed(nnx.Module):
    """Every layer kind the TP styles support, wired Column -> Row."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(64, 32, rngs=rngs)
        self.heads = nnx.Einsum("btd,dnh->btnh", (32, 8, 4), (8, 4), rngs=rngs)
        self.merge = nnx.Einsum("btnh,nhd->btd", (8, 4, 32), (32,), rngs=rngs)
        self.gen = nnx.LinearGeneral(32, (8, 4), rngs=rngs)
        self.proj = HeadsOut(rngs)
        self.conv = nnx.Conv(32, 16, kernel_size=(3,), rngs=rngs)
        self.out = nnx.Conv(16, 32, kernel_size=(1,), rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        x = x + self.merge(self.heads(x))
        x = x + self.proj(self.gen(x))
        return x + self.out(jax.nn.relu(self.conv(x)))


MIXED_PLAN = {
    "embed": RowParallel(),  # vocab-parallel
    "heads": ColumnParallel(),  # shards the head letter 'n'
    "merge": RowParallel(),
    "gen": ColumnParallel(),
    "proj": RowParallel(param="w", dim=0, input_spec=("model", None)),
    "conv": ColumnParallel(),
    "out": RowParallel(),
}


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_embed_einsum_general_conv_custom_weight(mesh_name, kind):
    shape, axes = MESHES[mesh_name]
    mesh = jax.make_mesh(shape, axes, axis_types=(kind,) * len(axes))
    model, ref = Mixed(nnx.Rngs(0)), Mixed(nnx.Rngs(0))
    parallelize(model, mesh, MIXED_PLAN)
    assert model.heads.kernel[...].sharding.spec == jax.P(None, "model", None)
    assert model.merge.kernel[...].sharding.spec == jax.P("model", None, None)
    assert model.gen.kernel[...].sharding.spec == jax.P(None, "model", None)
    assert model.conv.kernel[...].sharding.spec == jax.P(None, None, "model")
    assert model.out.kernel[...].sharding.spec == jax.P(None, "model", None)
    assert model.embed.embedding[...].sharding.spec == jax.P("model", None)
    x, xs = helpers.batch_for("gpt", mesh)
    helpers.check_equivalence(model, ref, mesh, xs, x)
