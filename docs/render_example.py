"""Inspect the README example: a 2-layer GPT, tensor-parallel on a 2x4 mesh.

Prints `summary` (before allocation, from `nnx.eval_shape` + `resolve`),
`explain`, and the `communication_report` of one train step, and writes
`docs/example_model.html` (treescope, standalone) next to this file.

Run:  python docs/render_example.py
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys  # noqa: E402

import jax  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import nnx_parallel as npx  # noqa: E402
from tests.models import GPT  # noqa: E402


def readme_plan():
    col, row = npx.ColumnParallel("model"), npx.RowParallel("model")
    return {
        "embed": row,
        "blocks.*.attn.q": col,
        "blocks.*.attn.k": col,
        "blocks.*.attn.v": col,
        "blocks.*.attn.o": row,
        "blocks.*.mlp.up": col,
        "blocks.*.mlp.down": row,
        "head": npx.ColumnParallel("model", output_spec=(None,)),
    }


def main():
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    plan = readme_plan()

    # 1. Before allocating anything: an abstract model and the resolved plan.
    abstract = nnx.eval_shape(lambda: GPT(rngs=nnx.Rngs(0)))
    print("== summary (abstract model, nothing allocated) ==")
    print(npx.summary(npx.resolve(abstract, mesh, plan)))

    # 2. Why: a plan with a typo, explained.
    typo = dict(plan, **{"blocks.*.mlp.upp": npx.ColumnParallel("model")})
    print("\n== explain (plan with a typo) ==")
    print(npx.explain(abstract, mesh, typo))

    # 3. The real model, and what one train step communicates.
    model = npx.parallelize(GPT(rngs=nnx.Rngs(0)), mesh, plan)
    tokens = jax.device_put(
        jax.random.randint(jax.random.key(1), (4, 8), 0, 64), jax.NamedSharding(mesh, jax.P("data"))
    )

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
    print("\n== communication_report (one Adam train step) ==")
    print(npx.communication_report(train_step, model, opt, tokens, mesh=mesh))

    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "example_model.html")
    with open(out, "w") as f:
        f.write(npx.render(model))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
