"""FSDP units (core/units.py): which modules gather their subtree at once, and what a
unit costs in a compiled step: collectives, gradient FLOPs, numerics."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import nnx_parallel as npx
from nnx_parallel.core.graph import walk
from nnx_parallel.core.units import repeated_blocks
from nnx_parallel.errors import PlanError
from nnx_parallel.views.collectives import collectives
from tests import helpers, models


class RawBlock(nnx.Module):
    """A block that owns two raw Params with a nonlinearity between them."""

    def __init__(self, d, f, *, rngs):
        init = nnx.initializers.lecun_normal()
        self.w1 = nnx.Param(init(rngs.params(), (d, f)))
        self.w2 = nnx.Param(init(rngs.params(), (f, d)))

    def __call__(self, x):
        return x + jax.nn.gelu(x @ self.w1[...]) @ self.w2[...]


class RawStack(nnx.Module):
    def __init__(self, d=64, f=256, depth=4, *, rngs):
        self.blocks = nnx.List([RawBlock(d, f, rngs=rngs) for _ in range(depth)])

    def __call__(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class Numbered(nnx.Module):
    def __init__(self, *, rngs):
        self.h0 = models.MLP(rngs=rngs)
        self.h1 = models.MLP(rngs=rngs)
        self.head = nnx.Linear(16, 16, rngs=rngs)


class WithDropout(nnx.Module):
    def __init__(self, *, rngs):
        self.blocks = nnx.List([models.MLP(rngs=rngs) for _ in range(2)])
        self.drop = nnx.List([nnx.Dropout(0.1, rngs=rngs) for _ in range(2)])

    def __call__(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_repeated_blocks_lists_numbered_attributes_and_nothing_else():
    assert repeated_blocks(walk(models.GPT(rngs=nnx.Rngs(0)))[0], "") == ["blocks.0", "blocks.1"]
    assert repeated_blocks(walk(Numbered(rngs=nnx.Rngs(0)))[0], "") == ["h0", "h1"]
    assert repeated_blocks(walk(models.MLP(rngs=nnx.Rngs(0)))[0], "") == []


def test_units_move_the_gathers_onto_the_blocks():
    model = models.GPT(rngs=nnx.Rngs(0))
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    auto = npx.resolve(model, mesh, npx.FSDP("fsdp", min_size=64))
    gathered = {p: h.gather.params for p, h in auto.hooks.items() if h.gather}
    assert set(gathered) >= {"blocks.0", "blocks.1"}
    assert not any(p.startswith("blocks.0.") for p in gathered)  # children gather nothing
    assert ("mlp.up.kernel", -1) in gathered["blocks.0"]
    leaf = npx.resolve(model, mesh, npx.FSDP("fsdp", min_size=64, units="leaf"))
    assert "blocks.0" not in {p for p, h in leaf.hooks.items() if h.gather}
    assert {p for p, h in leaf.hooks.items() if h.gather} >= {"blocks.0.mlp.up", "blocks.1.mlp.up"}
    module = npx.resolve(model, mesh, {"blocks.*.mlp": npx.FSDP("fsdp", min_size=64)})
    assert {p for p, h in module.hooks.items() if h.gather} == {"blocks.0.mlp", "blocks.1.mlp"}


def test_a_unit_that_holds_state_is_not_formed_and_says_why():
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    model = WithDropout(rngs=nnx.Rngs(0))
    res = npx.resolve(model, mesh, npx.FSDP("fsdp", min_size=64, units="module"))
    assert "" not in {p for p, h in res.hooks.items() if h.gather}
    assert any("holds state" in n for n in res.notes), res.notes


def test_a_unit_with_tensor_parallel_inside_is_not_formed():
    mesh = jax.make_mesh((2, 4), ("fsdp", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    tp = {"blocks.*.mlp.up": npx.ColumnParallel("model"), "blocks.*.mlp.down": npx.RowParallel()}
    res = npx.resolve(
        models.GPT(rngs=nnx.Rngs(0)), mesh, npx.plans.combine(tp, npx.FSDP(min_size=64))
    )
    assert "blocks.0" not in {p for p, h in res.hooks.items() if h.gather}
    assert any("activation layout" in n for n in res.notes), res.notes


def test_bad_units_value_is_refused():
    with pytest.raises(PlanError, match=r"units.*expected one of"):
        npx.FSDP("fsdp", units="blocks")


def _grad_step(model, mesh, x):
    loss = lambda m, x: jnp.mean(m(x) ** 2)  # noqa: E731
    with jax.set_mesh(mesh):
        return nnx.jit(nnx.grad(loss)).lower(model, x).compile()


def test_unit_step_saves_activations_and_groups_collectives(kind):
    """Raw-param blocks (gelu between two matmuls): gradient FLOPs within 1% of
    DP's (the forward is not run again in backward), per unit one all-gather
    in forward, one in backward and one reduce-scatter, and numerics equal."""
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(kind,))
    x = jax.random.normal(jax.random.key(1), (64, 64))
    xs = jax.device_put(x, NamedSharding(mesh, P("fsdp")))
    fsdp = npx.parallelize(RawStack(rngs=nnx.Rngs(0)), mesh, npx.FSDP("fsdp", min_size=64))
    dp = npx.parallelize(RawStack(rngs=nnx.Rngs(0)), mesh, npx.Replicated())
    compiled = _grad_step(fsdp, mesh, xs)
    flops = [c.cost_analysis() for c in (compiled, _grad_step(dp, mesh, xs))]
    flops = [(f[0] if isinstance(f, list) else f)["flops"] for f in flops]
    assert flops[0] <= 1.01 * flops[1], flops
    ops = collectives(compiled, mesh)
    count = {k: sum(o.kind == k for o in ops) for k in ("all-gather", "reduce-scatter")}
    # 4 units: forward and backward all-gather each once, one reduce-scatter.
    assert count == {"all-gather": 8, "reduce-scatter": 4}, count
    kernel_bytes = 4 * (64 * 256 * 2) * 4  # per step: psi of the matrices
    assert sum(o.size for o in ops if o.kind == "reduce-scatter") == kernel_bytes
    assert sum(o.size for o in ops if o.kind == "all-gather") <= 2 * kernel_bytes
    # Adam's first step is lr * sign(g) wherever |g| >> eps: lr=1e-3 keeps
    # float32 reduction-order differences in tiny gradients under 1e-5.
    helpers.check_equivalence(fsdp, RawStack(rngs=nnx.Rngs(0)), mesh, xs, x, lr=1e-3)
