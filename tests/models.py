"""Tiny models written the way public NNX code writes them."""

import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
    def __init__(self, din=16, dhidden=64, dout=16, *, rngs: nnx.Rngs):
        self.up = nnx.Linear(din, dhidden, rngs=rngs)
        self.down = nnx.Linear(dhidden, dout, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


class Attention(nnx.Module):
    """Separate q/k/v/o Linear projections, heads split by reshape."""

    def __init__(self, d=32, heads=8, *, rngs: nnx.Rngs):
        self.heads = heads
        self.q = nnx.Linear(d, d, rngs=rngs)
        # No key bias: softmax is invariant to it, so its gradient is pure
        # rounding noise that Adam would amplify into a random step.
        self.k = nnx.Linear(d, d, use_bias=False, rngs=rngs)
        self.v = nnx.Linear(d, d, rngs=rngs)
        self.o = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x):
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // self.heads).astype(x.dtype)
        mask = jnp.tril(jnp.ones((t, t), bool))
        logits = jnp.where(mask, logits, jnp.finfo(x.dtype).min)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
        return self.o(out.reshape(b, t, d))


class Block(nnx.Module):
    def __init__(self, d=32, heads=8, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = Attention(d, heads, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.mlp = MLP(d, 4 * d, d, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nnx.Module):
    """Two-layer GPT: token + position embeddings, blocks, LM head."""

    def __init__(
        self, vocab=64, d=32, heads=8, layers=2, max_len=16, *, block=None, rngs: nnx.Rngs
    ):
        block = Block if block is None else block  # (d, heads, *, rngs) -> a block module
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.pos = nnx.Embed(max_len, d, rngs=rngs)
        self.blocks = nnx.List([block(d, heads, rngs=rngs) for _ in range(layers)])
        self.ln_f = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.pos(jnp.arange(tokens.shape[1]))[None]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
