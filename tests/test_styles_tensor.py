"""nnx_parallel.core.styles.tensor: ColumnParallel, RowParallel, Shard and Replicated specs."""

import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import nnx_parallel as npx
from tests import models


def _specs(mesh, plan):
    return npx.resolve(nnx.eval_shape(lambda: models.MLP(rngs=nnx.Rngs(0))), mesh, plan).specs()


def test_column_then_row_is_the_megatron_pair(mesh8):
    specs = _specs(mesh8, {"up": npx.ColumnParallel(), "down": npx.RowParallel()})
    assert specs["up.kernel"] == P(None, "model") and specs["up.bias"] == P("model")
    assert specs["down.kernel"] == P("model", None) and specs["down.bias"] == P(None)


def test_column_can_keep_its_bias_whole(mesh8):
    specs = _specs(mesh8, {"up": npx.ColumnParallel(shard_bias=False)})
    assert specs["up.bias"] == P(None)


def test_a_named_param_that_does_not_exist(mesh8):
    with pytest.raises(npx.PlanError, match="has no parameter 'w'.*Pass param= one of"):
        _specs(mesh8, {"up": npx.ColumnParallel(param="w")})


def test_a_module_without_one_weight_matrix(mesh8):
    with pytest.raises(npx.PlanError, match="has no single weight matrix"):
        _specs(mesh8, {"": npx.ColumnParallel()})  # the root owns no params


def test_shard_gives_explicit_specs_and_replicated_covers_the_subtree(mesh8):
    assert _specs(mesh8, {"down": npx.Shard(kernel=P("model", None))})["down.kernel"] == P(
        "model", None
    )
    specs = _specs(mesh8, {"": npx.Replicated()})
    assert specs["up.kernel"] == P(None, None) and specs["down.bias"] == P(None)
    # Replicated over the subtree would undo a Shard below it: refused, not silently applied.
    with pytest.raises(npx.PlanError, match="Replicated\\(\\) wants P\\(None, None\\), but Shard"):
        _specs(mesh8, {"": npx.Replicated(), "down": npx.Shard(kernel=P("model", None))})
