"""nnx_parallel.core.styles.fsdp: which dim FSDP shards, and its errors."""

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import nnx_parallel as npx
from tests import models


def _specs(model_fn, mesh, plan):
    return npx.resolve(nnx.eval_shape(model_fn), mesh, plan).specs()


def test_the_largest_divisible_dim_of_each_big_enough_param(fsdp8):
    specs = _specs(lambda: models.MLP(rngs=nnx.Rngs(0)), fsdp8, npx.FSDP(min_size=64))
    assert specs["up.kernel"] == P(None, "fsdp")  # (16, 64): the 64
    assert specs["down.kernel"] == P("fsdp", None)  # (64, 16)
    assert specs["up.bias"] == P("fsdp")  # 64 elements: not below min_size
    assert specs["down.bias"] == P(None)  # 16 elements: below min_size


def test_a_dim_another_style_shards_is_left_to_it(mesh2x4):
    plan = {"": npx.FSDP("data", min_size=1), "up": npx.ColumnParallel("model")}
    specs = _specs(lambda: models.MLP(rngs=nnx.Rngs(0)), mesh2x4, plan)
    assert specs["up.kernel"] == P("data", "model")


def test_an_axis_of_size_one_shards_nothing():
    mesh = jax.make_mesh((1,), ("fsdp",), devices=jax.devices()[:1])
    specs = _specs(lambda: models.MLP(rngs=nnx.Rngs(0)), mesh, npx.FSDP(min_size=1))
    assert set(specs.values()) <= {P(None), P(None, None)}


def test_scan_axes_beyond_the_rank_is_a_plan_error(fsdp8):
    with pytest.raises(npx.PlanError, match="scan_axes=3 stacks more dims than its shape"):
        _specs(lambda: models.MLP(rngs=nnx.Rngs(0)), fsdp8, npx.FSDP(min_size=1, scan_axes=3))


def test_a_mixed_precision_dtype_must_be_floating():
    with pytest.raises(npx.PlanError, match=r"FSDP\(param_dtype='int8'\): not a floating dtype"):
        npx.FSDP(param_dtype="int8")
