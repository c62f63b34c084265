"""runtime/buckets.py: one collective per dtype for many arrays, equal to one per array."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat
from nnx_parallel.runtime import buckets
from nnx_parallel.views.collectives import collectives


def test_flat_collectives_equal_per_array_ones():
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    a = jnp.arange(8 * 4 * 6, dtype=jnp.float32).reshape(8 * 4, 6)  # gathered on dim 0
    b = jnp.arange(3 * 8 * 2, dtype=jnp.float32).reshape(3, 8 * 2)  # gathered on dim 1
    v = jnp.arange(8 * 5, dtype=jnp.float32)  # a vector, by all-reduce

    def body(a, b, v):
        ga, gb = buckets.all_gather([a, b], [0, 1], "x")
        (gv,) = buckets.psum_gather([v], [0], "x")
        sa, sb = buckets.reduce_scatter([ga, gb], [0, 1], "x", 8)
        ref = (
            jax.lax.all_gather(a, "x", axis=0, tiled=True),
            jax.lax.all_gather(b, "x", axis=1, tiled=True),
            jax.lax.all_gather(v, "x", axis=0, tiled=True),
            jax.lax.psum_scatter(ga, "x", scatter_dimension=0, tiled=True),
            jax.lax.psum_scatter(gb, "x", scatter_dimension=1, tiled=True),
        )
        return (ga, gb, gv, sa, sb), ref

    specs = (P("x"), P(None, "x"), P("x"))
    a, b, v = (jax.device_put(t, jax.NamedSharding(mesh, s)) for t, s in zip((a, b, v), specs))
    f = _compat.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P("x"), axis_names={"x"})
    with jax.set_mesh(mesh):
        lowered = jax.jit(f).lower(a, b, v)
        got, ref = jax.jit(f)(a, b, v)
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))
    ops = collectives(lowered.compile(), mesh)
    # ours: 1 all-gather (a and b), 1 all-reduce (v), 1 reduce-scatter; the
    # reference path: 3 all-gathers and 2 reduce-scatters.
    kinds = sorted(o.kind for o in ops)
    assert kinds.count("all-reduce") == 1 and kinds.count("reduce-scatter") == 3
    assert kinds.count("all-gather") == 4


def test_grouping_keeps_dtypes_apart():
    groups = buckets.by_key(
        [jnp.ones(2), jnp.ones(2, jnp.bfloat16), jnp.ones(3)], lambda x: x.dtype
    )
    assert list(groups.values()) == [[0, 2], [1]]
