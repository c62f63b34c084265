"""nnx_parallel._compat.tracing: tracer state, symbolic dims, graph children and vjp residuals."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnx_parallel._compat import (
    checkpoint_policies,
    graph_children,
    is_symbolic,
    is_tracer,
    symbolic_dim,
    tracing,
    vjp_without,
)
from tests import models


def test_tracing_and_tracers():
    seen = []

    def f(x):
        seen.append((tracing(), is_tracer(x)))
        return x

    jax.jit(f)(1.0)
    assert seen == [(True, True)] and not tracing() and not is_tracer(jnp.ones(2))


def test_symbolic_dims():
    b = symbolic_dim("b")
    assert is_symbolic(b) and not is_symbolic(3)
    out = jax.eval_shape(lambda x: x.sum(0), jax.ShapeDtypeStruct((b, 4), jnp.float32))
    assert out.shape == (4,)


def test_graph_children_lists_every_path_to_a_shared_module():
    mlp = models.MLP(rngs=nnx.Rngs(0))
    mlp.again = mlp.up  # the same module twice
    children = graph_children(mlp)
    assert children["again"] is children["up"]
    assert graph_children(mlp.up.kernel) is None


def test_vjp_without_drops_a_saved_input_and_rebuilds_an_exact_vjp():
    w = jnp.arange(12.0).reshape(3, 4)
    x = jnp.ones((2, 3))

    def f(w, x):
        return jnp.tanh(x @ w)

    out, kept, rebuild = vjp_without(f, (w, x), [w])
    assert all(k is not w for k in kept)
    vjp = rebuild(kept, [w + 0.0])  # an equal array, e.g. re-gathered
    got = vjp(jnp.ones_like(out))
    want = jax.vjp(f, w, x)[1](jnp.ones_like(out))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b)


def test_checkpoint_policies_by_name():
    policies = checkpoint_policies()
    assert policies["dots_saveable"] is jax.checkpoint_policies.dots_saveable
    assert "nothing_saveable" in policies
