"""Tests for nnx_parallel.checkpoint.targets: restore targets and what save accepts."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import nnx_parallel as npx
from nnx_parallel.checkpoint import targets as T
from nnx_parallel.errors import PlanError
from tests import models
from tests.helpers import adam

MESH = jax.make_mesh((8,), ("model",))
PLAN = {"up": npx.ColumnParallel("model"), "down": npx.RowParallel("model")}


class Holder(nnx.Module):
    def __init__(self, value):
        self.w = nnx.Param(jnp.ones(2))
        self.extra = nnx.data(value)


class EmptyNet(nnx.Module):
    pass


def test_model_target_from_factory_and_module_and_bad_input():
    abstract, res = T._model_target(lambda: models.MLP(rngs=nnx.Rngs(0)), MESH, PLAN, True)
    kernel = abstract.up.kernel.get_value()
    assert isinstance(kernel, jax.ShapeDtypeStruct)
    assert kernel.shape == (16, 64) and kernel.sharding.spec == P(None, "model")
    assert res.params["down.kernel"].spec == P("model", None)
    live = models.MLP(rngs=nnx.Rngs(0))
    abstract2, _ = T._model_target(live, MESH, PLAN, True)
    assert abstract2 is not live and isinstance(live.up.kernel.get_value(), jax.Array)
    with pytest.raises(
        PlanError, match="restore expects a model or a zero-argument factory, got int"
    ):
        T._model_target(3, MESH, PLAN, True)
    with pytest.raises(PlanError):  # strict: a pattern matching nothing
        T._model_target(lambda: models.MLP(rngs=nnx.Rngs(0)), MESH, {"nope": PLAN["up"]}, True)


def test_optimizer_target_layout_mirrors_params():
    abstract, res = T._model_target(lambda: models.MLP(rngs=nnx.Rngs(0)), MESH, PLAN, True)
    opt = T._optimizer_abstract(adam, abstract)
    target = T._optimizer_target(nnx.state(opt), res)
    specs = jax.tree.map(lambda s: s.sharding.spec, target)
    for moment in ("mu", "nu"):
        assert specs["opt_state"][0][moment]["up"]["kernel"] == P(None, "model")
        assert specs["opt_state"][0][moment]["up"]["bias"] == P("model")
        assert specs["opt_state"][0][moment]["down"]["kernel"] == P("model", None)
        assert specs["opt_state"][0][moment]["down"]["bias"] == P(None)
    assert specs["opt_state"][0]["count"] == P() and specs["step"] == P()
    assert target["opt_state"][0]["mu"]["up"]["kernel"].shape == (16, 64)


def test_optimizer_abstract_errors():
    abstract, _ = T._model_target(lambda: models.MLP(rngs=nnx.Rngs(0)), MESH, PLAN, True)
    with pytest.raises(PlanError, match="optimizer must be an nnx.Optimizer or a callable"):
        T._optimizer_abstract("adam", abstract)
    with pytest.raises(
        PlanError, match=r"optimizer\(model\) must return an nnx.Optimizer, got dict"
    ):
        T._optimizer_abstract(lambda m: {}, abstract)


def test_check_saveable_errors():
    model = models.MLP(rngs=nnx.Rngs(0))
    T._check_saveable(model, None)
    T._check_saveable(model, adam(model))
    with pytest.raises(
        PlanError, match="save expects the model to be an nnx.Module, got Optimizer"
    ):
        T._check_saveable(adam(model), model)
    with pytest.raises(
        PlanError, match="save expects the optimizer to be an nnx.Optimizer.*got dict"
    ):
        T._check_saveable(model, {"lr": 1})
    with pytest.raises(PlanError, match=r"save: model state 'extra' holds a float \(0\.5\)"):
        T._check_saveable(Holder(0.5), None)
    with pytest.raises(PlanError, match=r"the model \(EmptyNet\) holds no arrays"):
        T._check_saveable(EmptyNet(), None)
