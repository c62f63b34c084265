"""The loss-parallel cross-entropy: equal to optax, logits never gathered; errors."""

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nnx_parallel import cross_entropy
from nnx_parallel.views.collectives import collectives, count_collectives
from tests.transformers import VOCAB, T, _max_err


def test_cross_entropy_equals_optax_without_gathering_logits(mesh2x4):
    logits = 3 * jax.random.normal(jax.random.key(0), (4, T, VOCAB))
    labels = jax.random.randint(jax.random.key(1), (4, T), 0, VOCAB)
    sharded = jax.device_put(logits, NamedSharding(mesh2x4, P("data", None, "model")))
    sharded_labels = jax.device_put(labels, NamedSharding(mesh2x4, P("data")))

    def ref(lg, y):
        return optax.softmax_cross_entropy_with_integer_labels(lg, y).mean()

    fn = jax.jit(jax.value_and_grad(lambda lg, y: cross_entropy(lg, y, mesh2x4).mean()))
    with jax.set_mesh(mesh2x4):
        (loss, grad), compiled = (
            fn(sharded, sharded_labels),
            fn.lower(sharded, sharded_labels).compile(),
        )
        per_example = jax.jit(lambda lg, y: cross_entropy(lg, y, mesh2x4))(sharded, sharded_labels)
    loss_ref, grad_ref = jax.value_and_grad(ref)(logits, labels)
    assert _max_err(loss, loss_ref) <= 1e-5 and _max_err(grad, grad_ref) <= 1e-6
    assert (
        _max_err(per_example, optax.softmax_cross_entropy_with_integer_labels(logits, labels))
        <= 1e-5
    )
    assert grad.sharding.spec == P("data", None, "model")
    ops = collectives(compiled, mesh2x4)
    assert count_collectives(compiled, mesh2x4)["all-gather"] == 0
    logits_bytes = 4 * T * VOCAB * 4
    assert max(c.size for c in ops) < logits_bytes // 8  # only per-token scalars cross devices


def test_cross_entropy_errors(mesh8):
    logits, labels = jnp.zeros((2, 64)), jnp.zeros((2,), jnp.int32)
    with pytest.raises(Exception, match="mesh axis 'vocab' is not in the mesh"):
        cross_entropy(logits, labels, mesh8, axis="vocab")
    with pytest.raises(Exception, match="not divisible by mesh axis 'model'"):
        cross_entropy(jnp.zeros((2, 60)), labels, mesh8)
    with pytest.raises(Exception, match="do not fit"):
        cross_entropy(logits, jnp.zeros((2, 3), jnp.int32), mesh8)
