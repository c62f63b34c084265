"""Bad input gets the project's own errors, before anything changes (issue 15, items 7-10)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nnx_parallel import (
    FSDP,
    ColumnParallel,
    ParallelError,
    PlanError,
    RowParallel,
    SequenceColumnParallel,
    SequenceParallel,
    SequenceRowParallel,
    Shard,
    ZeRO,
    move,
    parallelize,
    plans,
    reduce_metrics,
    reshard,
    resolve,
    sharded,
)
from tests import models
from tests.test_apply import FSDP8, MESH2X4, MESH8, TP, Net, snapshot

MLP_TP = {"up": ColumnParallel("model"), "down": RowParallel("model")}

# 7. Under a trace --------------------------------------------------------------------


def test_parallelize_inside_nnx_jit_raises_and_leaves_the_model_whole():
    model = Net(nnx.Rngs(0))
    before = snapshot(model)
    with pytest.raises(PlanError, match="while JAX is tracing.*outside jit/grad"):
        nnx.jit(lambda m: parallelize(m, MESH8, TP))(model)
    assert snapshot(model) == before
    assert model.mlp.up.kernel[...].shape == (16, 64)  # attributes all still there


def test_parallelize_inside_nnx_grad_raises_and_leaves_the_model_whole():
    model = Net(nnx.Rngs(0))
    before = snapshot(model)

    def loss(m):
        parallelize(m, MESH8, TP)
        return 0.0

    with pytest.raises(PlanError, match="parallelize was called while JAX is tracing"):
        nnx.grad(loss)(model)
    assert snapshot(model) == before


def test_reshard_and_factories_under_a_trace_raise():
    model = parallelize(models.MLP(rngs=nnx.Rngs(0)), FSDP8, FSDP("fsdp", min_size=16))
    before = snapshot(model)
    with pytest.raises(PlanError, match="reshard was called while JAX is tracing"):
        nnx.jit(lambda m: reshard(m, MESH8, MLP_TP))(model)
    assert snapshot(model) == before
    with pytest.raises(PlanError, match="parallelize was called while JAX is tracing"):
        jax.jit(lambda: parallelize(lambda: models.MLP(rngs=nnx.Rngs(0)), MESH8, MLP_TP))()


# 8. @sharded ----------------------------------------------------------------------------


def test_sharded_spec_longer_than_every_param_raises_naming_path_and_decorator():
    model = models.MLP(rngs=nnx.Rngs(0))
    sharded(P("model", None, None))(model.up)
    before = snapshot(model)
    match = (
        r"@sharded\(P\('model', None, None\)\) on Linear 'up' has 3 entries, but its "
        r"largest parameter 'up.kernel' has shape \(16, 64\)"
    )
    with pytest.raises(PlanError, match=match):
        parallelize(model, MESH8, {})
    assert snapshot(model) == before


def test_sharded_spec_still_aligns_to_trailing_dims():
    model = models.MLP(rngs=nnx.Rngs(0))
    sharded(P(None, "model"))(model.up)
    specs = resolve(model, MESH8, {}).specs()
    assert specs["up.kernel"] == P(None, "model") and specs["up.bias"] == P("model")


# 9. Style arguments ----------------------------------------------------------------------


@pytest.mark.parametrize("entry", [ColumnParallel, (ColumnParallel("model"), FSDP)])
def test_a_style_class_instead_of_an_instance_says_how_to_write_it(entry):
    model = models.MLP(rngs=nnx.Rngs(0))
    before = snapshot(model)
    name = "ColumnParallel" if entry is ColumnParallel else "FSDP"
    with pytest.raises(PlanError, match=rf"{name} is a class, not a style: write {name}\(\)"):
        parallelize(model, MESH8, {"up": entry})
    with pytest.raises(PlanError, match="is a class, not a style"):
        plans.combine({"up": entry})
    assert snapshot(model) == before


def test_axes_given_as_lists_become_tuples():
    style = ColumnParallel(["data", "model"])
    assert style.axis == ("data", "model")
    assert hash(style) == hash(ColumnParallel(("data", "model")))
    assert FSDP(["fsdp"], batch_axes=["fsdp"], methods=["__call__"]).batch_axes == ("fsdp",)
    model = parallelize(models.MLP(rngs=nnx.Rngs(0)), MESH2X4, {"up": style})
    assert model.up.kernel[...].sharding.spec == P(None, ("data", "model"))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: FSDP(min_size="big"), r"FSDP\(min_size='big'\): expected an int >= 0"),
        (lambda: FSDP(min_size=-1), r"FSDP\(min_size=-1\): expected an int >= 0"),
        (lambda: FSDP(scan_axes=1.5), r"FSDP\(scan_axes=1.5\): expected an int"),
        (lambda: FSDP(methods="__call__"), r"FSDP\(methods='__call__'\): expected a tuple"),
        (lambda: FSDP(batch_axes="data"), r"FSDP\(batch_axes='data'\): expected a tuple"),
        (lambda: FSDP(reshard_after_forward="no"), r"reshard_after_forward='no'\): expected True"),
        (lambda: FSDP(axis=("fsdp", 3)), r"FSDP\(axis=\('fsdp', 3\)\): expected a mesh axis name"),
        (lambda: ColumnParallel(axis=3), r"ColumnParallel\(axis=3\): expected a mesh axis"),
        (lambda: ColumnParallel(axis=[]), r"ColumnParallel\(axis=\[\]\): expected at least one"),
        (lambda: ColumnParallel(param=""), r"ColumnParallel\(param=''\): expected a non-empty"),
        (lambda: ColumnParallel(shard_bias=1), r"ColumnParallel\(shard_bias=1\): expected True"),
        (lambda: ColumnParallel(input_spec="model"), r"input_spec='model'\): expected a tuple"),
        (lambda: RowParallel(dim="0"), r"RowParallel\(dim='0'\): expected an int"),
        (lambda: RowParallel(dim=True), r"RowParallel\(dim=True\): expected an int"),
        (lambda: SequenceParallel(seq_dim=1), r"SequenceParallel\(seq_dim=1\): the sequence dim"),
        (lambda: SequenceColumnParallel(seq_dim=0), r"SequenceColumnParallel\(seq_dim=0\)"),
        (lambda: SequenceRowParallel("model", output_spec=3), r"output_spec=3\): expected a tuple"),
        (lambda: ZeRO(axis=("data", "fsdp")), r"ZeRO\(axis=\('data', 'fsdp'\)\): expected one"),
        (lambda: ZeRO(min_size=None), r"ZeRO\(min_size=None\): expected an int"),
        (lambda: Shard(kernel=P("model"), input_spec="x"), r"Shard\(input_spec='x'\)"),
    ],
)
def test_bad_style_fields_raise_at_construction(make, match):
    with pytest.raises(PlanError, match=match):
        make()


def test_fsdp_scan_axes_beyond_the_rank_raises_naming_the_param():
    model = models.MLP(rngs=nnx.Rngs(0))
    before = snapshot(model)
    match = r"'(up|down)\.(kernel|bias)'.*scan_axes=5 stacks more dims than its shape \(\d+"
    with pytest.raises(PlanError, match=match):
        parallelize(model, FSDP8, FSDP("fsdp", min_size=16, scan_axes=5))
    assert snapshot(model) == before


def test_move_with_a_spec_instead_of_a_sharding():
    x = jnp.arange(8.0)
    with pytest.raises(
        ParallelError,
        match=r"move: expected a jax.sharding.Sharding, got "
        r"a PartitionSpec P\('model',\).*pass jax.NamedSharding\(mesh, spec\)",
    ):
        move(x, P("model"))
    assert move(x, NamedSharding(MESH8, P("model"))).sharding.spec == P("model")


@pytest.mark.parametrize(
    "args, match",
    [
        ((5,), r"plans.combine: tp_plan must be a dict pattern -> style, got int 5"),
        (({"up": ColumnParallel()}, 5), r"plans.combine: fsdp must be an FSDP style"),
        (({"up": ColumnParallel()}, ColumnParallel()), r"fsdp must be an FSDP style"),
    ],
)
def test_combine_validates_its_arguments(args, match):
    with pytest.raises(PlanError, match=match):
        plans.combine(*args)


def test_reduce_metrics_names_a_string_leaf():
    with pytest.raises(ParallelError, match=r"metric \['run'\] is str 'exp-1', not a number"):
        reduce_metrics({"loss": 1.0, "run": "exp-1"})


@pytest.mark.parametrize("z", [np.complex64(1 + 2j), jnp.asarray([1 + 2j, 3j])])
def test_reduce_metrics_refuses_complex_values(z):
    with pytest.raises(ParallelError, match=r"metric \['z'\] is complex.*imaginary part.*x.real"):
        reduce_metrics({"loss": 1.0, "z": z})
    assert reduce_metrics({"re": np.real(z), "im": np.imag(z)}, op="sum") == {
        "re": float(np.sum(np.real(z))),
        "im": float(np.sum(np.imag(z))),
    }


# 10. Shared and tied parameters ----------------------------------------------------------


@pytest.mark.parametrize("alias", ["again", "upper"])  # before / after 'up' in graph order
def test_a_shared_module_matches_at_either_path(alias):
    for name in (alias, "up"):
        model = models.MLP(rngs=nnx.Rngs(0))
        setattr(model, alias, model.up)
        res = resolve(model, MESH8, {name: ColumnParallel("model")})
        assert len(res.matches[name]) == 1
        parallelize(model, MESH8, {name: ColumnParallel("model")})
        assert model.up.kernel[...].sharding.spec == P(None, "model")
        assert getattr(model, alias) is model.up


def test_a_shared_module_styled_differently_at_its_two_paths_raises():
    model = models.MLP(rngs=nnx.Rngs(0))
    model.upper = model.up
    before = snapshot(model)
    match = (
        r"'up' and 'upper' are one shared module, and pattern 'up' \(via 'up'\) and pattern "
        r"'upper' \(via 'upper'\) give it different styles.*keep one of the two entries"
    )
    with pytest.raises(PlanError, match=match):
        parallelize(model, MESH8, {"up": ColumnParallel("model"), "upper": RowParallel("model")})
    assert snapshot(model) == before
    plan = {"up": ColumnParallel("model"), "upper": ColumnParallel("model")}  # agreeing: fine
    assert parallelize(model, MESH8, plan).up.kernel[...].sharding.spec == P(None, "model")


class Tied(nnx.Module):
    def __init__(self, rngs):
        self.enc = nnx.Linear(16, 16, rngs=rngs)
        self.dec = nnx.Linear(16, 16, rngs=rngs)
        self.enc.kernel = self.dec.kernel  # one Param at 'dec.kernel' and 'enc.kernel'


def test_a_tied_kernel_planned_at_both_owners_is_named_as_shared():
    model = Tied(nnx.Rngs(0))
    before = snapshot(model)
    with pytest.raises(
        PlanError,
        match=r"'enc\.kernel' is the same nnx\.Param as 'dec\.kernel' "
        r"\(a shared, tied parameter\).*plan it there \('dec'\)",
    ):
        parallelize(model, MESH8, {"dec": ColumnParallel("model"), "enc": RowParallel("model")})
    assert snapshot(model) == before
    parallelize(model, MESH8, {"dec": ColumnParallel("model")})  # planned once: fine
    assert model.enc.kernel[...].sharding.spec == P(None, "model")
