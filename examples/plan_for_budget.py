"""Pick the parallel layout of a GPT for a per-device memory budget, before running it.

Eight simulated CPU devices on one 'data' axis. We

  1. ask `npx.plans.auto` for the plan with the fewest wire bytes whose train
     step (forward, backward, Adam update) fits the budget: it compiles every
     candidate layout once, on abstract state, and runs nothing;
  2. print its table: predicted peak bytes per device, wire bytes, fits;
  3. parallelize a real model with the chosen plan, compile the same step and
     compare XLA's peak with the prediction; then train it for a few steps.

Run: python examples/plan_for_budget.py [--budget-mib 12] [--layers 4]
Its output is committed next to it, in plan_for_budget.txt.
"""

import os

# The device count is fixed when JAX starts: set it before importing jax.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import nnx_parallel as npx  # noqa: E402

VOCAB, WIDTH, HEADS, SEQ, BATCH = 512, 128, 8, 64, 32


class Attention(nnx.Module):
    def __init__(self, d, heads, *, rngs):
        self.heads = heads
        self.q, self.k, self.v, self.o = (nnx.Linear(d, d, rngs=rngs) for _ in range(4))

    def __call__(self, x):
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // self.heads)
        logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e9)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
        return self.o(out.reshape(b, t, d))


class MLP(nnx.Module):
    def __init__(self, d, *, rngs):
        self.up = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


class Block(nnx.Module):
    def __init__(self, d, heads, *, rngs):
        self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
        self.attn, self.mlp = Attention(d, heads, rngs=rngs), MLP(d, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nnx.Module):
    def __init__(self, layers, *, rngs):
        self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
        self.pos = nnx.Embed(SEQ, WIDTH, rngs=rngs)
        self.blocks = nnx.List([Block(WIDTH, HEADS, rngs=rngs) for _ in range(layers)])
        self.ln_f = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.head = nnx.Linear(WIDTH, VOCAB, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.pos(jnp.arange(tokens.shape[1]))[None]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def loss_fn(model, tokens):
    """Next-token cross-entropy."""
    logits = model(tokens[:, :-1]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def compiled_peak(model, opt, tokens, mesh, zero2: bool):
    # ZeRO-2 plans take their gradients from zero.value_and_grad (reduce-scattered).
    grad_fn = (
        npx.zero.value_and_grad(loss_fn, axis="data") if zero2 else nnx.value_and_grad(loss_fn)
    )

    @nnx.jit(donate_argnums=(0, 1))
    def step(model, opt, tokens):
        loss, grads = grad_fn(model, tokens)
        opt.update(model, grads)
        return loss

    with jax.set_mesh(mesh):
        compiled = step.lower(model, opt, tokens).compile()
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return step, peak - m.alias_size_in_bytes


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget-mib", type=float, default=12.0)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    mesh = npx.make_mesh(data=8, explicit=False)
    budget = int(args.budget_mib * 2**20)
    factory = lambda: GPT(args.layers, rngs=nnx.Rngs(0))  # noqa: E731
    batch = jax.ShapeDtypeStruct((BATCH, SEQ + 1), jnp.int32)  # SEQ inputs + 1 shifted target
    n_params = sum(x.size for x in jax.tree.leaves(nnx.eval_shape(factory)))
    print(f"GPT: {args.layers} blocks, width {WIDTH}, vocab {VOCAB}, {n_params:,} parameters")
    print(f"batch {BATCH} x {SEQ + 1} tokens, Adam, on {dict(mesh.shape)}\n")

    start = time.perf_counter()
    plan, report = npx.plans.auto(factory, mesh, batch, budget_bytes=budget, loss_fn=loss_fn)
    print(report)
    print(
        f"\n{len(report.candidates)} candidates compiled in "
        f"{time.perf_counter() - start:.0f} s, none run"
    )
    chosen = report.chosen
    print(f"chosen: {chosen.name!r}, plan:")
    for pattern, style in plan.items():
        print(f"  {pattern or '<root>'!r}: {style}")
    print(f"\npredicted for {chosen.name!r}:\n{chosen.estimate}\n")

    model = npx.parallelize(factory, mesh, plan)
    opt = npx.ShardedOptimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    axes = chosen.batch_axes
    spec = P(axes if len(axes) > 1 else axes[0]) if axes else P()
    tokens = jax.random.randint(jax.random.key(1), batch.shape, 0, VOCAB)
    tokens = jax.device_put(tokens, NamedSharding(mesh, spec))
    step, peak = compiled_peak(model, opt, tokens, mesh, chosen.name.startswith("zero2"))
    error = chosen.peak_bytes / peak - 1
    print(
        f"real parallelized model, same step: peak {peak:,} B per device; predicted "
        f"{chosen.peak_bytes:,} B ({error:+.2%})"
    )
    assert abs(error) <= 0.05, error
    with jax.set_mesh(mesh):
        losses = [float(step(model, opt, tokens)) for _ in range(3)]
    print("three train steps on one batch, loss: " + ", ".join(f"{x:.3f}" for x in losses))


if __name__ == "__main__":
    main()
