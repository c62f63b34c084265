"""Issue 14: models that run on Auto axes run on Explicit axes (the `kind` fixture).

Each test takes a model of `tests/real_models.py` written in one public style,
parallelizes it under a plan on a `('fsdp', 'model')` mesh of either axis
type, and checks the forward and the gradients of a loss against the
unsharded twin (jitted under the same mesh, batch replicated) within 1e-5,
the parameters' shardings, and the call routes taken (`dispatch.recording`).
"""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import nnx_parallel as npx
from nnx_parallel.runtime import dispatch
from nnx_parallel.runtime import routes as R
from nnx_parallel.views.collectives import collectives
from tests import real_models as rm
from tests.helpers import assert_trees_close, guard_warning


@pytest.fixture
def mesh(kind):
    return jax.make_mesh((2, 4), ("fsdp", "model"), axis_types=(kind, kind))


def _plan(name: str, model, mesh):
    if name == "dp":
        return npx.Replicated()
    if name == "fsdp":
        return npx.plans.fsdp("fsdp", min_size=64)
    tp = npx.plans.tensor_parallel(model, mesh=mesh)[0]
    return tp if name == "tp" else npx.plans.combine(tp, npx.FSDP("fsdp", min_size=64))


def _grads_and_out(model, x, loss):
    def f(m, x):
        out = m(x)
        return loss(out, x), out

    return nnx.jit(lambda m, x: nnx.grad(f, has_aux=True)(m, x))(model, x)


_REFERENCES: dict = {}


def _reference(key, make, mesh, x, loss):
    """The unsharded twin after one call: ((grads, out), model), once per key:
    the tests share them."""
    if key not in _REFERENCES:
        with jax.set_mesh(mesh):
            model = make()
            _REFERENCES[key] = _grads_and_out(model, x, loss), model
    return _REFERENCES[key]


def _run(make, plan_name, mesh, x, loss, ref_loss, batch_sharded=True, ref_key=None):
    """(model, (grads, out), routes) of the parallelized model, checked
    against its unsharded twin."""
    model = make()
    npx.parallelize(model, mesh, _plan(plan_name, model, mesh))
    expected = _reference(ref_key, make, mesh, x, ref_loss)[0]
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, jax.NamedSharding(mesh, jax.P("fsdp"))) if batch_sharded else x
        with dispatch.recording() as routes:
            got = _grads_and_out(model, xs, loss)
    assert_trees_close(got, expected)
    return model, got, {r for _, _, r in routes}


# Patterns 1, 5, 6: a GPT with nnx.Embed, its logits through cross_entropy ---------------

GPT_ROUTES = {
    "dp": {R.AS_WRITTEN.name, R.AS_WRITTEN.name, R.OUT_SHARDING.name},
    "fsdp": {R.AS_WRITTEN.name, R.FSDP_SHARD_MAP.name},
    "tp": {R.CONSTRAIN.name, R.OUT_SHARDING.name},
    "2d": {
        R.AS_WRITTEN.name,
        R.FSDP_SHARD_MAP.name,
        R.FSDP_SHARD_MAP_LAYOUT.name,
        R.FSDP_TP.name,
        R.FSDP_AUTO_AXES.name,
    },
}


@pytest.mark.parametrize("plan", ["dp", "fsdp", "2d"])  # TP alone: tests/test_losses.py
def test_gpt_cross_entropy(mesh, kind, plan):
    """Data parallel with batch-sharded ids into a replicated nnx.Embed (5),
    cross_entropy on logits that are replicated over 'model' under DP and
    FSDP (6), vocab-parallel under TP and FSDP x TP (1)."""
    tokens = jax.random.randint(jax.random.key(1), (8, 8), 0, 64)
    loss = lambda out, x: npx.cross_entropy(out, x, mesh, "model").mean()  # noqa: E731
    ref_loss = lambda out, x: optax.softmax_cross_entropy_with_integer_labels(out, x).mean()  # noqa: E731
    model, (grads, out), routes = _run(
        lambda: rm.MiniGPT(rngs=nnx.Rngs(0)), plan, mesh, tokens, loss, ref_loss, ref_key="gpt-ce"
    )
    assert routes and routes <= GPT_ROUTES[plan]
    assert ("fsdp" in model.up.kernel[...].sharding.spec) == (plan in ("fsdp", "2d"))
    assert ("model" in model.up.kernel[...].sharding.spec) == (plan in ("tp", "2d"))
    if kind == jax.sharding.AxisType.Explicit:
        assert out.sharding.spec[0] == "fsdp"  # the batch layout survives


def test_gpt_fsdp_tp_batch_not_dividing_fsdp(mesh, kind):
    """Pattern 1's fallback: batch 3 on fsdp=2 under FSDP x TP. On Explicit
    axes the GSPMD gathers run inside the `auto_axes` region of the layout."""
    tokens = jax.random.randint(jax.random.key(1), (3, 8), 0, 64)
    loss = lambda out, x: jnp.mean(out**2)  # noqa: E731
    with pytest.warns(npx.FallbackWarning, match="does not split over the batch axes"):
        _, _, routes = _run(
            lambda: rm.MiniGPT(rngs=nnx.Rngs(0)),
            "2d",
            mesh,
            tokens,
            loss,
            loss,
            batch_sharded=False,
            ref_key="gpt-b3",
        )
    auto_axes = kind == jax.sharding.AxisType.Explicit
    # Explicit: the layout's auto_axes region; its shard_map refuses the batch
    # and the retry gathers by constraints inside the same region.
    assert (R.FSDP_AUTO_AXES_GSPMD.name in routes) == auto_axes
    assert (R.FSDP_GSPMD_LAYOUT.name in routes) != auto_axes


# Pattern 7: the Flax GSPMD guide's layer stack, with its own sharding constraints --------


@pytest.mark.parametrize("plan", ["fsdp", "tp", "2d"])
def test_guide_stack_own_constraints(mesh, kind, plan):
    """`with_sharding_constraint(y, P('fsdp', None, 'model'))` (Auto) or
    `reshard` (Explicit) in each layer, `nnx.with_partitioning` params,
    `nnx.vmap` stack, raw `jax.lax.scan`. Under FSDP the layers take the
    GSPMD route (their code names the batch axis) and still gather."""
    explicit = kind == jax.sharding.AxisType.Explicit
    x = jax.random.normal(jax.random.key(1), (8, 4, 32))
    loss = lambda out, x: jnp.mean(out**2)  # noqa: E731

    def make():
        with nnx.use_eager_sharding(False):
            return rm.GuideStack(axes=("fsdp", "model"), reshard=explicit, rngs=nnx.Rngs(0))

    if plan == "tp":
        _, _, routes = _run(make, plan, mesh, x, loss, loss, ref_key=("guide", explicit))
        assert routes == set()  # no layer the auto-plan knows: the model's own specs stand
        return
    with pytest.warns(npx.FallbackWarning, match="refuses to run per batch shard"):
        model, _, routes = _run(make, plan, mesh, x, loss, loss, ref_key=("guide", explicit))
    assert routes == {R.FSDP_GSPMD.name}
    assert "fsdp" in model.layers.w1[...].sharding.spec
    with jax.set_mesh(mesh):
        compiled = nnx.jit(lambda m, x: m(x)).lower(model, x).compile()
    assert any(c.kind == "all-gather" for c in collectives(compiled, mesh))


# Patterns 2, 3, 4: model code that Explicit types refuse, retried in auto_axes ----------

MSE = lambda out, x: jnp.mean(out**2)  # noqa: E731
MODELS = {
    "table": lambda: rm.TableReader(rngs=nnx.Rngs(0)),  # 2: parent reads a child's table
    "encode": lambda: rm.EncodeLM(rngs=nnx.Rngs(0)),  # 3: custom `encode`, `input_embedding`
    "cache": lambda: rm.CachedAttention(rngs=nnx.Rngs(0)),  # 4: model-owned replicated cache
}


@pytest.mark.parametrize("plan", ["fsdp", "tp", "2d"])
@pytest.mark.parametrize("name", list(MODELS))
def test_model_code_explicit_types_refuse(mesh, kind, name, plan):
    """The ops JAX's Explicit types refuse in these models (a gather with no
    inferable output sharding; a replicated cache taking a batch-sharded
    `dynamic_update_slice`) are the user's, in the root's call: the guarded
    root traces that call again inside `auto_axes`. The plan's params stay
    sharded; the cache keeps its (replicated) layout and its contents."""
    explicit = kind == jax.sharding.AxisType.Explicit
    make = MODELS[name]
    x = jax.random.randint(jax.random.key(1), (8, 8), 0, 64)
    if name == "cache":
        x = jax.random.normal(jax.random.key(1), (8, 4, 32))
    with guard_warning(explicit):
        model, _, routes = _run(make, plan, mesh, x, MSE, MSE, ref_key=name)
    assert (R.GUARD in routes) == explicit
    specs = {p: v[...].sharding.spec for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert any("fsdp" in s for s in specs.values()) == (plan != "tp")
    assert any("model" in s for s in specs.values()) == (plan != "fsdp")
    if name == "cache":
        ref_model = _reference(name, make, mesh, x, MSE)[1]
        assert_trees_close(nnx.state(model, nnx.Cache), nnx.state(ref_model, nnx.Cache))
        if explicit:  # the layout it had: replicated
            assert model.cache.k[...].sharding.spec == jax.P(None, None, None, None)
        assert int(model.cache.index[...]) == 4


@pytest.mark.parametrize("plan", ["fsdp", "tp", "2d"])
def test_cache_list_passed_as_argument(mesh, kind, plan):
    """Pattern 4 with caller-owned caches (a list of `KVCache` modules as
    `cache=`): two decoding calls, the first under `nnx.grad`. The caches go
    into the `auto_axes` region as state and come back written, replicated."""
    explicit = kind == jax.sharding.AxisType.Explicit
    xs = jax.random.normal(jax.random.key(1), (2, 8, 4, 32))

    def steps(model, cache, x):
        def f(m, x, cache):
            out = m(x, cache=cache)
            return jnp.mean(out**2), out

        grads, out = nnx.grad(f, has_aux=True)(model, x[0], cache)
        return grads, out, model(x[1], cache=cache)

    def decode(model, x):
        cache = model.init_cache(batch=8, max_len=8)
        return nnx.jit(steps)(model, cache, x), cache

    with jax.set_mesh(mesh):
        expected, ref_cache = decode(rm.CacheListLM(layers=1, rngs=nnx.Rngs(0)), xs)
    model = rm.CacheListLM(layers=1, rngs=nnx.Rngs(0))
    npx.parallelize(model, mesh, _plan(plan, model, mesh))
    with jax.set_mesh(mesh):
        xs = jax.device_put(xs, jax.NamedSharding(mesh, jax.P(None, "fsdp")))
        with dispatch.recording() as routes, guard_warning(explicit):
            got, cache = decode(model, xs)
    assert_trees_close(got, expected)
    assert_trees_close(nnx.state(cache), nnx.state(ref_cache))
    assert (R.GUARD in {r for _, _, r in routes}) == explicit
    assert [int(c.index[...]) for c in cache] == [8]
    if explicit:
        assert cache[0].k[...].sharding.spec == jax.P(None, None, None, None)


def test_guard_cost_of_a_replicated_cache():
    """Explicit axes, FSDP: the guarded step with the replicated cache gathers
    the new keys and values (2 x 4,096 B over 'fsdp') on top of the four
    parameter gathers; with the cache laid out like the batch it stays on the
    typed path and has the parameter gathers only."""
    mesh = jax.make_mesh((2, 4), ("fsdp", "model"))
    x = jax.random.normal(jax.random.key(1), (8, 4, 32))
    gathers = {}
    for laid in (False, True):
        model = rm.CachedAttention(rngs=nnx.Rngs(0))
        npx.parallelize(model, mesh, _plan("fsdp", model, mesh))
        if laid:
            batch = jax.NamedSharding(mesh, jax.P("fsdp"))
            caches = nnx.state(model, nnx.Cache)
            nnx.update(
                model, jax.tree.map(lambda c: jax.device_put(c, batch) if c.ndim else c, caches)
            )
        with jax.set_mesh(mesh), dispatch.recording() as routes, guard_warning(not laid):
            xs = jax.device_put(x, jax.NamedSharding(mesh, jax.P("fsdp")))
            compiled = nnx.jit(lambda m, x: m(x)).lower(model, xs).compile()
        assert (R.GUARD in {r for _, _, r in routes}) == (not laid)
        ops = collectives(compiled, mesh)
        assert {c.kind for c in ops} == {"all-gather"} and {c.axes for c in ops} == {("fsdp",)}
        gathers[laid] = sorted((c.shape.split("{")[0], c.size) for c in ops)
    params = [("f32[32,32]", 4096)] * 4
    assert gathers[True] == params
    assert gathers[False] == sorted(params + [("f32[8,4,4,8]", 4096)] * 2)
