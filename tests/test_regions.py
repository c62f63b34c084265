"""`runtime/regions.py`: the auto_axes region, its output and state layouts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from nnx_parallel.runtime import regions


class _Counter(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.ones((4, 4)))
        self.calls = nnx.Cache(jnp.zeros((), jnp.int32))

    def __call__(self, x):
        self.calls[...] += 1
        return x @ self.w[...], jnp.sum(x)


def test_outputs_batch_like_and_state_written_back():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    m = _Counter()
    with jax.set_mesh(mesh):
        x = jax.device_put(jnp.ones((8, 4)), jax.NamedSharding(mesh, P("data")))
        y, total = regions.auto_axes_call(m, lambda mod, a: mod(a), mesh, (x,), {})
    assert y.sharding.spec == P("data", None)  # leading dim like the input's
    assert total.sharding.spec == P()  # no batch dim: replicated
    assert int(m.calls[...]) == 1
    assert regions.active(mesh)


def test_given_output_specs():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    m = _Counter()
    with jax.set_mesh(mesh):
        x = jax.device_put(jnp.ones((8, 4)), jax.NamedSharding(mesh, P("data")))
        y = regions.auto_axes_call(m, lambda mod, a: mod(a)[0], mesh, (x,), {}, out_specs=P(None, None))
    assert all(e is None for e in y.sharding.spec)  # as given, not batch-like
    assert not regions.active(jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,)))
