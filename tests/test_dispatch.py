"""One test per named call-time route (see `nnx_parallel.runtime.routes`) and per retry.

Each test builds the smallest model that takes the route, checks with
`dispatch.recording()` that it was taken, and compares the output with the
unsharded model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import nnx_parallel as npx
from nnx_parallel.runtime import dispatch, trace
from nnx_parallel.runtime import routes as R
from tests import models
from tests.helpers import assert_allclose as _assert_close
from tests.helpers import guard_warning

AUTO, EXPLICIT = AxisType.Auto, AxisType.Explicit


def _mesh(shape, names, kind):
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(names))


def _routes(model, mesh, *args, **kwargs):
    """(output, routes taken) of one jitted forward call under `mesh`."""
    with dispatch.recording() as routes, jax.set_mesh(mesh):
        out = jax.jit(lambda *a: model(*a, **kwargs))(*args)
    return out, [r for _, _, r in routes]


def _twin(factory, mesh, plan):
    ref = factory()
    return ref, npx.parallelize(factory(), mesh, plan)


X = jax.random.normal(jax.random.key(0), (8, 16), jnp.float32)


def test_every_route_is_named_once():
    names = [r.name for r in R.ROUTES]
    assert len(set(names)) == len(names) == 22
    assert not set(names) & set(R.WRAPPERS)
    for retry in dispatch.RETRIES:  # every retry goes from a route to a route
        assert {retry.source, retry.target} <= set(names) | {R.GUARD}, retry


def test_nothing_recorded_while_probing():
    layer = npx.parallelize(
        nnx.Linear(16, 64, rngs=nnx.Rngs(0)), _mesh((8,), ("fsdp",), AUTO), npx.FSDP(min_size=16)
    )
    with dispatch.recording() as routes, trace.probe():
        jax.eval_shape(lambda x: layer(x), X)
    assert routes == []


def test_layout_constrain_on_auto_axes():
    mesh = _mesh((8,), ("model",), AUTO)
    ref, layer = _twin(lambda: nnx.Linear(16, 64, rngs=nnx.Rngs(0)), mesh, npx.ColumnParallel())
    out, routes = _routes(layer, mesh, X)
    assert routes == [R.CONSTRAIN.name]
    _assert_close(out, ref(X))


def test_layout_out_sharding_on_explicit_axes():
    mesh = _mesh((8,), ("model",), EXPLICIT)
    ref, layer = _twin(lambda: nnx.Linear(16, 64, rngs=nnx.Rngs(0)), mesh, npx.ColumnParallel())
    out, routes = _routes(layer, mesh, X)
    assert routes == [R.OUT_SHARDING.name]
    assert out.sharding.spec == P(None, "model")
    _assert_close(out, ref(X))


def test_layout_caller_out_sharding_wins():
    mesh = _mesh((8,), ("model",), EXPLICIT)
    ref, layer = _twin(lambda: nnx.Linear(16, 64, rngs=nnx.Rngs(0)), mesh, npx.ColumnParallel())
    out, routes = _routes(layer, mesh, X, out_sharding=P(None, None))
    assert routes == [R.CALLER.name]
    assert out.sharding.spec == P(None, None)  # the plan's layout would be P(None, 'model')
    _assert_close(out, ref(X))


def test_layout_auto_axes_for_a_layer_without_out_sharding():
    mesh = _mesh((8,), ("model",), EXPLICIT)
    ref, norm = _twin(lambda: nnx.LayerNorm(16, rngs=nnx.Rngs(0)), mesh, npx.SequenceParallel())
    x = X.reshape(1, 8, 16)
    out, routes = _routes(norm, mesh, x)
    assert routes == [R.AUTO_AXES.name]
    assert out.sharding.spec == P(None, "model", None)
    _assert_close(out, ref(x))


def test_layout_as_written_without_an_output_layout():
    mesh = _mesh((8,), ("model",), AUTO)
    plan = npx.Shard(kernel=P(None, None), input_spec=(None,))
    ref, layer = _twin(lambda: nnx.Linear(16, 64, rngs=nnx.Rngs(0)), mesh, plan)
    out, routes = _routes(layer, mesh, X)
    assert routes == [R.AS_WRITTEN.name]
    _assert_close(out, ref(X))


@pytest.mark.parametrize("kind", [AUTO, EXPLICIT], ids=["auto", "explicit"])
def test_fsdp_shard_map(kind):
    mesh = _mesh((8,), ("fsdp",), kind)
    ref, mlp = _twin(lambda: models.MLP(rngs=nnx.Rngs(0)), mesh, npx.FSDP(min_size=16))
    out, routes = _routes(mlp, mesh, X)
    assert routes == [R.FSDP_SHARD_MAP.name] * 2
    _assert_close(out, ref(X))


def test_fsdp_gspmd_fallback_on_an_indivisible_batch(monkeypatch):
    mesh = _mesh((8,), ("fsdp",), AUTO)
    ref, layer = _twin(lambda: nnx.Linear(16, 64, rngs=nnx.Rngs(0)), mesh, npx.FSDP(min_size=16))
    with pytest.warns(npx.FallbackWarning, match="does not split over the batch axes"):
        out, routes = _routes(layer, mesh, X[:3])
    assert routes == [R.FSDP_GSPMD.name]
    _assert_close(out, ref(X[:3]))


class _Scaled(nnx.Module):
    """A module with a parameter of its own around a child layer."""

    def __init__(self, rngs):
        self.scale = nnx.Param(jnp.linspace(0.5, 1.5, 64))
        self.inner = nnx.Linear(16, 64, rngs=rngs)

    def __call__(self, x):
        return self.inner(x) * self.scale[...].reshape(1, -1)


def test_fsdp_nested_inside_a_gathered_parent():
    mesh = _mesh((8,), ("fsdp",), AUTO)
    ref, model = _twin(lambda: _Scaled(nnx.Rngs(0)), mesh, npx.FSDP(min_size=16))
    out, routes = _routes(model, mesh, X)
    # The parent's batch probe traces the child with hooks aside and records
    # nothing; then the child runs inside the parent's shard_map.
    assert routes == [R.FSDP_SHARD_MAP.name, R.FSDP_NESTED.name]
    _assert_close(out, ref(X))


@pytest.mark.parametrize("kind", [AUTO, EXPLICIT], ids=["auto", "explicit"])
def test_fsdp_tp_manual_region(kind):
    mesh = _mesh((2, 4), ("fsdp", "model"), kind)
    tp = {"up": npx.ColumnParallel("model"), "down": npx.RowParallel("model")}
    plan = npx.plans.combine(tp, npx.FSDP("fsdp", min_size=16))
    ref, mlp = _twin(lambda: models.MLP(rngs=nnx.Rngs(0)), mesh, plan)
    out, routes = _routes(mlp, mesh, X)
    assert routes == [R.FSDP_TP.name] * 2
    _assert_close(out, ref(X))


def test_fsdp_auto_axes_for_a_layout_layer_on_explicit_axes():
    mesh = _mesh((2, 4), ("fsdp", "model"), EXPLICIT)
    plan = {"": npx.FSDP("fsdp", min_size=4), "norm": npx.SequenceParallel("model")}

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.norm = nnx.LayerNorm(16, rngs=rngs)

        def __call__(self, x):
            return self.norm(x)

    ref, net = _twin(lambda: Net(nnx.Rngs(0)), mesh, plan)
    x = X.reshape(2, 4, 16)
    out, routes = _routes(net, mesh, x)
    assert routes == [R.FSDP_AUTO_AXES.name]
    _assert_close(out, ref(x))


class _OwnConstraint(nnx.Module):
    """A layer that lays out its own activation on the batch axis (as
    Flax's GSPMD guide writes it): `reshard` on Explicit axes, a sharding
    constraint on Auto."""

    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (16, 64)))

    def __call__(self, x):
        y = x @ self.w[...]
        if jax.sharding.get_abstract_mesh().axis_types[0] == EXPLICIT:
            return jax.sharding.reshard(y, P("fsdp", None))
        return jax.lax.with_sharding_constraint(y, P("fsdp", None))


@pytest.mark.parametrize("kind", [AUTO, EXPLICIT], ids=["auto", "explicit"])
def test_fsdp_own_sharding_takes_the_gspmd_route(kind, monkeypatch):
    mesh = _mesh((8,), ("fsdp",), kind)
    x = jnp.tile(X, (8, 1))  # 8 rows a device: the shape probe's batch splits over 'fsdp' too
    with jax.set_mesh(mesh):
        expected = jax.jit(lambda x: _OwnConstraint(nnx.Rngs(0))(x))(x)
    model = npx.parallelize(_OwnConstraint(nnx.Rngs(0)), mesh, npx.FSDP(min_size=16))
    with pytest.warns(npx.FallbackWarning, match="refuses to run per batch shard"):
        out, routes = _routes(model, mesh, x)
    assert routes == [R.FSDP_GSPMD.name]
    assert model.w[...].sharding.spec == P(None, "fsdp")
    _assert_close(out, expected)


class _Refused(nnx.Module):
    """Counts its calls, then reads rows of its replicated table by batch-sharded
    ids without an `out_sharding`: Explicit types refuse that gather."""

    def __init__(self, rngs):
        self.table = nnx.Param(jax.random.normal(rngs.params(), (64, 16)))
        self.proj = nnx.Linear(16, 16, rngs=rngs)
        self.calls = nnx.Cache(jnp.array(0, jnp.int32))

    def __call__(self, ids):
        self.calls[...] += 1
        return self.proj(self.table[...].at[ids].get(out_sharding=None))


class ShardingTypeError(Exception):
    """Matched by name, like JAX's own (private) class."""


class _AlwaysRefused(_Refused):
    def __call__(self, ids):
        raise ShardingTypeError("refused everywhere")


class _Broken(_Refused):
    def __call__(self, ids):
        raise ValueError("a bug of the model's own")


def _guarded_call(factory, kind):
    mesh = _mesh((8,), ("data",), kind)
    ids = jnp.arange(8) % 64
    model = npx.parallelize(factory(nnx.Rngs(0)), mesh, npx.Replicated())
    with dispatch.recording() as routes, jax.set_mesh(mesh):
        ids = jax.device_put(ids, jax.NamedSharding(mesh, P("data")))
        out = nnx.jit(lambda m, ids: m(ids))(model, ids)
    return model, out, [r for _, _, r in routes]


@pytest.mark.parametrize("kind", [AUTO, EXPLICIT], ids=["auto", "explicit"])
def test_guard_auto_axes_retries_what_explicit_types_refuse(kind, monkeypatch):
    ref = _Refused(nnx.Rngs(0))
    expected = ref.proj(ref.table[...][jnp.arange(8) % 64])
    with guard_warning(kind == EXPLICIT):
        model, out, routes = _guarded_call(_Refused, kind)
    if kind == EXPLICIT:
        assert routes[0] == R.GUARD and routes.count(routes[0]) == 1
        assert out.sharding.spec == P("data", None)  # batch-sharded like the ids
    else:
        assert R.GUARD not in routes
    _assert_close(out, expected)
    assert int(model.calls[...]) == 1  # the refused trace's write was taken back


def test_guard_reports_the_refusal_when_the_retry_fails_too(monkeypatch):
    with pytest.warns(npx.FallbackWarning), pytest.raises(ShardingTypeError) as info:
        _guarded_call(_AlwaysRefused, EXPLICIT)
    assert "the retry inside auto_axes failed too" in "\n".join(info.value.__notes__)


def test_guard_leaves_other_errors_alone():
    with pytest.raises(ValueError, match="a bug of the model's own") as info:
        _guarded_call(_Broken, EXPLICIT)
    assert "auto_axes" not in "\n".join(getattr(info.value, "__notes__", []))
