"""Train a small Mixture-of-Experts GPT with its experts spread over devices.

    python examples/train_moe.py                  # loop idiom, ('data', 'expert') = (2, 4)
    python examples/train_moe.py --idiom ragged   # sort + ragged_dot idiom
    python examples/train_moe.py --fsdp           # experts also FSDP-sharded over 'data'

The model is plain NNX code: each block's MLP is an MoE layer with 8 experts
stacked in `[E, ...]` params and a top-2 router. `npx.plans.expert_parallel`
finds those layers by structure and spreads the experts over the 'expert'
axis (2 per device); the batch is sharded over ('data', 'expert'). The first
steps also run on one device, unsharded; both losses are printed side by
side and agree to float32 rounding. Same corpus as examples/train_gpt.py.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import nnx_parallel as npx  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "train_gpt", pathlib.Path(__file__).with_name("train_gpt.py")
)
train_gpt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_gpt)  # the corpus, attention and helpers


class LoopMoE(nnx.Module):
    """Top-k routing, then a loop over experts indexing stacked params (Qwen3-MoE style)."""

    def __init__(self, d, f, experts, top_k, *, rngs):
        self.num_experts, self.top_k = experts, top_k
        init = jax.nn.initializers.lecun_normal()
        self.gate = nnx.Linear(d, experts, use_bias=False, rngs=rngs)
        self.gate_proj = nnx.Param(init(rngs.params(), (experts, d, f)))
        self.up_proj = nnx.Param(init(rngs.params(), (experts, d, f)))
        self.down_proj = nnx.Param(init(rngs.params(), (experts, f, d)))

    def route(self, x):
        weights, idx = jax.lax.top_k(self.gate(x), self.top_k)
        return jax.nn.softmax(weights, axis=-1), idx

    def __call__(self, x):
        weights, idx = self.route(x)
        combine = jnp.sum(jax.nn.one_hot(idx, self.num_experts) * weights[..., None], axis=-2)
        out = jnp.zeros_like(x)
        for i in range(self.num_experts):
            h = jax.nn.silu(x @ self.gate_proj[i]) * (x @ self.up_proj[i])
            out = out + combine[..., i : i + 1] * (h @ self.down_proj[i])
        return out


class RaggedMoE(LoopMoE):
    """Tokens sorted by expert, `jax.lax.ragged_dot` twice, unsorted (Gemma-4 style)."""

    def __call__(self, x):
        shape = x.shape
        weights, idx = self.route(x.reshape(-1, shape[-1]))
        flat = idx.reshape(-1)
        order = jnp.argsort(flat)
        xs = jnp.repeat(x.reshape(-1, shape[-1]), self.top_k, axis=0)[order]
        sizes = jnp.bincount(flat, length=self.num_experts).astype(jnp.int32)
        h = jax.nn.silu(jax.lax.ragged_dot(xs, self.gate_proj[...], sizes))
        h = h * jax.lax.ragged_dot(xs, self.up_proj[...], sizes)
        y = jax.lax.ragged_dot(h, self.down_proj[...], sizes)
        y = jnp.zeros_like(y).at[order].set(y).reshape(-1, self.top_k, shape[-1])
        return jnp.sum(y * weights[..., None], axis=1).reshape(shape)


class Block(nnx.Module):
    def __init__(self, d, heads, moe, *, rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = train_gpt.Attention(d, heads, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.mlp = moe(rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class MoEGPT(nnx.Module):
    def __init__(self, vocab, d, heads, layers, max_len, experts, top_k, idiom, *, rngs):
        cls = {"loop": LoopMoE, "ragged": RaggedMoE}[idiom]

        def moe(rngs):
            return cls(d, 2 * d, experts, top_k, rngs=rngs)

        self.wte = nnx.Embed(vocab, d, rngs=rngs)
        self.wpe = nnx.Embed(max_len, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, heads, moe, rngs=rngs) for _ in range(layers)])
        self.ln_f = nnx.LayerNorm(d, rngs=rngs)
        self.lm_head = nnx.Linear(d, vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        x = self.wte(tokens) + self.wpe(jnp.arange(tokens.shape[1]))[None]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idiom", choices=["loop", "ragged"], default="loop")
    parser.add_argument("--fsdp", action="store_true", help="also FSDP-shard experts over 'data'")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--d", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--compare", type=int, default=5, help="steps to also run unsharded")
    args = parser.parse_args(argv)

    data = train_gpt.CharData(train_gpt.make_corpus())

    def make_model():
        dims = (data.vocab, args.d, 4, args.layers, args.seq, args.experts, 2, args.idiom)
        return MoEGPT(*dims, rngs=nnx.Rngs(0))

    model = make_model()
    mesh = jax.make_mesh((2, 4), ("data", "expert"))
    plan, report = npx.plans.expert_parallel(model, "expert")
    print(f"expert-parallel plan: {plan}\n{report}")
    if args.fsdp:  # experts FSDP-sharded over 'data' too (torchtitan's efsdp)
        plan = {**plan, "": npx.FSDP("data", min_size=2**12)}
    npx.parallelize(model, mesh, plan)
    expert = model.blocks[0].mlp.gate_proj.get_value()
    print(
        f"mesh {dict(mesh.shape)}: gate_proj {expert.shape} {expert.sharding.spec}, "
        f"{expert.addressable_shards[0].data.shape} per device"
    )

    step = train_gpt.make_train_step(train_gpt.reference_loss)
    batch_sharding = jax.NamedSharding(mesh, jax.P(("data", "expert")))
    reference = make_model()
    ref_opt = nnx.Optimizer(reference, optax.adam(args.lr), wrt=nnx.Param)
    opt = nnx.Optimizer(model, optax.adam(args.lr), wrt=nnx.Param)
    losses, ref_losses = [], []
    start = time.perf_counter()
    for i in range(args.steps):
        batch = data.batch(args.batch, args.seq)
        with jax.set_mesh(mesh):
            losses.append(float(step(model, opt, jax.device_put(batch, batch_sharding))))
        if i < args.compare:
            ref_losses.append(float(step(reference, ref_opt, jnp.asarray(batch))))
            print(f"step {i}: loss {losses[-1]:.6f}  one device {ref_losses[-1]:.6f}")
        elif i % args.log_every == 0 or i == args.steps - 1:
            ms = 1e3 * (time.perf_counter() - start) / (i + 1)
            print(f"step {i}: loss {losses[-1]:.4f} ({ms:.1f} ms/step)")
    return losses, ref_losses


if __name__ == "__main__":
    main()
