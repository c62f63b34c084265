"""Sequence parallelism (Megatron-SP): collectives per layer, layouts, numerics, errors."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nnx_parallel import parallelize, plans
from nnx_parallel.views.collectives import bytes_by_kind, collectives, count_collectives
from tests import models
from tests.transformers import (
    HD,
    MODELS,
    VOCAB,
    D,
    T,
    _flat,
    _gpt,
    _loss,
    _max_err,
    _parallel_loss,
    _tokens,
)


def _per_layer(counts_1, counts_2):
    return {k: counts_2[k] - counts_1[k] for k in counts_1}


def _compiled(sp, layers, mesh):
    model = _gpt(layers=layers, rngs=nnx.Rngs(0))
    plan, _ = plans.tensor_parallel(model, sequence_parallel=sp)
    parallelize(model, mesh, plan)
    tokens = _tokens()

    def loss(m, t):
        return jnp.mean(m(t) ** 2)

    with jax.set_mesh(mesh):
        forward = nnx.jit(lambda m, t: m(t)).lower(model, tokens).compile()
        step = nnx.jit(nnx.value_and_grad(loss)).lower(model, tokens).compile()
    return forward, step


def test_sequence_parallel_trades_all_reduces_for_gathers_and_scatters(mesh8):
    """Megatron per layer: TP has 2 all-reduces in forward and 2 in backward.
    SP adds 2 all-gathers per direction (before the column layers in forward,
    the transpose of the scatters in backward), and turns each all-reduce into
    a reduce-scatter of equal bytes. XLA:CPU has no reduce-scatter creator
    pass, so on CPU a scatter compiles to an all-reduce + dynamic-slice: we
    count reduce-scatter and all-reduce together (GPU/TPU emit reduce-scatter)."""
    act = 2 * T * D * 4  # one (batch, seq, d) f32 activation
    fwd, step, fwd_bytes = {}, {}, {}
    for sp in (False, True):
        (f1, s1), (f2, s2) = _compiled(sp, 1, mesh8), _compiled(sp, 2, mesh8)
        fwd[sp] = _per_layer(count_collectives(f1, mesh8), count_collectives(f2, mesh8))
        step[sp] = _per_layer(count_collectives(s1, mesh8), count_collectives(s2, mesh8))
        fwd_bytes[sp] = _per_layer(
            bytes_by_kind(collectives(f1, mesh8)), bytes_by_kind(collectives(f2, mesh8))
        )
        assert all(c.axes == ("model",) for c in collectives(s2, mesh8))
    assert fwd[False] == {
        "all-reduce": 2,
        "all-gather": 0,
        "reduce-scatter": 0,
        "all-to-all": 0,
        "collective-permute": 0,
    }
    assert fwd_bytes[False]["all-reduce"] == 2 * act
    assert step[False]["all-reduce"] == 4 and step[False]["all-gather"] == 0
    assert fwd[True]["all-gather"] == 2
    assert fwd[True]["all-reduce"] + fwd[True]["reduce-scatter"] == 2
    assert fwd_bytes[True]["all-gather"] == 2 * act
    assert fwd_bytes[True]["all-reduce"] + fwd_bytes[True]["reduce-scatter"] == 2 * act
    assert step[True]["all-gather"] == 4
    assert step[True]["all-reduce"] + step[True]["reduce-scatter"] == 4


def test_sequence_parallel_keeps_the_residual_stream_sharded(mesh8):
    """Between blocks each device holds 1/8 of the sequence (TP: all of it)."""
    for sp, spec in [(False, P()), (True, P(None, "model"))]:
        block = models.Block(rngs=nnx.Rngs(0))
        plan, _ = plans.tensor_parallel(block, sequence_parallel=sp)
        parallelize(block, mesh8, plan)
        x = jax.random.normal(jax.random.key(0), (2, T, D))
        if sp:
            x = jax.device_put(x, NamedSharding(mesh8, P(None, "model")))
        with jax.set_mesh(mesh8):
            y = jax.jit(lambda x: block(x))(x)
        shard = y.sharding.shard_shape(y.shape)
        assert shard == ((2, T // 8, D) if sp else (2, T, D)), (sp, shard)


def test_sequence_styles_errors(mesh8):
    from nnx_parallel import PlanError, SequenceParallel, SequenceRowParallel

    norm = nnx.LayerNorm(D, rngs=nnx.Rngs(0))
    with pytest.raises(PlanError, match="mesh axis 'seq' is not in the mesh"):
        parallelize(norm, mesh8, SequenceParallel("seq"))
    with pytest.raises(PlanError, match="counted from the end"):
        parallelize(norm, mesh8, SequenceParallel("model", seq_dim=1))
    layer = nnx.Linear(D, D, rngs=nnx.Rngs(0))
    with pytest.raises(PlanError, match="counted from the end"):
        parallelize(layer, mesh8, SequenceRowParallel("model", seq_dim=0))
    assert isinstance(layer.kernel[...].sharding, jax.sharding.SingleDeviceSharding)  # untouched


def test_sequence_parallel_skips_norms_inside_attention():
    class QKNorm(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
            self.ln = nnx.LayerNorm(D, rngs=rngs)
            self.q_norm = nnx.RMSNorm(HD, rngs=rngs)

    plan, report = plans.tensor_parallel(QKNorm(nnx.Rngs(0)), sequence_parallel=True)
    assert type(plan["ln"]).__name__ == "SequenceParallel" and "q_norm" not in plan
    assert any("q_norm" in n for n in report.notes)


@pytest.mark.parametrize("name", list(MODELS))
def test_sequence_parallel_on_data_x_model_matches_unsharded(name, mesh2x4):
    """Batch over 'data' (2), heads and sequence over 'model' (4)."""
    ctor = MODELS[name]
    model, ref = ctor(layers=1, rngs=nnx.Rngs(0)), ctor(layers=1, rngs=nnx.Rngs(0))
    plan, _ = plans.tensor_parallel(model, sequence_parallel=True)
    parallelize(model, mesh2x4, plan)
    tokens = _tokens(batch=4)
    with jax.set_mesh(mesh2x4):
        loss, grads = nnx.jit(nnx.value_and_grad(_parallel_loss(mesh2x4)))(
            model, _tokens(mesh2x4, batch=4)
        )
        logits = nnx.jit(lambda m, t: m(t))(model, _tokens(mesh2x4, batch=4))
    loss_ref, grads_ref = nnx.value_and_grad(_loss)(ref, tokens)
    assert _max_err(logits, ref(tokens)) <= 1e-5
    assert _max_err(loss, loss_ref) <= 1e-5
    g, g_ref = _flat(grads), _flat(grads_ref)
    for key in g:
        assert _max_err(g[key], g_ref[key]) <= 1e-5, key
