"""nnx_parallel.core.verify: resolution-time checks of specs, earlier plans and shared modules."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import nnx_parallel as npx
from nnx_parallel.core.verify import (
    _align,
    _check_conflicts,
    _check_shared,
    _validate_inputs,
    check_spec,
    hook_axes,
)
from tests import models


def test_check_spec_accepts_a_fitting_spec_and_names_each_problem(mesh2x4):
    check_spec("up.kernel", "up", P(None, "model"), (16, 64), mesh2x4)
    with pytest.raises(npx.PlanError, match=r"'up.kernel' \(pattern 'up'\).*1 entries.*2 dims"):
        check_spec("up.kernel", "up", P("model"), (16, 64), mesh2x4)
    with pytest.raises(npx.MeshAxisError, match="mesh axis 'modle'.*Did you mean 'model'"):
        check_spec("up.kernel", None, P(None, "modle"), (16, 64), mesh2x4)
    with pytest.raises(npx.PlanError, match="uses mesh axis 'model' twice"):
        check_spec("up.kernel", None, P("model", "model"), (16, 64), mesh2x4)
    with pytest.raises(npx.PlanError, match="dim 1 of shape .* not divisible"):
        check_spec("up.kernel", None, P(None, "model"), (16, 6), mesh2x4)


def test_align_puts_a_positional_spec_on_trailing_dims():
    shapes = {"kernel": (16, 64), "bias": (64,)}
    out = _align({"*": P(None, "model")}, shapes)
    assert out == {"kernel": P(None, "model"), "bias": P("model")}
    assert _align({"kernel": P("x", None)}, shapes) == {"kernel": P("x", None)}
    with pytest.raises(npx.PlanError, match="has 3 entries.*name the parameter"):
        _align({"*": P(None, None, "model")}, shapes, "up", nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


def test_check_conflicts_refuses_moving_an_earlier_dim():
    own = {"kernel": ("up.kernel",)}
    _check_conflicts(own, {"kernel": P(None, "model")}, {"kernel": P("fsdp", "model")}, {})
    with pytest.raises(npx.PlanError, match="'up.kernel' is already parallelized.*dim 0"):
        _check_conflicts(
            own, {"kernel": P(None, "model")}, {"kernel": P("model", None)}, {"kernel": "up"}
        )


def test_check_shared_refuses_two_styles_for_one_module():
    every = {"a": "shared", "b": "shared"}
    _check_shared({"a": (npx.FSDP(),), "b": (npx.FSDP(),)}, every)  # same styles: fine
    with pytest.raises(npx.PlanError, match="'a' and 'b' are one shared module"):
        _check_shared({"a": (npx.FSDP(),), "b": (npx.Replicated(),)}, every)


def test_validate_inputs(mesh8):
    _validate_inputs(models.MLP(rngs=nnx.Rngs(0)), mesh8)
    with pytest.raises(npx.PlanError, match="expected an nnx.Module, got dict"):
        _validate_inputs({}, mesh8)
    with pytest.raises(npx.MeshError, match="expected a jax.sharding.Mesh, got str"):
        _validate_inputs(models.MLP(rngs=nnx.Rngs(0)), "mesh")


@pytest.mark.parametrize(
    "plan",
    [
        {"": npx.FSDP("nope")},
        {"": npx.FSDP("data", batch_axes=("nope",))},
        {"up": npx.ColumnParallel("nope")},
        {"up": npx.ColumnParallel("model", input_spec=("nope",))},
        {"down": npx.RowParallel("model", output_spec=(None, "nope"))},
        {"up": npx.SequenceParallel("nope")},
        {"up": npx.Shard(kernel=P(None, "nope"))},
        {"up": npx.Shard(kernel=P(None, "model"), input_spec=("nope",))},
        {"": npx.ZeRO(1, axis="nope")},
        {"": npx.ContextParallel("nope")},
        {"": npx.ExpertParallel("nope")},
    ],
    ids=lambda plan: repr(next(iter(plan.values())))[:40],
)
def test_a_missing_mesh_axis_is_one_plan_error_everywhere(plan, mesh2x4):
    model = models.MLP(rngs=nnx.Rngs(0))
    before = jax.tree.map(lambda x: x, nnx.state(model))
    with pytest.raises(
        npx.MeshAxisError, match=r"mesh axis 'nope' is not in the mesh \('data', 'model'\)"
    ):
        npx.parallelize(model, mesh2x4, plan)
    assert type(model.up) is nnx.Linear  # nothing applied
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), nnx.state(model), before)


def test_hook_axes_lists_every_axis_a_hook_names():
    from nnx_parallel.core.layouts import Gather, Layout, ModuleHooks

    hooks = ModuleHooks(
        layout=Layout(input=(None, "model"), output=(("data", "model"),)),
        gather=Gather(axes=("fsdp",), batch_axes=("data",), params=()),
    )
    assert hook_axes(hooks) == ("model", "data", "fsdp")
    assert hook_axes(None) == ()


def test_mesh_axis_error_is_both_a_plan_error_and_a_mesh_error(mesh8):
    assert issubclass(npx.MeshAxisError, npx.PlanError)
    assert issubclass(npx.MeshAxisError, npx.MeshError)
    import jax.numpy as jnp

    for call in (
        lambda: npx.shard_batch(jnp.zeros((8, 4)), mesh8, seq_axis="nope"),
        lambda: npx.cross_entropy(jnp.zeros((8, 4)), jnp.zeros(8, int), mesh8, axis="nope"),
        lambda: npx.resolve(models.MLP(rngs=nnx.Rngs(0)), mesh8, {"up": npx.FSDP("nope")}),
    ):
        with pytest.raises(npx.MeshAxisError, match="nope"):
            call()
