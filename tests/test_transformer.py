"""Auto-planned tensor parallelism on transformers written four different ways,
sequence parallelism's collectives, and the loss-parallel cross-entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nnx_parallel import ColumnParallel, RowParallel, cross_entropy, parallelize, plans, resolve
from nnx_parallel.views.collectives import bytes_by_kind, collectives, count_collectives
from tests import models

VOCAB, D, HEADS, T = 64, 32, 8, 8
HD = D // HEADS


def _attend(q, k, v):
    """Causal attention on (b, t, heads, head_dim) arrays."""
    t = q.shape[1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, jnp.finfo(q.dtype).min)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


class _LM(nnx.Module):
    """Shared skeleton: embeddings, blocks, final norm, head (names vary)."""

    def logits(self, tokens, embed, blocks, norm, head, pos=None):
        x = embed(tokens)
        if pos is not None:
            x = x + pos(jnp.arange(tokens.shape[1]))[None]
        for block in blocks:
            x = block(x)
        return head(norm(x))


# 1. Llama-style: fused qkv einsum with a stack dim, SwiGLU w1/w2/w3, RMSNorm.
class FusedAttention(nnx.Module):
    def __init__(self, rngs):
        self.qkv_einsum = nnx.Einsum("btd,sdnh->sbtnh", (3, D, HEADS, HD), rngs=rngs)
        self.attn_vec_einsum = nnx.Einsum("btnh,nhd->btd", (HEADS, HD, D), rngs=rngs)

    def __call__(self, x):
        q, k, v = self.qkv_einsum(x)
        return self.attn_vec_einsum(_attend(q, k, v))


class SwiGLU(nnx.Module):
    def __init__(self, rngs):
        self.w1 = nnx.Linear(D, 2 * D, use_bias=False, rngs=rngs)
        self.w3 = nnx.Linear(D, 2 * D, use_bias=False, rngs=rngs)
        self.w2 = nnx.Linear(2 * D, D, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


class LlamaBlock(nnx.Module):
    def __init__(self, rngs):
        self.attention_norm = nnx.RMSNorm(D, rngs=rngs)
        self.attention = FusedAttention(rngs)
        self.ffn_norm = nnx.RMSNorm(D, rngs=rngs)
        self.feed_forward = SwiGLU(rngs)

    def __call__(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(_LM):
    def __init__(self, layers=2, *, rngs):
        self.tok_embeddings = nnx.Embed(VOCAB, D, rngs=rngs)
        self.layers = nnx.List([LlamaBlock(rngs) for _ in range(layers)])
        self.norm = nnx.RMSNorm(D, rngs=rngs)
        self.output = nnx.Linear(D, VOCAB, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        return self.logits(tokens, self.tok_embeddings, self.layers, self.norm, self.output)


# 2. Gemma-style heads-first einsums: q (heads, d, head_dim), kv (2, heads, d, head_dim).
class HeadsFirstAttention(nnx.Module):
    def __init__(self, rngs):
        self.q_einsum = nnx.Einsum("btd,ndh->btnh", (HEADS, D, HD), rngs=rngs)
        self.kv_einsum = nnx.Einsum("btd,kndh->kbtnh", (2, HEADS, D, HD), rngs=rngs)
        self.attn_vec_einsum = nnx.Einsum("btnh,nhd->btd", (HEADS, HD, D), rngs=rngs)

    def __call__(self, x):
        k, v = self.kv_einsum(x)
        return self.attn_vec_einsum(_attend(self.q_einsum(x), k, v))


class GemmaBlock(nnx.Module):
    def __init__(self, rngs):
        self.pre_attention_norm = nnx.LayerNorm(D, rngs=rngs)
        self.attn = HeadsFirstAttention(rngs)
        self.pre_ffw_norm = nnx.LayerNorm(D, rngs=rngs)
        self.fc1 = nnx.Linear(D, 4 * D, rngs=rngs)
        self.fc2 = nnx.Linear(4 * D, D, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.pre_attention_norm(x))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.pre_ffw_norm(x))))


class Gemma(_LM):
    def __init__(self, layers=2, *, rngs):
        self.wte = nnx.Embed(VOCAB, D, rngs=rngs)
        self.wpe = nnx.Embed(T, D, rngs=rngs)
        self.h = nnx.List([GemmaBlock(rngs) for _ in range(layers)])
        self.ln_f = nnx.LayerNorm(D, rngs=rngs)
        self.lm_head = nnx.Linear(D, VOCAB, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        return self.logits(tokens, self.wte, self.h, self.ln_f, self.lm_head, pos=self.wpe)


# 3. Hand-written layers holding a bare `self.w` Param; unnamed MLP layers.
class Dense(nnx.Module):
    def __init__(self, din, dout, rngs):
        self.w = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (din, dout)))
        self.b = nnx.Param(jnp.zeros((dout,)))

    def __call__(self, x):
        y = x @ self.w[...]
        return y + self.b[...].reshape((1,) * (y.ndim - 1) + (-1,))


class CustomBlock(nnx.Module):
    def __init__(self, rngs):
        self.norm1 = nnx.LayerNorm(D, rngs=rngs)
        self.query, self.key, self.value = (Dense(D, D, rngs) for _ in range(3))
        self.proj = Dense(D, D, rngs)
        self.norm2 = nnx.LayerNorm(D, rngs=rngs)
        self.expand = Dense(D, 4 * D, rngs)  # no known name: an MLP by shape
        self.contract = Dense(4 * D, D, rngs)

    def __call__(self, x):
        b, t, _ = x.shape
        h = self.norm1(x)
        q, k, v = (f(h).reshape(b, t, HEADS, HD) for f in (self.query, self.key, self.value))
        x = x + self.proj(_attend(q, k, v).reshape(b, t, D))
        return x + self.contract(jax.nn.relu(self.expand(self.norm2(x))))


class Custom(_LM):
    def __init__(self, layers=2, *, rngs):
        self.token_embedding = nnx.Embed(VOCAB, D, rngs=rngs)
        self.position_embedding = nnx.Embed(T, D, rngs=rngs)
        self.blocks = nnx.List([CustomBlock(rngs) for _ in range(layers)])
        self.final_norm = nnx.LayerNorm(D, rngs=rngs)
        self.unembed = Dense(D, VOCAB, rngs)

    def __call__(self, tokens):
        return self.logits(tokens, self.token_embedding, self.blocks, self.final_norm, self.unembed,
                           pos=self.position_embedding)


def _gpt(layers=2, *, rngs):
    return models.GPT(layers=layers, max_len=T, rngs=rngs)  # separate q/k/v/o Linear


MODELS = {"gpt": _gpt, "llama": Llama, "gemma": Gemma, "custom": Custom}


# Helpers ----------------------------------------------------------------------


def _tokens(mesh=None, batch=2):
    tokens = jax.random.randint(jax.random.key(1), (batch, T), 0, VOCAB)
    if mesh is None:
        return tokens
    batch_axis = "data" if "data" in mesh.axis_names else None
    return jax.device_put(tokens, NamedSharding(mesh, P(batch_axis)))


def _loss(model, tokens):
    logits = model(tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def _parallel_loss(mesh):
    """The loss-parallel twin of `_loss`: vocab-sharded logits, never gathered."""

    def loss(model, tokens):
        return cross_entropy(model(tokens)[:, :-1], tokens[:, 1:], mesh).mean()

    return loss


def _flat(tree):
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(tree)}


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# Auto-plan: classification ------------------------------------------------------------


def test_auto_plan_classifies_all_four_models():
    expected = {
        "gpt": {"blocks.*.attn.q": ColumnParallel, "blocks.*.attn.k": ColumnParallel,
                "blocks.*.attn.v": ColumnParallel, "blocks.*.attn.o": RowParallel,
                "blocks.*.mlp.up": ColumnParallel, "blocks.*.mlp.down": RowParallel,
                "embed": RowParallel, "head": ColumnParallel},
        "llama": {"layers.*.attention.qkv_einsum": ColumnParallel,
                  "layers.*.attention.attn_vec_einsum": RowParallel,
                  "layers.*.feed_forward.w1": ColumnParallel, "layers.*.feed_forward.w3": ColumnParallel,
                  "layers.*.feed_forward.w2": RowParallel, "tok_embeddings": RowParallel,
                  "output": ColumnParallel},
        "gemma": {"h.*.attn.q_einsum": ColumnParallel, "h.*.attn.kv_einsum": ColumnParallel,
                  "h.*.attn.attn_vec_einsum": RowParallel, "h.*.fc1": ColumnParallel,
                  "h.*.fc2": RowParallel, "wte": RowParallel, "lm_head": ColumnParallel},
        "custom": {"blocks.*.query": ColumnParallel, "blocks.*.key": ColumnParallel,
                   "blocks.*.value": ColumnParallel, "blocks.*.proj": RowParallel,
                   "blocks.*.expand": ColumnParallel, "blocks.*.contract": RowParallel,
                   "token_embedding": RowParallel, "unembed": ColumnParallel},
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
    plan, report = plans.tensor_parallel(nnx.eval_shape(lambda: _gpt(rngs=nnx.Rngs(0))), vocab_parallel=False)
    assert "embed" not in plan and "head" not in plan
    assert "replicated" in report.roles["embed"] and "replicated" in report.roles["head"]


# Auto-plan: numerics ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
def test_auto_plan_matches_unsharded(name, sp, mesh8):
    """Forward and gradients of the auto-planned model equal the unsharded twin."""
    ctor = MODELS[name]
    model, ref = ctor(layers=1, rngs=nnx.Rngs(0)), ctor(layers=1, rngs=nnx.Rngs(0))
    plan, report = plans.tensor_parallel(model, sequence_parallel=sp)
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


# Sequence parallelism: collectives per layer ------------------------------------


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
        fwd_bytes[sp] = _per_layer(bytes_by_kind(collectives(f1, mesh8)), bytes_by_kind(collectives(f2, mesh8)))
        assert all(c.axes == ("model",) for c in collectives(s2, mesh8))
    assert fwd[False] == {"all-reduce": 2, "all-gather": 0, "reduce-scatter": 0, "all-to-all": 0, "collective-permute": 0}
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


# Loss-parallel cross-entropy ----------------------------------------------------------


def test_cross_entropy_equals_optax_without_gathering_logits(mesh2x4):
    logits = 3 * jax.random.normal(jax.random.key(0), (4, T, VOCAB))
    labels = jax.random.randint(jax.random.key(1), (4, T), 0, VOCAB)
    sharded = jax.device_put(logits, NamedSharding(mesh2x4, P("data", None, "model")))
    sharded_labels = jax.device_put(labels, NamedSharding(mesh2x4, P("data")))

    def ref(lg, y):
        return optax.softmax_cross_entropy_with_integer_labels(lg, y).mean()

    fn = jax.jit(jax.value_and_grad(lambda lg, y: cross_entropy(lg, y, mesh2x4).mean()))
    with jax.set_mesh(mesh2x4):
        (loss, grad), compiled = fn(sharded, sharded_labels), fn.lower(sharded, sharded_labels).compile()
        per_example = jax.jit(lambda lg, y: cross_entropy(lg, y, mesh2x4))(sharded, sharded_labels)
    loss_ref, grad_ref = jax.value_and_grad(ref)(logits, labels)
    assert _max_err(loss, loss_ref) <= 1e-5 and _max_err(grad, grad_ref) <= 1e-6
    assert _max_err(per_example, optax.softmax_cross_entropy_with_integer_labels(logits, labels)) <= 1e-5
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


def test_flax_multi_head_attention_is_planned(mesh8):
    """nnx.MultiHeadAttention (LinearGeneral query/key/value/out) shards heads."""

    class Encoder(nnx.Module):
        def __init__(self, rngs):
            self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=D, decode=False, rngs=rngs)

    abstract = nnx.eval_shape(lambda: Encoder(nnx.Rngs(0)))
    plan, report = plans.tensor_parallel(abstract)
    assert {k: type(v) for k, v in plan.items()} == {
        "attn.query": ColumnParallel, "attn.key": ColumnParallel, "attn.value": ColumnParallel,
        "attn.out": RowParallel}
    specs = resolve(abstract, mesh8, plan).specs()
    assert specs["attn.query.kernel"] == P(None, "model", None)  # (d, heads, head_dim)
    assert specs["attn.out.kernel"] == P("model", None, None)  # (heads, head_dim, d)


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


def test_tied_embedding_is_noted():
    class Tied(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
            self.up, self.down = nnx.Linear(D, 4 * D, rngs=rngs), nnx.Linear(4 * D, D, rngs=rngs)

    plan, report = plans.tensor_parallel(Tied(nnx.Rngs(0)))
    assert type(plan["embed"]) is RowParallel
    assert any("embed.attend" in n for n in report.notes)


def test_train_gpt_example_learns_and_matches_one_device():
    """examples/train_gpt.py: sharded losses equal the unsharded run; loss falls."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "examples" / "train_gpt.py"
    spec = importlib.util.spec_from_file_location("train_gpt", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    losses, reference = example.main(["--parallel", "tp", "--steps", "6", "--compare", "3", "--layers", "1"])
    assert len(losses) == 6 and len(reference) == 3
    assert max(abs(a - b) for a, b in zip(losses, reference)) <= 1e-5
    assert losses[-1] < losses[0] - 0.5


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
        loss, grads = nnx.jit(nnx.value_and_grad(_parallel_loss(mesh2x4)))(model, _tokens(mesh2x4, batch=4))
    loss_ref, grads_ref = nnx.value_and_grad(_loss)(ref, tokens)
    assert _max_err(loss, loss_ref) <= 1e-5
    g, g_ref = _flat(grads), _flat(grads_ref)
    for key in g:
        assert _max_err(g[key], g_ref[key]) <= 1e-5, key
