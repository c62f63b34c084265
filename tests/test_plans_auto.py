"""`plans.auto` (nnx_parallel.plans._auto): the plan that fits a memory budget."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import nnx_parallel as npx
from tests.test_memory import PEAK_TOL, real_peak
from tests.test_remat import Net

MESH = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
SGD = optax.sgd(0.1)  # fewer ops to compile than Adam (estimate's tests cover the default)
BATCH = jax.ShapeDtypeStruct((16, 32), jnp.float32)


def factory():
    return Net(n=2, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def generous():
    # Compiles every candidate once; later calls with other budgets reuse them.
    return npx.plans.auto(factory, MESH, BATCH, budget_bytes=10**12, optimizer=SGD)


def test_auto_generous_budget_picks_fewest_wire_bytes(generous):
    plan, report = generous
    names = [c.name for c in report.candidates]
    assert names == [
        f"{n}{r}" for n in ("dp", "fsdp", "tp", "zero1", "zero2") for r in ("", "+remat")
    ]
    assert report.blocks == ("blocks.*",) and all(c.fits for c in report.candidates)
    best = min(report.candidates, key=lambda c: (c.wire_bytes, c.peak_bytes))
    assert report.chosen is best and plan is best.plan and best.name == "tp"
    assert all(
        c.wire_bytes > best.wire_bytes
        for c in report.candidates
        if c is not best and c.name != "tp+remat"
    )
    text = str(report)
    assert "<- chosen" in text and text.count("\n") >= 12 and "tp+remat" in text


def test_auto_half_of_data_parallel_peak(generous):
    _, first = generous
    dp = next(c for c in first.candidates if c.name == "dp")
    budget = dp.peak_bytes // 2
    plan, report = npx.plans.auto(factory, MESH, BATCH, budget_bytes=budget, optimizer=SGD)
    chosen = report.chosen
    assert chosen.fits and chosen.peak_bytes <= budget < dp.peak_bytes
    fewer_wire = [
        c
        for c in report.candidates
        if (c.wire_bytes, c.peak_bytes) < (chosen.wire_bytes, chosen.peak_bytes)
    ]
    assert all(not c.fits for c in fewer_wire)
    x = jax.random.normal(jax.random.key(0), BATCH.shape)
    zero_axis = "data" if chosen.name.startswith("zero2") else None
    _, peak, _ = real_peak(plan, MESH, x, chosen.batch_axes, zero_axis=zero_axis, tx=SGD)
    assert abs(chosen.peak_bytes / peak - 1) <= PEAK_TOL, (chosen.name, chosen.peak_bytes, peak)


def test_auto_impossible_budget_names_the_smallest_peak(generous):
    _, first = generous
    best = min(first.candidates, key=lambda c: c.peak_bytes)
    match = rf"budget_bytes=1 .*smallest peak is {best.peak_bytes:,} B .*with '{best.name}'"
    with pytest.raises(npx.PlanError, match=match):
        npx.plans.auto(factory, MESH, BATCH, budget_bytes=1, optimizer=SGD)


def test_auto_errors():
    mesh3 = jax.make_mesh((2, 2, 2), ("a", "b", "c"), axis_types=(AxisType.Auto,) * 3)
    with pytest.raises(npx.PlanError, match="1-D and 2-D meshes"):
        npx.plans.auto(factory, mesh3, BATCH, budget_bytes=10**9)
    with pytest.raises(npx.PlanError, match="expects an nnx.Module or a factory"):
        npx.plans.auto(3, MESH, BATCH, budget_bytes=10**9)


def test_auto_candidates_on_a_2d_mesh_and_repeated_blocks(mesh2x4):
    from nnx_parallel.plans._auto import _candidates, repeated_blocks
    from tests.models import GPT

    gpt = nnx.eval_shape(lambda: GPT(rngs=nnx.Rngs(0)))
    assert repeated_blocks(gpt) == ("blocks.*",)
    found = {name: (plan, axes) for name, plan, axes in _candidates(gpt, mesh2x4)}
    assert list(found) == ["dp", "fsdp", "fsdp x tp"]
    assert found["dp"][1] == found["fsdp"][1] == ("data", "model") and found["fsdp x tp"][1] == (
        "data",
    )
    specs = npx.resolve(gpt, mesh2x4, found["fsdp x tp"][0]).specs()
    assert specs["blocks.0.mlp.up.kernel"] == P(
        "data", "model"
    )  # TP over 'model', FSDP over 'data'
    nested = nnx.eval_shape(lambda: nnx.List([Net(n=2, rngs=nnx.Rngs(0)) for _ in range(2)]))
    assert repeated_blocks(nested) == ("*",)  # the outer list; its entries' lists are inside


def test_an_expert_axis_adds_expert_parallel_candidates():
    from nnx_parallel.plans._auto import _candidates
    from tests import moe_models as mm
    from tests.models import GPT

    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(AxisType.Auto,) * 2)
    moe = nnx.eval_shape(lambda: mm.MoEGPT(rngs=nnx.Rngs(0)))
    found = {name: (plan, axes) for name, plan, axes in _candidates(moe, mesh)}
    assert list(found) == ["dp", "fsdp", "ep", "ep x fsdp"]  # no TP over the expert axis
    assert found["ep"] == ({"blocks.*.moe": npx.ExpertParallel("expert")}, ("data", "expert"))
    specs = npx.resolve(moe, mesh, found["ep x fsdp"][0]).specs()
    assert specs["blocks.0.moe.down_proj"][0] == "expert"  # experts spread
    assert "data" in tuple(specs["blocks.0.attn.q.kernel"])  # the rest FSDP over 'data'
    one_d = jax.make_mesh((8,), ("expert",), axis_types=(AxisType.Auto,))
    names = [name for name, *_ in _candidates(moe, one_d)]
    assert names[-1] == "ep" and "ep x fsdp" not in names  # FSDP over 'expert' would clash
    dense = nnx.eval_shape(lambda: GPT(rngs=nnx.Rngs(0)))
    assert not {"ep", "ep x fsdp"} & {name for name, *_ in _candidates(dense, mesh)}


def test_auto_picks_expert_parallelism_for_a_moe_model_when_it_moves_least():
    from tests import moe_models as mm

    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(AxisType.Auto,) * 2)
    tokens = jax.ShapeDtypeStruct((16, 16), jnp.int32)

    def loss(model, t):
        return model(t).astype(jnp.float32).mean()

    plan, report = npx.plans.auto(
        lambda: mm.MoEGPT(layers=1, rngs=nnx.Rngs(0)), mesh, tokens,
        budget_bytes=10**12,
        loss_fn=loss, optimizer=SGD,
    )  # fmt: skip
    by = {c.name: c for c in report.candidates}
    assert report.chosen.name == "ep x fsdp"
    assert by["ep x fsdp"].wire_bytes < min(by[n].wire_bytes for n in ("dp", "fsdp", "ep"))
    assert plan == by["ep x fsdp"].plan
