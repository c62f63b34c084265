"""`runtime/routes.py`: the route is a value, chosen by one pure function, and
`explain` agrees with what a trace records on every kind of model of the suite."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import nnx_parallel as npx
from nnx_parallel.core.layouts import get_hooks
from nnx_parallel.runtime import dispatch, trace
from nnx_parallel.runtime import routes as R
from tests import context_models as cm
from tests import models
from tests import moe_models as mm
from tests import real_models as rm


def _mesh(shape, names, kind):
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(names))


def _tp(model):
    return npx.plans.tensor_parallel(model)[0]


def _gpt():
    return models.GPT(rngs=nnx.Rngs(0))


def _tokens(b=8, t=16):
    return (jnp.arange(b * t).reshape(b, t) * 7) % 64


# (name, model factory, mesh shape and names, plan of the model, input factory)
CASES = [
    ("mlp-dp", lambda: models.MLP(rngs=nnx.Rngs(0)), (8,), ("data",), lambda m: npx.Replicated(),
     lambda: jnp.ones((8, 16))),
    ("mlp-fsdp", lambda: models.MLP(rngs=nnx.Rngs(0)), (8,), ("fsdp",),
     lambda m: npx.FSDP(min_size=16), lambda: jnp.ones((8, 16))),
    ("mlp-fsdp-odd-batch", lambda: models.MLP(rngs=nnx.Rngs(0)), (8,), ("fsdp",),
     lambda m: npx.FSDP(min_size=16), lambda: jnp.ones((3, 16))),
    ("gpt-tp", _gpt, (8,), ("model",), _tp, _tokens),
    ("gpt-fsdp-units", _gpt, (8,), ("fsdp",), lambda m: npx.FSDP(min_size=16), _tokens),
    ("gpt-fsdp-leaf-remat", _gpt, (8,), ("fsdp",),
     lambda m: {"": npx.FSDP(min_size=16, units="leaf"), "blocks.*": npx.Remat()}, _tokens),
    ("gpt-2d", _gpt, (2, 4), ("fsdp", "model"),
     lambda m: npx.plans.combine(_tp(m), npx.FSDP("fsdp", min_size=16)), _tokens),
    ("context-ring", lambda: cm.DPALM(rngs=nnx.Rngs(0)), (2, 4), ("data", "context"),
     lambda m: npx.plans.context_parallel(m, "context", strategy="ring")[0], None),
    ("context-mha", lambda: cm.MHALM(rngs=nnx.Rngs(0)), (2, 4), ("data", "context"),
     lambda m: npx.plans.context_parallel(m, "context")[0], None),
    ("moe-loop", lambda: mm.LoopMoE(rngs=nnx.Rngs(0)), (8,), ("expert",),
     lambda m: npx.ExpertParallel("expert"), lambda: jnp.ones((8, 4, mm.D))),
    ("moe-ragged", lambda: mm.RaggedMoE(rngs=nnx.Rngs(0)), (8,), ("expert",),
     lambda m: npx.ExpertParallel("expert"), lambda: jnp.ones((8, 4, mm.D))),
]  # fmt: skip


def _inputs(name, mesh):
    if name.startswith("context"):
        tokens = _tokens(4, 16) % 32
        return (npx.shard_batch(tokens, mesh, seq_axis="context"),)
    x = next(c[5] for c in CASES if c[0] == name)()
    axis = mesh.axis_names[0]
    if (
        axis != "model" and x.shape[0] % mesh.shape[axis] == 0
    ):  # the batch laid out as a data loader would
        x = jax.device_put(x, jax.NamedSharding(mesh, P(axis)))
    return (x,)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_explain_lists_every_route_a_trace_records(case, kind):
    """Trace a gradient; every (class, route) recorded is one the
    class's modules can take by `dispatch.possible` (what `explain` prints)."""
    name, factory, shape, names, plan_of, _ = case
    mesh = _mesh(shape, names, kind)
    model = factory()
    model = npx.parallelize(model, mesh, plan_of(model))
    args = _inputs(name, mesh)

    graphdef, state = nnx.split(model)

    def loss(state, *a):
        out = nnx.merge(graphdef, state)(*a)
        return jnp.sum(jnp.asarray(out if not isinstance(out, tuple) else out[0], jnp.float32))

    with jax.set_mesh(mesh), trace.recording() as log, _quiet():
        jax.eval_shape(jax.grad(loss), state, *args)
    assert log, "no hooked call was recorded"
    allowed = {}
    for _, node in nnx.iter_graph(model):
        hooks = get_hooks(node)
        if hooks is not None:
            for method in hooks.methods:
                allowed.setdefault(type(node).__name__, set()).update(
                    dispatch.possible(node, hooks, method)
                )
    for cls, method, route in log:
        assert route in allowed.get(cls, ()), (cls, method, route, allowed.get(cls))


class _quiet:
    """FallbackWarnings are part of some routes (an odd batch); not under test here."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", npx.FallbackWarning)

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)


def test_route_is_pure_and_a_value():
    mesh = _mesh((8,), ("fsdp",), jax.sharding.AxisType.Explicit)
    layer = npx.parallelize(nnx.Linear(16, 64, rngs=nnx.Rngs(0)), mesh, npx.FSDP(min_size=16))
    hooks = get_hooks(layer)
    before = jax.tree.map(lambda x: x, nnx.state(layer))
    t = trace.Trace()
    first = R.route(layer, hooks, t, (jnp.ones((8, 16)),), {})
    assert first == R.route(layer, hooks, t, (jnp.ones((8, 16)),), {}) == R.FSDP_SHARD_MAP
    assert t == trace.Trace()  # nothing written to the trace
    assert jax.tree.all(jax.tree.map(lambda a, b: a is b, before, nnx.state(layer)))
    assert R.route(layer, hooks, t, (jnp.ones((3, 16)),), {}) == R.FSDP_GSPMD  # odd batch
    assert R.route(layer, hooks, dataclasses.replace(t, probing=1)) == R.AS_WRITTEN
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.region = "manual"
    with pytest.raises(ValueError, match="not one of"):
        R.Route("everywhere")


def test_names_derive_from_the_choices():
    assert R.FSDP_SHARD_MAP_LAYOUT.name == "shard-map/gathered/constrained"
    assert R.EXPERTS_MANUAL.name == "experts manual/as-is/as-is"
    assert str(R.CONTEXT_AUTO_AXES) == "context auto-axes/as-is/resharded"
    assert {r.region for r in R.ROUTES} == set(R.REGIONS)
    assert {r.params for r in R.ROUTES} == set(R.PARAMS)
    assert {r.output for r in R.ROUTES} == set(R.OUTPUTS)


def test_guard_route_is_listed(kind):
    """The root's Explicit-axes guard: `wrapper:guard` is recorded only when
    it retries, and `explain` lists it on Explicit axes."""
    mesh = _mesh((8,), ("data",), kind)
    model = npx.parallelize(rm.TableReader(rngs=nnx.Rngs(0)), mesh, npx.Replicated())
    hooks = get_hooks(model)
    possible = dispatch.possible(model, hooks) if hooks is not None else ()
    explicit = kind == jax.sharding.AxisType.Explicit
    assert (R.GUARD in possible) == explicit
    ids = jnp.arange(8) % 16
    with jax.set_mesh(mesh), trace.recording() as log, _quiet():
        ids = jax.device_put(ids, jax.NamedSharding(mesh, P("data")))
        jax.eval_shape(lambda i: model(i), ids)
    assert (("GuardedTableReader", "__call__", R.GUARD) in log) == explicit
    for cls, method, route in log:
        if cls == type(model).__name__:
            assert route in possible


def test_hooked_calls_trace_at_most_twice_on_the_fsdp_route():
    """One shape pass and the real call (the FSDP batch analysis used to trace
    the call twice more, at the full and at the per-device batch)."""
    calls = [0]

    class Counted(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.Param(jax.random.normal(rngs.params(), (16, 64)))

        def __call__(self, x):
            calls[0] += 1
            return x @ self.w[...]

    mesh = _mesh((8,), ("fsdp",), jax.sharding.AxisType.Explicit)
    model = npx.parallelize(Counted(nnx.Rngs(0)), mesh, npx.FSDP(min_size=16))
    with jax.set_mesh(mesh), trace.recording() as log:
        jax.jit(lambda x: model(x)).trace(jnp.ones((8, 16)))
    assert [r for *_, r in log] == [R.FSDP_SHARD_MAP.name]
    assert calls[0] == 2


@pytest.mark.parametrize("kind", [jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto])
def test_hooked_calls_trace_at_most_twice_on_layout_routes(kind):
    """A module with an activation layout and an output rank the layer table does
    not know: one shape pass (`out_ndim`) and the real call, on both axis types."""
    calls = [0]

    class Proj(nnx.Module):
        def __init__(self, rngs):
            self.kernel = nnx.Param(jax.random.normal(rngs.params(), (16, 64)))

        def __call__(self, x):
            calls[0] += 1
            return (x @ self.kernel[...])[..., None, :]  # rank + 1: no static guess fits

    mesh = _mesh((8,), ("model",), kind)
    model = npx.parallelize(
        Proj(nnx.Rngs(0)), mesh, npx.Shard(kernel=P(None, "model"), output_spec=("model",))
    )
    x = jax.device_put(jnp.ones((8, 16)), jax.NamedSharding(mesh, P()))
    with jax.set_mesh(mesh), trace.recording() as log:
        out = jax.jit(lambda x: model(x)).trace(x).out_info
    assert out.shape == (8, 1, 64)
    assert len([r for *_, r in log if r != R.GUARD]) == 1
    assert calls[0] <= 2
