"""Level 4: the collectives each style compiles to, from the HLO text."""

import jax
import pytest
from flax import nnx

from nnx_parallel import FSDP, parallelize
from nnx_parallel.views.collectives import bytes_by_kind, collectives
from tests import helpers, models


def test_column_row_mlp_forward_has_one_all_reduce(mesh8):
    model = models.MLP(rngs=nnx.Rngs(0))
    parallelize(model, mesh8, helpers.tp_plans()["mlp"])
    x = jax.numpy.ones((8, 16))
    counts = helpers.forward_counts(model, x, mesh8)
    assert counts == {
        "all-reduce": 1,
        "all-gather": 0,
        "reduce-scatter": 0,
        "all-to-all": 0,
        "collective-permute": 0,
    }


def test_column_alone_forward_has_no_collective(mesh8):
    from nnx_parallel import ColumnParallel

    layer = nnx.Linear(16, 32, rngs=nnx.Rngs(0))
    parallelize(layer, mesh8, ColumnParallel())
    assert sum(helpers.forward_counts(layer, jax.numpy.ones((8, 16)), mesh8).values()) == 0


def test_tp_train_step_on_2x4(mesh2x4):
    """Forward: 1 all-reduce over 'model' (row output). The batch gradient:
    1 all-reduce over 'data' (data parallel). Nothing else."""
    model, ref = models.MLP(rngs=nnx.Rngs(0)), models.MLP(rngs=nnx.Rngs(0))
    parallelize(model, mesh2x4, helpers.tp_plans()["mlp"])
    x, xs = helpers.batch_for("mlp", mesh2x4)
    opt = helpers.check_equivalence(model, ref, mesh2x4, xs, x)
    ops = helpers.step_collectives(model, opt, xs, mesh2x4)
    summary = sorted((c.kind, c.axes) for c in ops)
    assert summary == [("all-reduce", ("data",)), ("all-reduce", ("model",))]
    model_ar = next(c for c in ops if c.axes == ("model",))
    assert model_ar.size == 8 * 16 * 4 // 2  # (batch/2, out) f32 per data shard


@pytest.mark.parametrize("remat", [True, False])
def test_fsdp_step_gathers_and_scatters_each_param_once(fsdp8, remat):
    """FSDP reaches the optimum: every sharded kernel is all-gathered in
    forward and its gradient reduce-scattered, with no all-reduce of kernel
    grads. Vectors (biases) travel by all-reduce (runtime/buckets.py)."""
    model = models.MLP(rngs=nnx.Rngs(0))
    parallelize(model, fsdp8, FSDP(min_size=64, reshard_after_forward=remat))
    x = jax.device_put(jax.numpy.ones((8, 16)), jax.NamedSharding(fsdp8, jax.P("fsdp")))
    with jax.set_mesh(fsdp8):
        opt = nnx.Optimizer(model, __import__("optax").adam(1e-3), wrt=nnx.Param)
    ops = helpers.step_collectives(model, opt, x, fsdp8)
    sharded_bytes = (16 * 64 + 64 * 16) * 4  # up.kernel, down.kernel
    totals = bytes_by_kind(ops)
    assert totals["reduce-scatter"] == sharded_bytes
    # Forward gathers everything; with resharding, backward gathers again what
    # it reads: down.kernel, for the input gradient (up's input needs none,
    # biases are not read). At most 2 psi, never more.
    regathered = 64 * 16 * 4 if remat else 0
    assert totals["all-gather"] == sharded_bytes + regathered
    # All-reduced: the scalar loss, the gradient of down.bias (16 elements,
    # below min_size, so replicated), up.bias (64, sharded) in forward as 8
    # slots of 8 and its gradient: 4 + 64 + 256 + 256 bytes.
    assert sum(c.size for c in ops if c.kind == "all-reduce") == 4 + 16 * 4 + 2 * 64 * 4
    assert all(c.axes == ("fsdp",) for c in ops)


def test_parser_reads_async_pairs_once():
    text = """
  %ags = (f32[2,4]{1,0}, f32[16,4]{1,0}) all-gather-start(%p), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}
  %agd = f32[16,4]{1,0} all-gather-done(%ags)
  %ar = (f32[4]{0}, f32[8]{0}) all-reduce(%a, %b), replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
"""
    ops = collectives(text, jax.make_mesh((2, 4), ("data", "model")))
    assert [(c.kind, c.size, c.group, c.axes) for c in ops] == [
        ("all-gather", 16 * 4 * 4, 8, ("data", "model")),
        ("all-reduce", 12 * 4, 4, ("model",)),
    ]


def test_fsdp_plus_tp_gathers_only_the_fsdp_axis(kind):
    """2D ('fsdp', 'model'): each weight is all-gathered over 'fsdp' only (its
    'model' slice stays local), the row output is all-reduced over 'model',
    and gradients are reduce-scattered over 'fsdp'."""
    from nnx_parallel import ColumnParallel, RowParallel

    mesh = jax.make_mesh((4, 2), ("fsdp", "model"), axis_types=(kind, kind))
    model = models.MLP(rngs=nnx.Rngs(0))
    fsdp = FSDP("fsdp", min_size=16)
    parallelize(model, mesh, {"up": (ColumnParallel(), fsdp), "down": (RowParallel(), fsdp)})
    x = jax.device_put(jax.numpy.ones((8, 16)), jax.NamedSharding(mesh, jax.P("fsdp")))
    with jax.set_mesh(mesh):
        opt = nnx.Optimizer(model, __import__("optax").adam(1e-3), wrt=nnx.Param)
    ops = helpers.step_collectives(model, opt, x, mesh)
    weights_per_model_shard = (16 * 64 + 64 * 16) * 4 // 2
    gathers = [c for c in ops if c.kind == "all-gather"]
    assert {c.axes for c in gathers} == {("fsdp",)}
    # + down.kernel again in backward (the input gradient reads it; up's input
    # needs none): ZeRO-3 re-gathers rather than keeping it. down.bias travels
    # by all-reduce over 'fsdp' (runtime/buckets.py).
    assert sum(c.size for c in gathers) == weights_per_model_shard + 64 * 16 * 4 // 2
    scatters = [c for c in ops if c.kind == "reduce-scatter"]
    assert {c.axes for c in scatters} == {("fsdp",)}
    assert sum(c.size for c in scatters) == weights_per_model_shard
    bias = [c.size for c in ops if c.kind == "all-reduce" and c.axes == ("fsdp",)]
    assert sum(bias) >= 2 * 16 * 4, bias  # down.bias in (4 slots of 4) and its gradient
    model_reduces = [c for c in ops if c.kind == "all-reduce" and c.axes == ("model",)]
    assert len(model_reduces) == 1 and model_reduces[0].size == 2 * 16 * 4  # (batch/4, 16)
