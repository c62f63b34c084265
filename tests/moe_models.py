"""Tiny Mixture-of-Experts modules in the three idioms public NNX code uses.

Experts are stacked in params of shape [E, ...]; each module routes every
token to its top-k experts. Written the way public code writes them, not for
this library:

- `LoopMoE`: a Python loop over experts indexing the stacks, `w[i]`, with
  one-hot routing weights (the CPU path of a public Qwen3-MoE port);
- `RaggedMoE`: tokens sorted by expert, `jax.lax.ragged_dot` twice, unsorted
  and combined; a raw [D, E] router param, a fused gate/up stack and a
  second input `router_input=` (a public Gemma-4 MoE layer);
- `DenseMoE`: every expert on every token, `einsum('td,edf->etf')`, weighted
  by dense router scores, per-expert biases (a public gpt-oss port).
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from tests.models import GPT, Attention

E, K, D, F = 8, 2, 16, 32


def _stack(rngs, *shape, scale=0.2):
    return nnx.Param(scale * jax.random.normal(rngs.params(), shape))


def _route(logits, k):
    """Top-k experts per token and their softmax weights."""
    weights, idx = jax.lax.top_k(logits, k)
    return jax.nn.softmax(weights, axis=-1), idx


class LoopMoE(nnx.Module):
    """A loop over experts; router `nnx.Linear`; gate/up/down stacks, up bias."""

    def __init__(self, d=D, f=F, e=E, k=K, *, rngs: nnx.Rngs):
        self.num_experts, self.top_k = e, k
        self.router = nnx.Linear(d, e, use_bias=False, rngs=rngs)
        self.gate_proj = _stack(rngs, e, d, f)
        self.up_proj = _stack(rngs, e, d, f)
        self.up_bias = _stack(rngs, e, f, scale=0.05)
        self.down_proj = _stack(rngs, e, f, d)

    def __call__(self, x):
        weights, idx = _route(self.router(x), self.top_k)
        combine = jnp.sum(jax.nn.one_hot(idx, self.num_experts) * weights[..., None], axis=-2)
        out = jnp.zeros_like(x)
        for i in range(self.num_experts):
            h = jax.nn.silu(x @ self.gate_proj[i]) * (
                x @ self.up_proj[i] + self.up_bias[i][None, None]
            )
            out = out + combine[..., i : i + 1] * (h @ self.down_proj[i])
        return out


class RaggedMoE(nnx.Module):
    """Sort by expert + `ragged_dot`; raw router param; fused gate/up stack."""

    def __init__(self, d=D, f=F, e=E, k=K, *, rngs: nnx.Rngs):
        self.num_experts, self.top_k = e, k
        self.router_kernel = _stack(rngs, d, e, scale=0.5)
        self.gate_up = _stack(rngs, e, d, 2 * f)
        self.down_proj = _stack(rngs, e, f, d)

    def __call__(self, x, router_input=None):
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        r = tokens if router_input is None else router_input.reshape(-1, shape[-1])
        weights, idx = _route(r @ self.router_kernel[...], self.top_k)
        flat = idx.reshape(-1)
        order = jnp.argsort(flat)
        sorted_x = jnp.repeat(tokens, self.top_k, axis=0)[order]
        sizes = jnp.bincount(flat, length=self.num_experts).astype(jnp.int32)
        gate, up = jnp.split(jax.lax.ragged_dot(sorted_x, self.gate_up[...], sizes), 2, axis=-1)
        y = jax.lax.ragged_dot(jax.nn.silu(gate) * up, self.down_proj[...], sizes)
        unsorted = jnp.zeros_like(y).at[order].set(y)
        out = jnp.sum(unsorted.reshape(-1, self.top_k, shape[-1]) * weights[..., None], axis=1)
        return out.reshape(shape)


class DenseMoE(nnx.Module):
    """Every expert on every token (`einsum`), dense scores; biases [E, F]."""

    def __init__(self, d=D, f=F, e=E, k=K, *, rngs: nnx.Rngs):
        self.num_experts, self.top_k = e, k
        self.router = nnx.Linear(d, e, rngs=rngs)
        self.gate_up = _stack(rngs, e, d, 2 * f)
        self.gate_up_bias = _stack(rngs, e, 2 * f, scale=0.05)
        self.down_proj = _stack(rngs, e, f, d)
        self.down_bias = _stack(rngs, e, d, scale=0.05)

    def __call__(self, x):
        shape = x.shape
        t = x.reshape(-1, shape[-1])
        weights, idx = _route(self.router(t), self.top_k)
        scores = jnp.sum(jax.nn.one_hot(idx, self.num_experts) * weights[..., None], axis=1)
        h = jnp.einsum("td,edf->etf", t, self.gate_up[...]) + self.gate_up_bias[...][:, None]
        gate, up = jnp.split(h, 2, axis=-1)
        y = jnp.einsum("etf,efd->etd", jax.nn.silu(gate) * up, self.down_proj[...])
        y = y + self.down_bias[...][:, None]
        return jnp.einsum("etd,te->td", y, scores).reshape(shape)


IDIOMS = {"loop": LoopMoE, "ragged": RaggedMoE, "dense": DenseMoE}


class MoEBlock(nnx.Module):
    def __init__(self, d=D, *, rngs: nnx.Rngs, moe=LoopMoE):
        self.ln = nnx.LayerNorm(d, rngs=rngs)
        self.moe = moe(d, rngs=rngs)

    def __call__(self, x):
        return x + self.moe(self.ln(x))


class ScannedMoE(nnx.Module):
    """`layers` MoE blocks stacked by `nnx.vmap` and run by `nnx.scan`."""

    def __init__(self, layers=2, d=D, *, rngs: nnx.Rngs, moe=LoopMoE):
        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(rngs):
            return MoEBlock(d, rngs=rngs, moe=moe)

        self.blocks = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        return body(x, self.blocks)


class SmallScannedMoE(ScannedMoE):
    """`ScannedMoE` of loop layers with 4 experts (half the compile time)."""

    def __init__(self, *, rngs: nnx.Rngs):
        super().__init__(rngs=rngs, moe=lambda d, rngs: LoopMoE(d, e=4, rngs=rngs))


class MoEGPTBlock(nnx.Module):
    def __init__(self, d, heads, moe, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = Attention(d, heads, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.moe = moe(d, 2 * d, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.moe(self.ln2(x))


class MoEGPT(GPT):
    """A two-layer GPT whose MLPs are MoE layers (`moe` picks the idiom)."""

    def __init__(self, vocab=64, d=32, heads=4, layers=2, max_len=16, moe=LoopMoE, *, rngs):
        block = functools.partial(MoEGPTBlock, moe=moe)
        super().__init__(vocab, d, heads, layers, max_len, block=block, rngs=rngs)
