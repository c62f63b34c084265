"""nnx_parallel.runtime.gather: FSDP's grouped gathers, the CSE tie and the reduce-scatter."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat
from nnx_parallel.runtime.gather import GatherPlan, gather_leaves, gathered_call, is_vector, tie

MESH = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Explicit,))
W = jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8)
B = jnp.arange(16, dtype=jnp.float32)
X = jnp.ones((8, 16), jnp.float32)


def _manual(f, in_specs, out_specs):
    return _compat.shard_map(
        f, mesh=MESH, in_specs=in_specs, out_specs=out_specs, axis_names={"fsdp"}
    )


def test_gather_leaves_rebuilds_matrices_and_vectors():
    plan = GatherPlan(dims=(0, 0, None), axes=("fsdp",))

    def f(w, b, s):
        full = gather_leaves([w, b, s], plan)
        return full[0], full[1], full[2]

    put = lambda v, spec: jax.device_put(v, NamedSharding(MESH, spec))  # noqa: E731
    # Each device's gathered copy, stacked on dim 0 (8 copies).
    w, b, s = jax.jit(_manual(f, (P("fsdp"), P("fsdp"), P()), (P("fsdp"), P("fsdp"), P())))(
        put(W, P("fsdp")), put(B, P("fsdp")), put(jnp.float32(3.0), P())
    )
    np.testing.assert_array_equal(w, np.tile(W, (8, 1)))
    np.testing.assert_array_equal(b, np.tile(B, 8))
    assert float(s) == 3.0  # a leaf without a dim is used as it is
    assert is_vector(B) and not is_vector(W)


def test_tie_adds_an_exact_zero():
    leaves = tie([W, jnp.arange(3)], jnp.array([jnp.nan, 1.0]))
    np.testing.assert_array_equal(leaves[0], W)  # NaN in the dependency still gives 0
    assert leaves[1].dtype == jnp.int32  # non-float leaves pass through


def test_gathered_call_forward_and_gradient_match_the_whole_computation():
    plan = GatherPlan(dims=(0,), axes=("fsdp",), batch_axes=("fsdp",))

    def loss_sharded(w, x):
        def body(w, x):
            y, _ = gathered_call(lambda full, xs: xs @ full[0], [w], x, plan)
            return jnp.sum(y**2)[None]

        return jnp.sum(_manual(body, (P("fsdp"), P("fsdp")), P("fsdp"))(w, x))

    w = jax.device_put(W / 100, NamedSharding(MESH, P("fsdp")))
    x = jax.device_put(X, NamedSharding(MESH, P("fsdp")))
    value, grad = jax.jit(jax.value_and_grad(loss_sharded))(w, x)
    want, want_grad = jax.value_and_grad(lambda w: jnp.sum((X @ w) ** 2))(W / 100)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5)
    assert grad.sharding.spec == P("fsdp", None)  # the gradient comes back as a shard
