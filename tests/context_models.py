"""Attention written the ways public NNX models write it, for context-parallel tests."""

import jax
import jax.numpy as jnp
from flax import nnx

VOCAB, D, HEADS, DH = 50, 32, 4, 8


class MHALM(nnx.Module):
    """`nnx.MultiHeadAttention` with a causal + padding mask (0 = padding) the
    caller builds from the tokens; padded query rows are fully masked."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(HEADS, D, decode=False, rngs=rngs)
        self.head = nnx.Linear(D, VOCAB, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        valid = tokens != 0
        mask = nnx.combine_masks(
            nnx.make_causal_mask(tokens), nnx.make_attention_mask(valid, valid)
        )
        return self.head(self.attn(x, mask=mask))


def rope(x, positions):
    """Rotary embedding of `x` [B, S, H, Dh] at `positions` [B, S]."""
    half = x.shape[-1] // 2
    freq = 1.0 / (10000 ** (jnp.arange(half) / half))
    angle = positions[:, :, None, None].astype(jnp.float32) * freq[None, None, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * jnp.cos(angle) - x2 * jnp.sin(angle),
                            x2 * jnp.cos(angle) + x1 * jnp.sin(angle)], -1)  # fmt: skip


class RopeAttention(nnx.Module):
    """Hand-written attention: RoPE from caller positions, einsum, caller mask, softmax."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.q = nnx.Linear(D, D, rngs=rngs)
        self.k = nnx.Linear(D, D, use_bias=False, rngs=rngs)
        self.v = nnx.Linear(D, D, rngs=rngs)
        self.o = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x, positions, mask):
        b, s, _ = x.shape
        split = lambda y: y.reshape(b, s, HEADS, DH)  # noqa: E731
        q, k = rope(split(self.q(x)), positions), rope(split(self.k(x)), positions)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(DH).astype(x.dtype)
        logits = jnp.where(mask, logits, jnp.finfo(x.dtype).min)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), split(self.v(x)))
        return self.o(out.reshape(b, s, D))


class RopeLM(nnx.Module):
    """Causal + padding mask built from the caller's tokens (0 = padding)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.attn = RopeAttention(rngs=rngs)
        self.head = nnx.Linear(D, VOCAB, rngs=rngs)

    def __call__(self, tokens, positions):
        s = tokens.shape[1]
        mask = jnp.tril(jnp.ones((s, s), bool))[None, None] & (tokens != 0)[:, None, None, :]
        return self.head(self.attn(self.embed(tokens), positions, mask))


class DotProductAttention(nnx.Module):
    """Calls `jax.nn.dot_product_attention(is_causal=True)`; GQA with `kv_heads`
    K/V heads, a sliding window with `window` (left, right)."""

    def __init__(self, kv_heads=2, window=None, *, rngs: nnx.Rngs):
        self.kv_heads, self.window = kv_heads, window
        self.q = nnx.Linear(D, HEADS * DH, rngs=rngs)
        self.k = nnx.Linear(D, kv_heads * DH, use_bias=False, rngs=rngs)
        self.v = nnx.Linear(D, kv_heads * DH, rngs=rngs)
        self.o = nnx.Linear(HEADS * DH, D, rngs=rngs)

    def __call__(self, x):
        b, s, _ = x.shape
        q = self.q(x).reshape(b, s, HEADS, DH)
        k = self.k(x).reshape(b, s, self.kv_heads, DH)
        v = self.v(x).reshape(b, s, self.kv_heads, DH)
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=self.window)
        return self.o(y.reshape(b, s, HEADS * DH))


class DPALM(nnx.Module):
    """One `DotProductAttention` layer per entry of `windows` (None: whole causal)."""

    def __init__(self, kv_heads=2, windows=(None,), *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.layers = nnx.List([DotProductAttention(kv_heads, w, rngs=rngs) for w in windows])
        self.head = nnx.Linear(D, VOCAB, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


class BiasedAttention(nnx.Module):
    """`jax.nn.dot_product_attention` with a caller bias and mask and its own
    scale; `lengths=True` also passes `key_value_seq_lengths`."""

    def __init__(self, lengths=False, *, rngs: nnx.Rngs):
        self.lengths = lengths
        self.qkv = nnx.Linear(D, 3 * D, rngs=rngs)

    def __call__(self, x, bias, mask):
        b, s, _ = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, s, 3 * HEADS, DH), 3, axis=2)
        extra = {"key_value_seq_lengths": jnp.full((b,), s)} if self.lengths else {}
        y = jax.nn.dot_product_attention(q, k, v, bias, mask, scale=0.3, **extra)
        return y.reshape(b, s, D)
