"""`Remat`: recompute a module's call in backward; memory, numerics, collectives."""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import nnx_parallel as npx
from nnx_parallel.views.collectives import collectives
from tests.helpers import GRAD_TOL, assert_close, params


class Block(nnx.Module):
    """A residual MLP block, d -> f -> d, optionally with dropout."""

    def __init__(self, d, f, *, drop=0.0, rngs):
        self.up = nnx.Linear(d, f, rngs=rngs)
        self.down = nnx.Linear(f, d, rngs=rngs)
        self.drop = nnx.Dropout(drop, rngs=rngs) if drop else None

    def __call__(self, x):
        h = jax.nn.gelu(self.up(x))
        if self.drop is not None:
            h = self.drop(h)
        return x + self.down(h)


class Net(nnx.Module):
    def __init__(self, d=32, f=128, n=2, *, drop=0.0, rngs):
        self.blocks = nnx.List([Block(d, f, drop=drop, rngs=rngs) for _ in range(n)])

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def loss(model, x):
    return jnp.mean(model(x) ** 2)


grad = nnx.jit(nnx.grad(loss))  # one jitted function: a call after `lower` reuses its compile


def compiled_grad(model, x, mesh):
    with jax.set_mesh(mesh):
        return grad.lower(model, x).compile()


def sharded_grads(plan, mesh, x, **net):
    model = npx.parallelize(Net(rngs=nnx.Rngs(0), **net), mesh, plan)
    compiled = compiled_grad(model, x, mesh)
    with jax.set_mesh(mesh):
        return model, compiled, grad(model, x)


def reference_grads(x, **net):
    return grad(Net(rngs=nnx.Rngs(0), **net), x)


def assert_grads_equal(grads, ref_grads):
    g, g_ref = params(grads), params(ref_grads)
    assert g.keys() == g_ref.keys()
    for k in g:
        assert_close(g[k], g_ref[k], GRAD_TOL, f"grad of {k}")


def test_remat_target_on_one_cpu_device():
    # The model (8 residual blocks 256 -> 1024 -> 256) at batch 64:
    # the same 0.22x as at batch 2048 (220.2 MB -> 46.1 MB), compiled faster.
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    x = jnp.ones((64, 256))
    temps = {}
    for name, plan in {
        "dp": {"": npx.Replicated()},
        "remat": {"": npx.Replicated(), "blocks.*": npx.Remat()},
    }.items():
        model = npx.parallelize(Net(256, 1024, 8, rngs=nnx.Rngs(0)), mesh, plan)
        temps[name] = compiled_grad(model, x, mesh).memory_analysis().temp_size_in_bytes
    assert temps["dp"] == 2_949_120
    assert temps["remat"] <= 0.3 * temps["dp"], temps


def test_remat_gradients_equal_and_no_extra_collectives():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    x = jax.random.normal(jax.random.key(1), (16, 32))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ref = reference_grads(x)
    plans = {"dp": {"": npx.Replicated()}, "remat": {"": npx.Replicated(), "blocks.*": npx.Remat()}}
    ops = {}
    for name, plan in plans.items():
        _, compiled, grads = sharded_grads(plan, mesh, xs)
        assert_grads_equal(grads, ref)
        ops[name] = sorted((op.kind, op.shape) for op in collectives(compiled, mesh))
    assert ops["remat"] == ops["dp"] and {k for k, _ in ops["dp"]} == {"all-reduce"}


@pytest.mark.parametrize(
    "layout, kind",
    [("tuple", AxisType.Auto), ("separate", AxisType.Explicit)],
    ids=["tuple-auto", "separate-explicit"],
)
def test_remat_composes_with_fsdp(layout, kind):
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(kind,))
    x = jax.random.normal(jax.random.key(1), (256, 32))
    xs = jax.device_put(x, NamedSharding(mesh, P("fsdp")))
    fsdp = npx.FSDP("fsdp", min_size=16)
    plan = (
        {"blocks.*": (fsdp, npx.Remat())}
        if layout == "tuple"
        else {"": fsdp, "blocks.*": npx.Remat()}
    )
    model, compiled, grads = sharded_grads(plan, mesh, xs)
    assert model.blocks[0].up.kernel[...].sharding.spec == P(None, "fsdp")
    assert_grads_equal(grads, reference_grads(x))
    ops = collectives(compiled, mesh)

    def count(kind):
        return sum(op.kind == kind for op in ops)

    # Each block is one FSDP unit: its kernels are gathered in forward and once
    # more for the recompute, whose gathered copy its own backward then keeps
    # (no third gather), and its gradients are reduce-scattered together.
    assert (count("all-gather"), count("reduce-scatter")) == (4, 2)
    # Nothing bigger than a vector is all-reduced: the blocks' biases travel by
    # all-reduce (runtime/buckets.py), the kernels never do.
    reduced = [op.shape for op in ops if op.kind == "all-reduce"]
    shapes = {s for r in reduced for s in re.findall(r"\w+\[[\d,]*\]", r)}
    # Scalars (the ties, the loss), the 160-float up biases as 8 slots of 20 in
    # forward, and their 160-float gradients.
    assert shapes == {"f32[]", "f32[8,20]", "f32[160]"}, shapes
    fsdp_only = npx.parallelize(Net(rngs=nnx.Rngs(0)), mesh, {"": fsdp})
    base = compiled_grad(fsdp_only, xs, mesh).memory_analysis().temp_size_in_bytes
    assert compiled.memory_analysis().temp_size_in_bytes < 0.8 * base


def test_remat_composes_with_fsdp_x_tp_on_explicit_axes():
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    x = jax.random.normal(jax.random.key(1), (8, 32))
    tp = {"blocks.*.up": npx.ColumnParallel("model"), "blocks.*.down": npx.RowParallel("model")}
    plan = npx.plans.combine(tp, npx.FSDP("data", min_size=16)) | {"blocks.*": npx.Remat()}
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    model, _, grads = sharded_grads(plan, mesh, xs)
    assert model.blocks[0].up.kernel[...].sharding.spec == P("data", "model")
    assert_grads_equal(grads, reference_grads(x))


def test_remat_policies_by_name_and_value(one_device):
    mesh = one_device
    x = jax.random.normal(jax.random.key(1), (8, 32))
    ref = reference_grads(x)
    for policy in ("dots_saveable", jax.checkpoint_policies.dots_with_no_batch_dims_saveable):
        model, _, grads = sharded_grads(
            {"": npx.Replicated(), "blocks.*": npx.Remat(policy)}, mesh, x
        )
        assert_grads_equal(grads, ref)
    hooks = npx.core.layouts.get_hooks(model.blocks[0])
    assert hooks.remat.name == "dots_with_no_batch_dims_saveable"
    assert "remat" in npx.explain(model, mesh, {"blocks.*": npx.Remat()})


def test_remat_keeps_dropout_state_and_masks(one_device):
    mesh = one_device
    x = jax.random.normal(jax.random.key(1), (8, 32))
    ref_model = Net(drop=0.5, rngs=nnx.Rngs(0))
    ref = grad(ref_model, x)
    model, _, grads = sharded_grads({"blocks.*": npx.Remat()}, mesh, x, drop=0.5)
    assert_grads_equal(grads, ref)  # the recompute draws the forward's masks
    # One draw per dropout, as without Remat: the recompute does not draw again.
    counts = [int(b.drop.rngs.count[...]) for b in model.blocks]
    assert counts == [int(b.drop.rngs.count[...]) for b in ref_model.blocks] == [1, 1]


class TakesRngs(nnx.Module):
    def __init__(self, *, rngs):
        self.up = nnx.Linear(32, 32, rngs=rngs)
        self.drop = nnx.Dropout(0.5)

    def __call__(self, x, rngs):
        return self.drop(self.up(x), rngs=rngs)


def test_remat_call_passed_nnx_objects_falls_back_with_a_warning(one_device):
    mesh = one_device
    x = jax.random.normal(jax.random.key(1), (8, 32))
    f = nnx.jit(nnx.grad(lambda m, x, rngs: jnp.mean(m(x, rngs) ** 2)))
    ref = f(TakesRngs(rngs=nnx.Rngs(0)), x, nnx.Rngs(dropout=1))
    model = npx.parallelize(TakesRngs(rngs=nnx.Rngs(0)), mesh, npx.Remat())
    with pytest.warns(npx.FallbackWarning, match="passed NNX objects"), jax.set_mesh(mesh):
        grads = f(model, x, nnx.Rngs(dropout=1))
    assert_grads_equal(grads, ref)


def test_remat_errors(mesh8):
    with pytest.raises(npx.PlanError, match="Did you mean 'dots_saveable'"):
        npx.Remat("dots_savable")
    with pytest.raises(npx.PlanError, match="builds a policy from names"):
        npx.Remat("save_only_these_names")
    with pytest.raises(npx.PlanError, match="expected None, a policy name"):
        npx.Remat(3)
    with pytest.raises(npx.PlanError, match=r"matched 'blocks'.*never called.*'blocks\.\*'"):
        npx.parallelize(Net(rngs=nnx.Rngs(0)), mesh8, {"blocks": npx.Remat()})
