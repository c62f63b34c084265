"""Plans that contradict themselves are refused at parallelize time (issue 24 a, j)."""

import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import nnx_parallel as npx
from nnx_parallel import FSDP, ColumnParallel, PlanError, RowParallel, Shard
from tests.helpers import assert_same, snapshot
from tests.models import MLP


def test_fsdp_and_tp_on_one_axis_is_refused(mesh8):
    # Before: accepted, then the first call raised a raw JAX error about P.UNCONSTRAINED.
    model = MLP(rngs=nnx.Rngs(0))
    before = snapshot(model)
    plan = {"": FSDP("model", min_size=1), "up": ColumnParallel("model"), "down": RowParallel()}
    match = (
        r"'down.kernel': RowParallel\('model'\) \(pattern 'down'\) and FSDP\('model'\) "
        r"\(pattern ''\) both use mesh axis 'model'.*Use two axes.*plans.combine"
    )
    with pytest.raises(PlanError, match=match):
        npx.parallelize(model, mesh8, plan)
    assert_same(before, snapshot(model))


def test_fsdp_batch_axes_on_the_tp_axis_is_refused(mesh2x4):
    plan = {"": FSDP("data", min_size=1, batch_axes=("data", "model")), "up": ColumnParallel()}
    with pytest.raises(PlanError, match=r"'up.kernel': ColumnParallel\('model'\).*'model'"):
        npx.resolve(MLP(rngs=nnx.Rngs(0)), mesh2x4, plan)


def test_fsdp_and_tp_on_two_axes_still_resolve(mesh2x4):
    tp = {"up": ColumnParallel("model"), "down": RowParallel("model")}
    res = npx.resolve(MLP(rngs=nnx.Rngs(0)), mesh2x4, npx.plans.combine(tp, FSDP("data", min_size=1)))
    assert res.specs()["up.kernel"] == P("data", "model")


def test_a_later_style_in_a_tuple_cannot_override_an_earlier_one(mesh2x4):
    # Before: the 'model' sharding was silently dropped for P(None, 'data').
    model = MLP(rngs=nnx.Rngs(0))
    before = snapshot(model)
    plan = {"up": (ColumnParallel("model"), ColumnParallel("data"))}
    match = (
        r"'up.kernel' \(pattern 'up'\): ColumnParallel\('data'\) wants P\(None, 'data'\), but "
        r"ColumnParallel\('model'\), earlier in the same plan, already gave it P\(None, 'model'\)"
        r".*change dim 1.*Shard\(kernel=P\('data', 'model'\)\)"
    )
    with pytest.raises(PlanError, match=match):
        npx.parallelize(model, mesh2x4, plan)
    assert_same(before, snapshot(model))


def test_tuples_that_add_axes_still_compose(mesh2x4):
    plan = {"up": (ColumnParallel("model"), FSDP("data", min_size=1)), "down": Shard()}
    specs = npx.resolve(MLP(rngs=nnx.Rngs(0)), mesh2x4, plan).specs()
    assert specs["up.kernel"] == P("data", "model") and specs["up.bias"] == P("model")


def test_changed_dim_and_short():
    from nnx_parallel.core.conflicts import changed_dim, short

    assert changed_dim(P(None, "a"), P("b", "a")) is None
    assert changed_dim(P(None, "a"), P("a", None)) == 0  # an axis moved to another dim
    assert changed_dim(None, P("a")) is None
    assert short(ColumnParallel("model")) == "ColumnParallel('model')"
    assert short(Shard()) == "Shard()"
