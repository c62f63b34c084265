"""`estimate` and `plans.auto`: predicted per-device memory against real compiles."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import nnx_parallel as npx
from nnx_parallel import zero
from tests.test_remat import Net

PEAK_TOL = 0.05  # the bound on |predicted / real - 1|


def real_peak(plan, mesh, x, batch_axes, *, zero_axis=None, tx=None):
    """Peak bytes of the train step compiled on a real parallelized model, written
    here as a training loop writes it (not `estimate`'s own step)."""
    model = npx.parallelize(Net(n=2, rngs=nnx.Rngs(0)), mesh, plan)
    opt = npx.ShardedOptimizer(model, optax.adam(1e-3) if tx is None else tx, wrt=nnx.Param)

    def loss(m, x):
        return jnp.mean(m(x) ** 2)

    grad_fn = (
        nnx.value_and_grad(loss) if zero_axis is None else zero.value_and_grad(loss, axis=zero_axis)
    )

    @nnx.jit(donate_argnums=(0, 1))
    def step(model, opt, x):
        value, grads = grad_fn(model, x)
        opt.update(model, grads)
        return value

    spec = P(batch_axes if len(batch_axes) > 1 else batch_axes[0]) if batch_axes else P()
    with jax.set_mesh(mesh):
        compiled = step.lower(model, opt, jax.device_put(x, NamedSharding(mesh, spec))).compile()
    m = compiled.memory_analysis()
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    return model, peak, npx.communication_report(compiled, mesh=mesh)


@pytest.mark.parametrize(
    "name, kind",
    [("fsdp+remat", AxisType.Auto), ("zero2", AxisType.Explicit)],
    ids=["fsdp+remat-auto", "zero2-explicit"],
)
def test_estimate_matches_the_real_compiled_step(name, kind):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(kind,))
    x = jax.random.normal(jax.random.key(0), (16, 32))
    plans = {
        "fsdp+remat": {"": npx.FSDP("data", min_size=64), "blocks.*": npx.Remat()},
        "zero2": {"": npx.ZeRO(2, axis="data", min_size=64)},
    }
    plan = plans[name]
    model, peak, comm = real_peak(
        plan, mesh, x, ("data",), zero_axis="data" if name == "zero2" else None
    )
    # The model is already parallelized (and concrete): estimate works on a fresh abstract copy.
    est = npx.estimate(model, mesh, plan, jax.ShapeDtypeStruct(x.shape, x.dtype))
    assert abs(est.peak_bytes / peak - 1) <= PEAK_TOL, (est.peak_bytes, peak)
    assert (
        est.peak_bytes == est.argument_bytes + est.output_bytes + est.temp_bytes - est.alias_bytes
    )
    assert est.alias_bytes > 0  # model and optimizer are donated
    assert est.wire_bytes == pytest.approx(comm.total.traffic)
    kinds = {
        "fsdp+remat": {"all-gather", "reduce-scatter", "all-reduce"},
        "zero2": {"reduce-scatter", "all-reduce", "all-gather"},
    }
    assert set(est.wire_by_kind) == kinds[name]
    assert sum(est.wire_by_axis.values()) == pytest.approx(est.wire_bytes)
    text = str(est)
    assert "peak" in text and "wire bytes per step" in text and "reduce-scatter  data" in text


def test_estimate_allocates_nothing():
    # A 64 GiB layer (float32 2^17 x 2^17): far more than this machine holds.
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))

    def factory():
        return nnx.Linear(2**17, 2**17, use_bias=False, rngs=nnx.Rngs(0))

    est = npx.estimate(
        factory,
        mesh,
        npx.plans.fsdp(),
        jax.ShapeDtypeStruct((8, 2**17), jnp.float32),
        optimizer=optax.sgd(0.1),
    )
    shard = 2**34 * 4 // 8  # this device's 1/8 of the kernel
    assert shard <= est.argument_bytes < shard + 2**20
    assert est.wire_by_kind["all-gather"] == pytest.approx(2**36 * 7 / 8)


def test_estimate_errors(mesh8):
    x = jax.ShapeDtypeStruct((6, 32), jnp.float32)
    with pytest.raises(
        npx.PlanError, match=r"shape \(6, 32\) does not split over the batch axes \('model',\)"
    ):
        npx.estimate(
            lambda: Net(n=2, rngs=nnx.Rngs(0)),
            mesh8,
            {"": npx.Replicated()},
            x,
            batch_axes=("model",),
        )
    with pytest.raises(npx.PlanError, match="matched no module"):
        npx.estimate(
            lambda: Net(n=2, rngs=nnx.Rngs(0)), mesh8, {"block.*": npx.Remat()}, x, batch_axes=()
        )


# plans.auto -------------------------------------------------------------------------


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


def test_estimate_batch_layouts(mesh2x4):
    from nnx_parallel.memory import _abstract_batch

    x = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh2x4, P(None, "model")))
    assert _abstract_batch(x, mesh2x4, None).sharding.spec == P(None, "model")  # kept
    sds = jax.ShapeDtypeStruct((8, 4), jnp.float32)
    assert _abstract_batch(sds, mesh2x4, None).sharding.spec == P("data")  # batch_spec(mesh)
    assert _abstract_batch(sds, mesh2x4, ("data", "model")).sharding.spec == P(("data", "model"))
    assert _abstract_batch(sds, mesh2x4, ()).sharding.spec == P()
