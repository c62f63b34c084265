"""Parallelize a small transformer on 8 simulated CPU devices and show what happened.

Run:  python examples/parallelize_transformer.py
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import nnx_parallel as npx  # noqa: E402
from tests.models import GPT  # noqa: E402  (a 2-layer GPT written like public NNX code)


def main():
    mesh = jax.make_mesh((2, 4), ("data", "model"))  # Explicit axes, JAX's default
    col, row = npx.ColumnParallel("model"), npx.RowParallel("model")
    plan = {
        "embed": row,  # vocab-parallel: each device holds 16 of the 64 rows
        "blocks.*.attn.q": col,
        "blocks.*.attn.k": col,
        "blocks.*.attn.v": col,
        "blocks.*.attn.o": row,
        "blocks.*.mlp.up": col,
        "blocks.*.mlp.down": row,
        # Gather the vocab-sharded logits so an ordinary loss can read them
        # (PyTorch: ColwiseParallel(output_layouts=Replicate())).
        "head": npx.ColumnParallel("model", output_spec=(None,)),
    }
    model, reference = GPT(rngs=nnx.Rngs(0)), GPT(rngs=nnx.Rngs(0))
    npx.parallelize(model, mesh, plan)

    print(f"mesh: {dict(mesh.shape)} ({mesh.axis_types[0]} axes)\n")
    print(npx.summary(model, sort="path"))

    tokens = jax.random.randint(jax.random.key(1), (4, 8), 0, 64)
    sharded_tokens = jax.device_put(tokens, jax.NamedSharding(mesh, jax.P("data")))

    def loss_fn(m, t):
        logits = m(t)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], t[:, 1:]).mean()

    @nnx.jit
    def train_step(m, opt, t):
        loss, grads = nnx.value_and_grad(loss_fn)(m, t)
        opt.update(m, grads)
        return loss

    with jax.set_mesh(mesh):
        opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
        opt_ref = nnx.Optimizer(reference, optax.adam(1e-3), wrt=nnx.Param)
        err = float(jnp.max(jnp.abs(model(sharded_tokens) - reference(tokens))))
        compiled = train_step.lower(model, opt, sharded_tokens).compile()
        losses = [
            (
                float(train_step(model, opt, sharded_tokens)),
                float(train_step(reference, opt_ref, tokens)),
            )
            for _ in range(3)
        ]

    print(f"\nforward max |sharded - unsharded| = {err:.2e}")
    for i, (a, b) in enumerate(losses):
        print(f"step {i}: loss {a:.6f} (unsharded {b:.6f})")
    print("\none compiled train step:")
    print(npx.communication_report(compiled, mesh=mesh))
    assert err < 1e-5 and np.allclose([a for a, _ in losses], [b for _, b in losses], atol=1e-5)


if __name__ == "__main__":
    main()
