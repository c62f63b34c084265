"""Level 2: actual shardings after parallelize, and every error branch."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from nnx_parallel import (
    FSDP,
    ColumnParallel,
    MeshError,
    PlanError,
    Replicated,
    RowParallel,
    Shard,
    parallelize,
)
from tests import helpers, models


def snapshot(model):
    """Values, metadata and classes: everything parallelize may change."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable):
            out[path] = (
                np.asarray(node.get_value()),
                repr(sorted(node.get_metadata().items(), key=str)),
            )
        elif isinstance(node, nnx.Module):
            out[path] = type(node)
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], tuple):
            np.testing.assert_array_equal(a[k][0], b[k][0])
            assert a[k][1] == b[k][1], k
        else:
            assert a[k] is b[k], k


def test_shardings_and_metadata(mesh2x4):
    model = models.GPT(rngs=nnx.Rngs(0))
    out = parallelize(model, mesh2x4, helpers.tp_plans()["gpt"])
    assert out is model
    up = model.blocks[0].mlp.up
    assert isinstance(up, nnx.Linear)
    assert up.kernel[...].sharding.spec == P(None, "model")
    assert up.kernel[...].sharding.mesh == mesh2x4
    assert up.kernel[...].sharding.shard_shape(up.kernel[...].shape) == (32, 32)
    assert up.kernel.get_metadata("out_sharding") == (None, "model")
    assert model.blocks[1].attn.o.kernel[...].sharding.spec == P("model", None)
    assert model.pos.embedding[...].sharding.spec == P(None, None)  # untouched: replicated
    assert model.blocks[0].ln1.scale[...].sharding.mesh == mesh2x4


def test_graph_operations_keep_working(mesh8):
    model = models.MLP(rngs=nnx.Rngs(0))
    parallelize(model, mesh8, helpers.tp_plans()["mlp"])
    graphdef, state = nnx.split(model)
    merged = nnx.merge(graphdef, state)
    assert isinstance(merged.up, nnx.Linear) and type(merged.up) is type(model.up)
    clone = nnx.clone(model)
    x = jax.numpy.ones((8, 16))
    with jax.set_mesh(mesh8):
        np.testing.assert_allclose(clone(x), model(x), rtol=1e-6)
    assert [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))] == [
        "down.bias",
        "down.kernel",
        "up.bias",
        "up.kernel",
    ]


def test_batchstats_and_plain_state_replicated(mesh8):
    class WithStats(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(8, 16, rngs=rngs)
            self.bn = nnx.BatchNorm(16, rngs=rngs)

    model = WithStats(nnx.Rngs(0))
    parallelize(model, mesh8, {"lin": ColumnParallel()})
    assert model.bn.mean[...].sharding.spec == P(None)
    assert model.bn.mean[...].sharding.mesh == mesh8


def test_second_call_composes_axes(kind):
    mesh = jax.make_mesh((4, 2), ("fsdp", "model"), axis_types=(kind, kind))
    model = models.MLP(rngs=nnx.Rngs(0))
    parallelize(model, mesh, helpers.tp_plans()["mlp"])
    parallelize(model, mesh, FSDP(min_size=16))
    assert model.up.kernel[...].sharding.spec == P("fsdp", "model")
    assert model.down.kernel[...].sharding.spec == P("model", "fsdp")


# Errors: each names the path, says why and what to do; model left unchanged.

ERROR_CASES = {
    "unknown axis in style": (
        {"up": ColumnParallel("tensor")},
        PlanError,
        r"mesh axis 'tensor' is not in the mesh",
    ),
    "unknown axis in spec": (
        {"up": Shard(kernel=P(None, "tensor"))},
        MeshError,  # a MeshAxisError: both a MeshError and a PlanError
        r"Shard\(kernel=P\(None, 'tensor'\)\) cannot shard module 'up'.*mesh axis 'tensor'",
    ),
    "rank mismatch": (
        {"up": Shard(kernel=P("model"))},
        PlanError,
        r"'up.kernel'.*1 entries but the parameter has shape \(16, 64\)",
    ),
    "not divisible": (
        {"down": ColumnParallel()},
        PlanError,
        r"'down.bias' \(pattern 'down'\): dim 0 of shape \(12,\) is not divisible by mesh axis 'model' \(size 8\)",
    ),
    "unmatched pattern": (
        {"upp": ColumnParallel()},
        PlanError,
        r"pattern 'upp' matched no module. Did you mean 'up'\?",
    ),
    "style cannot handle module": (
        {"": ColumnParallel()},
        PlanError,
        r"has no single weight matrix",
    ),
    "missing param name": (
        {"up": ColumnParallel(param="weight")},
        PlanError,
        r"has no parameter 'weight'",
    ),
    "dim out of range": ({"up": ColumnParallel(dim=5)}, PlanError, r"dim=5 is out of range"),
    "shard names missing param": (
        {"up": Shard(kernal=P(None, "model"))},
        PlanError,
        r"Did you mean 'kernel'",
    ),
    "axis used twice": (
        {"up": Shard(kernel=P("model", "model"))},
        PlanError,
        r"uses mesh axis 'model' twice",
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_leave_model_unchanged(case, mesh8):
    plan, exc, pattern = ERROR_CASES[case]
    model = models.MLP(din=16, dhidden=64, dout=12, rngs=nnx.Rngs(0))
    # A valid entry first: it must not be applied when a later one fails.
    full_plan = (
        {"up": ColumnParallel(), **plan} if "up" not in plan else {**plan, "down": Replicated()}
    )
    before = snapshot(model)
    with pytest.raises(exc, match=pattern):
        parallelize(model, mesh8, full_plan)
    assert_same(before, snapshot(model))


def test_conflicting_second_call(mesh8):
    model = models.MLP(rngs=nnx.Rngs(0))
    parallelize(model, mesh8, helpers.tp_plans()["mlp"])
    before = snapshot(model)
    with pytest.raises(
        PlanError, match=r"'up.kernel' is already parallelized.*nnx_parallel.reshard"
    ):
        parallelize(model, mesh8, {"up": RowParallel()})
    assert_same(before, snapshot(model))


def test_non_nnx_input(mesh8):
    with pytest.raises(PlanError, match="expected an nnx.Module, got dict"):
        parallelize({"w": np.ones(3)}, mesh8, Replicated())


def test_mesh_must_be_a_mesh():
    with pytest.raises(MeshError, match="expected a jax.sharding.Mesh"):
        parallelize(models.MLP(rngs=nnx.Rngs(0)), "model", Replicated())


def test_non_strict_ignores_unmatched(mesh8):
    model = models.MLP(rngs=nnx.Rngs(0))
    parallelize(model, mesh8, {"nothing": ColumnParallel(), "up": ColumnParallel()}, strict=False)
    assert model.up.kernel[...].sharding.spec == P(None, "model")


def test_shard_rejects_non_spec():
    with pytest.raises(PlanError, match="expected a PartitionSpec"):
        Shard(kernel=("model", None))
