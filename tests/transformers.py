"""Transformers written four different ways, shared by the auto-plan,
sequence-parallel and loss tests."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nnx_parallel import cross_entropy
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
        return self.logits(
            tokens,
            self.token_embedding,
            self.blocks,
            self.final_norm,
            self.unembed,
            pos=self.position_embedding,
        )


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
