"""The tensor-parallel auto-plan on transformers written four different ways."""

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from nnx_parallel import ColumnParallel, RowParallel, parallelize, plans, resolve
from tests.transformers import (
    HD,
    HEADS,
    MODELS,
    VOCAB,
    D,
    Gemma,
    Llama,
    _flat,
    _gpt,
    _loss,
    _max_err,
    _parallel_loss,
    _tokens,
)


def test_auto_plan_classifies_all_four_models():
    expected = {
        "gpt": {
            "blocks.*.attn.q": ColumnParallel,
            "blocks.*.attn.k": ColumnParallel,
            "blocks.*.attn.v": ColumnParallel,
            "blocks.*.attn.o": RowParallel,
            "blocks.*.mlp.up": ColumnParallel,
            "blocks.*.mlp.down": RowParallel,
            "embed": RowParallel,
            "head": ColumnParallel,
        },
        "llama": {
            "layers.*.attention.qkv_einsum": ColumnParallel,
            "layers.*.attention.attn_vec_einsum": RowParallel,
            "layers.*.feed_forward.w1": ColumnParallel,
            "layers.*.feed_forward.w3": ColumnParallel,
            "layers.*.feed_forward.w2": RowParallel,
            "tok_embeddings": RowParallel,
            "output": ColumnParallel,
        },
        "gemma": {
            "h.*.attn.q_einsum": ColumnParallel,
            "h.*.attn.kv_einsum": ColumnParallel,
            "h.*.attn.attn_vec_einsum": RowParallel,
            "h.*.fc1": ColumnParallel,
            "h.*.fc2": RowParallel,
            "wte": RowParallel,
            "lm_head": ColumnParallel,
        },
        "custom": {
            "blocks.*.query": ColumnParallel,
            "blocks.*.key": ColumnParallel,
            "blocks.*.value": ColumnParallel,
            "blocks.*.proj": RowParallel,
            "blocks.*.expand": ColumnParallel,
            "blocks.*.contract": RowParallel,
            "token_embedding": RowParallel,
            "unembed": ColumnParallel,
        },
    }
    for name, ctor in MODELS.items():
        plan, report = plans.tensor_parallel(nnx.eval_shape(lambda: ctor(rngs=nnx.Rngs(0))))
        assert {k: type(v) for k, v in plan.items()} == expected[name], name
        assert not report.unclassified, (name, report.unclassified)
        assert all("position" in role for p, role in report.roles.items() if "replicated" in role)


def test_einsum_kernels_shard_the_head_dim(mesh8):
    """Fused (3, d, heads, hd) and heads-first (heads, d, hd) / (2, heads, d, hd)
    kernels are sharded on heads, never on the q/k/v stack or the head size."""
    for ctor, path, spec in [
        (Llama, "layers.0.attention.qkv_einsum.kernel", P(None, None, "model", None)),
        (Gemma, "h.0.attn.q_einsum.kernel", P("model", None, None)),
        (Gemma, "h.0.attn.kv_einsum.kernel", P(None, "model", None, None)),
        (Gemma, "h.0.attn.attn_vec_einsum.kernel", P("model", None, None)),
    ]:
        abstract = nnx.eval_shape(lambda: ctor(layers=1, rngs=nnx.Rngs(0)))
        plan, _ = plans.tensor_parallel(abstract)
        assert resolve(abstract, mesh8, plan).specs()[path] == spec, path


def test_unknown_layers_are_reported_not_guessed():
    class Odd(nnx.Module):
        def __init__(self, rngs):
            self.mystery = nnx.Linear(D, D, rngs=rngs)
            self.q_proj = nnx.Linear(D, D, rngs=rngs)

    plan, report = plans.tensor_parallel(Odd(nnx.Rngs(0)))
    assert "mystery" not in plan and "q_proj" in plan
    assert "mystery" in report.unclassified and "add a plan entry" in report.unclassified["mystery"]
    assert "UNCLASSIFIED" in str(report)
    with pytest.raises(Exception, match="nnx.Module"):
        plans.tensor_parallel({"not": "a module"})


def test_fused_qkv_linear_is_noted():
    class GPT2Attn(nnx.Module):
        def __init__(self, rngs):
            self.c_attn = nnx.Linear(D, 3 * D, rngs=rngs)
            self.c_proj = nnx.Linear(D, D, rngs=rngs)

    plan, report = plans.tensor_parallel(GPT2Attn(nnx.Rngs(0)))
    assert type(plan["c_attn"]) is ColumnParallel and type(plan["c_proj"]) is RowParallel
    assert any("fused qkv" in n for n in report.notes)


def test_vocab_parallel_false_leaves_embedding_and_head_alone():
    plan, report = plans.tensor_parallel(
        nnx.eval_shape(lambda: _gpt(rngs=nnx.Rngs(0))), vocab_parallel=False
    )
    assert "embed" not in plan and "head" not in plan
    assert "replicated" in report.roles["embed"] and "replicated" in report.roles["head"]


@pytest.mark.parametrize("name", list(MODELS))
def test_auto_plan_matches_unsharded(name, mesh8):
    """Forward and gradients of the auto-planned model equal the unsharded twin.

    The sequence-parallel plan's numerics are checked on a data x model mesh
    in tests/test_sequence.py.
    """
    ctor = MODELS[name]
    model, ref = ctor(layers=1, rngs=nnx.Rngs(0)), ctor(layers=1, rngs=nnx.Rngs(0))
    plan, report = plans.tensor_parallel(model)
    assert not report.unclassified
    parallelize(model, mesh8, plan)
    tokens = _tokens()
    with jax.set_mesh(mesh8):
        loss, grads = nnx.jit(nnx.value_and_grad(_parallel_loss(mesh8)))(model, tokens)
        logits = nnx.jit(lambda m, t: m(t))(model, tokens)
    loss_ref, grads_ref = nnx.value_and_grad(_loss)(ref, tokens)
    assert _max_err(logits, ref(tokens)) <= 1e-5
    assert _max_err(loss, loss_ref) <= 1e-5
    g, g_ref = _flat(grads), _flat(grads_ref)
    assert g.keys() == g_ref.keys()
    for key in g:
        assert _max_err(g[key], g_ref[key]) <= 1e-5, key


def test_flax_multi_head_attention_is_planned(mesh8):
    """nnx.MultiHeadAttention (LinearGeneral query/key/value/out) shards heads."""

    class Encoder(nnx.Module):
        def __init__(self, rngs):
            self.attn = nnx.MultiHeadAttention(
                num_heads=HEADS, in_features=D, decode=False, rngs=rngs
            )

    abstract = nnx.eval_shape(lambda: Encoder(nnx.Rngs(0)))
    plan, report = plans.tensor_parallel(abstract)
    assert {k: type(v) for k, v in plan.items()} == {
        "attn.query": ColumnParallel,
        "attn.key": ColumnParallel,
        "attn.value": ColumnParallel,
        "attn.out": RowParallel,
    }
    specs = resolve(abstract, mesh8, plan).specs()
    assert specs["attn.query.kernel"] == P(None, "model", None)  # (d, heads, head_dim)
    assert specs["attn.out.kernel"] == P("model", None, None)  # (heads, head_dim, d)


def test_tied_embedding_is_noted():
    class Tied(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
            self.up, self.down = nnx.Linear(D, 4 * D, rngs=rngs), nnx.Linear(4 * D, D, rngs=rngs)

    plan, report = plans.tensor_parallel(Tied(nnx.Rngs(0)))
    assert type(plan["embed"]) is RowParallel
    assert any("embed.attend" in n for n in report.notes)


def test_mesh_aware_plan_skips_layers_that_do_not_divide(mesh8):
    """Multi-query attention: one key/value head (4 features) cannot shard over 8."""

    class GQA(nnx.Module):
        def __init__(self, rngs):
            self.q_proj = nnx.Linear(D, D, rngs=rngs)
            self.k_proj = nnx.Linear(D, HD, rngs=rngs)
            self.v_proj = nnx.Linear(D, HD, rngs=rngs)
            self.o_proj = nnx.Linear(D, D, rngs=rngs)

    abstract = nnx.eval_shape(lambda: GQA(nnx.Rngs(0)))
    blind, _ = plans.tensor_parallel(abstract)
    with pytest.raises(Exception, match="not divisible"):
        resolve(abstract, mesh8, blind)
    plan, report = plans.tensor_parallel(abstract, mesh=mesh8)
    assert set(plan) == {"q_proj", "o_proj"}
    assert set(report.unclassified) == {"k_proj", "v_proj"}
    assert "not divisible" in report.unclassified["k_proj"]
    assert resolve(abstract, mesh8, plan).specs()["q_proj.kernel"] == P(None, "model")
