"""nnx_parallel.runtime.layout: activation specs at call time on Auto and Explicit axes."""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat
from nnx_parallel.runtime.layout import (
    constrain,
    drop_manual,
    explicit_here,
    full_spec,
    out_ndim,
    type_spec,
)


def _mesh(kind):
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind,) * 2)


def test_full_spec_leading_dims_follow_the_axis_type():
    auto, explicit = _mesh(AxisType.Auto), _mesh(AxisType.Explicit)
    x = jnp.zeros((8, 4, 16))
    assert full_spec(x, (None, "model"), auto) == P(P.UNCONSTRAINED, None, "model")
    assert not explicit_here(auto)
    with jax.set_mesh(explicit):
        y = jax.device_put(x, NamedSharding(explicit, P("data", None, None)))
        assert explicit_here(explicit) and type_spec(y) == ("data", None, None)
        # Explicit: leading dims keep the input's batch layout; the rank can change.
        assert full_spec(y, ("model",), explicit, out_ndim=2) == P("data", "model")


def test_constrain_reshards_on_explicit_axes_and_constrains_on_auto():
    for kind in (AxisType.Explicit, AxisType.Auto):
        mesh = _mesh(kind)

        @jax.jit
        def f(x):
            return constrain(x * 2, P("data", "model"), mesh)

        with jax.set_mesh(mesh):
            out = f(jnp.ones((8, 16)))
        assert out.sharding.spec == P("data", "model"), kind


def test_drop_manual_inside_a_shard_map():
    mesh = _mesh(AxisType.Explicit)
    seen = []

    def body(x):
        seen.append(drop_manual(P("data", "model")))
        return x

    with jax.set_mesh(mesh):
        x = jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P("data")))
        jax.jit(
            _compat.shard_map(
                body, mesh=mesh, in_specs=P("data"), out_specs=P("data"), axis_names={"data"}
            )
        )(x)
    assert seen == [P(None, "model")]
    assert drop_manual(P("data", "model")) == P("data", "model")  # outside: unchanged


def test_out_ndim_traces_the_call_or_falls_back_to_the_guess():
    class Sum(nnx.Module):
        def __call__(self, x):
            return x.sum(-1)

    class Broken(nnx.Module):
        def __call__(self, x):
            raise RuntimeError("no")

    x = jnp.ones((2, 3, 4))
    assert out_ndim(Sum(), type(Sum()).__call__, (x,), {}, guess=3) == 2
    assert out_ndim(Broken(), type(Broken()).__call__, (x,), {}, guess=3) == 3
