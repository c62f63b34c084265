"""runtime/pruning.py: equations with known-zero results are dropped, live
results are exactly those of the full evaluation."""

import jax
import jax.numpy as jnp
import numpy as np

from nnx_parallel.runtime import pruning


def _expert_sum(x, w0, w1, b1):
    """Two experts of a loop MoE: silu(x @ w) @ w.T, the second with a bias."""
    y0 = jax.nn.silu(x @ w0) @ w0.T
    y1 = (jax.nn.silu(x @ w1) + b1[None]) @ w1.T
    return x + 0.5 * y0 - y1


def _dots(jaxpr) -> int:
    return str(jaxpr).count("dot_general[")


def test_dead_expert_is_dropped_and_live_values_are_exact():
    x, w0, w1 = (
        jax.random.normal(jax.random.key(i), s) for i, s in enumerate([(4, 8), (8, 6), (8, 6)])
    )
    b1 = jnp.full((6,), 0.3)
    closed = jax.make_jaxpr(_expert_sum)(x, w0, w1, b1)
    zero = pruning.Zero(closed.jaxpr.invars[2].aval)

    def pruned(x, w0, b1):
        out = pruning.evaluate(closed.jaxpr, closed.consts, [x, w0, zero, b1])
        return [pruning._materialize(o) for o in out]

    got = pruned(x, w0, b1)[0]
    want = _expert_sum(x, w0, jnp.zeros_like(w1), b1)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert _dots(closed.jaxpr) == 4
    assert _dots(jax.make_jaxpr(pruned)(x, w0, b1).jaxpr) == 2  # expert 1's matmuls: gone


def test_collectives_are_detected():
    def f(x):
        return jax.lax.psum(x, "i")

    jaxpr = jax.make_jaxpr(f, axis_env=[("i", 2)])(jnp.ones(3))
    assert pruning.has_collective(jaxpr)
    assert not pruning.has_collective(jax.make_jaxpr(jnp.sin)(jnp.ones(3)))
