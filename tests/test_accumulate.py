"""Gradient accumulation: full-batch numerics, one gradient sync, sharded FSDP
accumulators, compiled temp memory, errors."""

import collections
import functools
import re

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from nnx_parallel import (
    FSDP,
    ColumnParallel,
    ParallelError,
    Replicated,
    RowParallel,
    ZeRO,
    accumulate,
    parallelize,
    zero,
)
from nnx_parallel.views.collectives import collectives, count_collectives
from tests import helpers, models
from tests.helpers import max_rel_err, rel_err

K = 4
BATCH = 2048  # 256 rows per device on 8 devices: activations dominate temp memory
REL_TOL = 1e-6
MEMORY_RATIO = 0.4  # temp(k=4) <= 0.4 * temp(k=1)


def loss_fn(model, x):
    return jnp.mean(model(x) ** 2)


def aux_loss_fn(model, x):
    y = model(x)
    return jnp.mean(y**2), {"mean_out": jnp.mean(y), "positive": jnp.sum(y > 0)}


def batch(size=BATCH):
    return jax.random.normal(jax.random.key(1), (size, 16))


@functools.cache
def reference(size=BATCH):
    """Full-batch (loss, grads) of the unsharded model: one compile per size."""
    return nnx.jit(nnx.value_and_grad(loss_fn))(models.MLP(rngs=nnx.Rngs(0)), batch(size))


def loop_collectives(compiled, mesh, *, by_axes: bool = False) -> dict:
    """Collectives inside while-loop bodies (run once per microbatch), by kind
    (or by (kind, axes))."""
    text = compiled.as_text()
    blocks, name = {}, None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head:
            name = head.group(1)
            blocks[name] = []
        elif name is not None:
            blocks[name].append(line)
    todo, seen = re.findall(r"body=%?([\w.\-]+)", text), set()
    while todo:
        block = todo.pop()
        if block in seen or block not in blocks:
            continue
        seen.add(block)
        for line in blocks[block]:
            todo += re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line)
    body = "\n".join(line for b in seen for line in blocks[b])
    if by_axes:
        return dict(collections.Counter((c.kind, c.axes) for c in collectives(body, mesh)))
    return {k: v for k, v in count_collectives(body, mesh).items() if v}


def compile_both(grad_fn, model, x, mesh):
    """(compiled k=1, compiled k=4, the k=4 result), under `mesh`."""
    with jax.set_mesh(mesh):
        one = nnx.jit(accumulate(grad_fn, microbatches=1)).lower(model, x).compile()
        four = nnx.jit(accumulate(grad_fn, microbatches=K))
        compiled = four.lower(model, x).compile()
        return one, compiled, four(model, x)


def temp(compiled) -> int:
    return compiled.memory_analysis().temp_size_in_bytes


# Numerics ------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["value_and_grad", "grad", "has_aux"])
def test_matches_full_batch_on_one_device(which):
    x = batch(64)
    make = {
        "value_and_grad": lambda: nnx.value_and_grad(loss_fn),
        "grad": lambda: nnx.grad(loss_fn),
        "has_aux": lambda: nnx.value_and_grad(aux_loss_fn, has_aux=True),
    }[which]
    want = nnx.jit(make())(models.MLP(rngs=nnx.Rngs(0)), x)
    got = nnx.jit(accumulate(make(), microbatches=K))(models.MLP(rngs=nnx.Rngs(0)), x)
    if which == "grad":
        assert max_rel_err(got, want) <= REL_TOL
        return
    assert max_rel_err(got[1], want[1]) <= REL_TOL
    if which == "has_aux":
        (loss, aux), ((ref_loss, ref_aux), _) = got[0], want
        assert rel_err(aux["mean_out"], ref_aux["mean_out"]) <= REL_TOL
        assert int(aux["positive"]) == int(ref_aux["positive"])  # counts are summed
        assert aux["positive"].dtype == ref_aux["positive"].dtype
    else:
        loss, ref_loss = got[0], want[0]
    assert rel_err(loss, ref_loss) <= REL_TOL


def test_sum_reduction_matches_a_sum_loss():
    def sum_loss(model, x):
        return jnp.sum(model(x) ** 2)

    x = batch(64)
    loss, grads = nnx.jit(nnx.value_and_grad(sum_loss))(models.MLP(rngs=nnx.Rngs(0)), x)
    got = accumulate(nnx.value_and_grad(sum_loss), microbatches=K, reduction="sum")
    acc_loss, acc_grads = nnx.jit(got)(models.MLP(rngs=nnx.Rngs(0)), x)
    assert rel_err(acc_loss, loss) <= REL_TOL
    assert max_rel_err(acc_grads, grads) <= REL_TOL


# Data parallel and ZeRO-1/2: one gradient sync per step --------------------------------


DP_CASES = {  # plan, grad_fn, spec of the up.kernel gradient
    "dp": ({"": Replicated()}, lambda: nnx.value_and_grad(loss_fn), P(None, None)),
    "zero1": (ZeRO(stage=1, min_size=16), lambda: nnx.value_and_grad(loss_fn), P(None, None)),
    "zero2": (ZeRO(stage=2, min_size=16), lambda: zero.value_and_grad(loss_fn), P(None, "data")),
}


@pytest.mark.parametrize("case", list(DP_CASES))
def test_data_parallel_syncs_once(case, kind, data8):
    plan, make, grad_spec = DP_CASES[case]
    mesh = data8
    x = batch()
    ref_loss, ref_grads = reference()
    model = parallelize(models.MLP(rngs=nnx.Rngs(0)), mesh, plan)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    one, four, (loss, grads) = compile_both(make(), model, xs, mesh)
    # The same collectives as without accumulation, and none of them in the loop:
    # the gradients are synchronised once, after the k microbatches.
    assert count_collectives(four, mesh) == count_collectives(one, mesh)
    assert loop_collectives(four, mesh) == {}
    assert count_collectives(one, mesh)["all-reduce"] == 1  # XLA combines them into one
    assert temp(four) <= MEMORY_RATIO * temp(one), (temp(four), temp(one))
    assert rel_err(loss, ref_loss) <= REL_TOL
    assert max_rel_err(grads, ref_grads) <= REL_TOL
    assert grads["up"]["kernel"][...].sharding.spec in (grad_spec, P())


def test_a_plain_scan_would_sync_every_microbatch():
    """The control for the test above: the global path (a GSPMD-level scan) on a
    data-parallel model keeps the gradient all-reduce inside the loop."""
    from nnx_parallel.accumulate import _global

    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    model = parallelize(models.MLP(rngs=nnx.Rngs(0)), mesh, {"": Replicated()})
    xs = jax.device_put(batch(), NamedSharding(mesh, P("data")))
    plain = nnx.jit(lambda m, x: _global(nnx.value_and_grad(loss_fn), m, (x,), {}, K, "mean"))
    with jax.set_mesh(mesh):
        compiled = plain.lower(model, xs).compile()
    assert loop_collectives(compiled, mesh) == {"all-reduce": 1}  # runs K times per step


# FSDP: the accumulator is a shard ---------------------------------------------------------


def test_fsdp_accumulates_shards(kind, fsdp8):
    mesh = fsdp8
    x = batch()
    ref_loss, ref_grads = reference()
    model = parallelize(models.MLP(rngs=nnx.Rngs(0)), mesh, FSDP("fsdp", min_size=16))
    xs = jax.device_put(x, NamedSharding(mesh, P("fsdp")))
    one, four, (loss, grads) = compile_both(nnx.value_and_grad(loss_fn), model, xs, mesh)
    counts = count_collectives(one, mesh)
    assert count_collectives(four, mesh) == counts
    # Each microbatch gathers and reduce-scatters, as FSDP does per call; the
    # gathers stay in the loop (no whole parameter lives across microbatches).
    # 2 sharded kernels gathered in forward, and down.kernel again in backward
    # (the only one whose gradient computation reads it); biases travel by
    # all-reduce (runtime/buckets.py).
    in_loop = loop_collectives(four, mesh)
    assert in_loop["all-gather"] == counts["all-gather"] == 3
    assert in_loop["reduce-scatter"] == counts["reduce-scatter"] == 2
    # The loop state holds 1/8 of each kernel, never a whole (16, 64) gradient.
    carry = next(line for line in four.as_text().splitlines() if " while(" in line)
    assert "f32[16,8]" in carry and "f32[8,16]" in carry
    assert "f32[16,64]" not in carry and "f32[64,16]" not in carry
    assert grads["up"]["kernel"][...].sharding.spec == P(None, "fsdp")
    assert temp(four) <= MEMORY_RATIO * temp(one), (temp(four), temp(one))
    assert rel_err(loss, ref_loss) <= REL_TOL
    assert max_rel_err(grads, ref_grads) <= REL_TOL


# One optimizer step ----------------------------------------------------------------------


def make_step(grad_fn):
    @nnx.jit
    def step(model, opt, x):
        loss, grads = grad_fn(model, x)
        opt.update(model, grads)
        return loss

    return step


@functools.cache
def reference_step(size=256):
    """Parameters of the unsharded model after one full-batch Adam step."""
    ref = models.MLP(rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(ref, optax.adam(1e-2), wrt=nnx.Param)
    make_step(nnx.value_and_grad(loss_fn))(ref, opt, batch(size))
    return helpers.params(ref)


def test_optimizer_step_matches_full_batch(kind, data8):
    mesh = data8
    model = parallelize(models.MLP(rngs=nnx.Rngs(0)), mesh, {"": Replicated()})
    with jax.set_mesh(mesh):
        opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
        step = make_step(accumulate(nnx.value_and_grad(loss_fn), microbatches=K))
        step(model, opt, jax.device_put(batch(256), NamedSharding(mesh, P("data"))))
    want = reference_step()
    for name, value in helpers.params(model).items():
        helpers.assert_close(value, want[name], helpers.STEP_TOL, name)


# Errors ------------------------------------------------------------------------------------


def test_errors():
    grad_fn = nnx.value_and_grad(loss_fn)
    model = models.MLP(rngs=nnx.Rngs(0))
    with pytest.raises(ParallelError, match=r"microbatches must be an int, got float"):
        accumulate(grad_fn, microbatches=2.0)
    with pytest.raises(ParallelError, match=r"microbatches must be an int, got bool"):
        accumulate(grad_fn, microbatches=True)
    with pytest.raises(ParallelError, match=r"microbatches must be >= 1. Pass 1 for no"):
        accumulate(grad_fn, microbatches=0)
    with pytest.raises(ParallelError, match=r"reduction must be one of \('mean', 'sum'\)"):
        accumulate(grad_fn, microbatches=2, reduction="avg")
    f = accumulate(grad_fn, microbatches=3)
    with pytest.raises(ParallelError, match=r"batch size 8 .* not divisible by 3. Use a batch"):
        f(model, jnp.ones((8, 16)))
    with pytest.raises(ParallelError, match=r"differ in dim 0 \(\{'\[0\]': 6, '\[1\]': 3\}\)"):
        f(model, jnp.ones((6, 16)), jnp.ones((3,)))
    with pytest.raises(ParallelError, match=r"args\[0\] is a scalar.*as keyword arguments"):
        f(model, jnp.float32(1.0))
    with pytest.raises(ParallelError, match=r"no batch array among the positional arguments"):
        f(model)
    with pytest.raises(ParallelError, match=r"first argument must be the nnx.Module, got Array"):
        f(jnp.ones((6, 16)), model)


@pytest.mark.parametrize("style", ["dp", "fsdp"])
def test_error_batch_not_divisible_by_devices_times_k(style):
    axis = "data" if style == "dp" else "fsdp"
    mesh = jax.make_mesh((8,), (axis,), axis_types=(AxisType.Auto,))
    plan = {"": Replicated()} if style == "dp" else FSDP("fsdp", min_size=16)
    model = parallelize(models.MLP(rngs=nnx.Rngs(0)), mesh, plan)
    x = jax.device_put(jnp.ones((16, 16)), NamedSharding(mesh, P(axis)))
    f = accumulate(nnx.value_and_grad(loss_fn), microbatches=4)
    match = rf"split over mesh axes \('{axis}',\) \(8 devices\).*must be a multiple of 32"
    with jax.set_mesh(mesh), pytest.raises(ParallelError, match=match):
        nnx.jit(f)(model, x)


# Tensor parallel x data parallel; model state ----------------------------------------------


def test_tensor_parallel_times_data_parallel(kind, mesh2x4):
    mesh = mesh2x4
    plan = {"up": ColumnParallel("model"), "down": RowParallel("model")}
    model = parallelize(models.MLP(rngs=nnx.Rngs(0)), mesh, plan)
    x = batch()
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ref_loss, ref_grads = reference()
    one, four, (loss, grads) = compile_both(nnx.value_and_grad(loss_fn), model, xs, mesh)
    assert count_collectives(four, mesh) == count_collectives(one, mesh)
    in_loop = loop_collectives(four, mesh, by_axes=True)
    if kind == AxisType.Auto:
        # Only the row-parallel forward all-reduce runs per microbatch; the gradient
        # all-reduce over 'data' runs once, after the loop.
        assert in_loop == {("all-reduce", ("model",)): 1}
    else:
        # Documented: Explicit axes take the global path (gradient sync per microbatch).
        assert in_loop == {("all-reduce", ("model",)): 1, ("all-reduce", ("data",)): 1}
    assert grads["up"]["kernel"][...].sharding.spec == P(None, "model")
    assert temp(four) <= MEMORY_RATIO * temp(one), (temp(four), temp(one))
    assert rel_err(loss, ref_loss) <= REL_TOL
    assert max_rel_err(grads, ref_grads) <= REL_TOL


class DropoutMLP(nnx.Module):
    def __init__(self, *, rngs):
        self.mlp = models.MLP(rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(self.mlp(x))


def test_rng_state_advances_once_per_microbatch(kind):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(kind,))
    model = parallelize(DropoutMLP(rngs=nnx.Rngs(0)), mesh, {"": Replicated()})
    with jax.set_mesh(mesh):  # a replicated batch is laid out over 'data' first
        nnx.jit(accumulate(nnx.value_and_grad(loss_fn), microbatches=K))(model, batch(256))
    assert int(model.drop.rngs.count[...]) == K  # as K sequential calls


class NormMLP(nnx.Module):
    def __init__(self, *, rngs):
        self.up = nnx.Linear(16, 64, rngs=rngs)
        self.norm = nnx.BatchNorm(64, rngs=rngs)
        self.down = nnx.Linear(64, 16, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.norm(self.up(x))))


def test_batch_stats_match_sequential_microbatches():
    x = batch(64)
    model, ref = NormMLP(rngs=nnx.Rngs(0)), NormMLP(rngs=nnx.Rngs(0))

    one = nnx.jit(nnx.value_and_grad(loss_fn))  # microbatch i: rows i, i + K, i + 2K, ...
    outs = [one(ref, x[i::K]) for i in range(K)]
    want_loss, want_grads = jax.tree.map(lambda *a: sum(a) / K, *outs)
    loss, grads = nnx.jit(accumulate(nnx.value_and_grad(loss_fn), microbatches=K))(model, x)
    assert rel_err(loss, want_loss) <= REL_TOL
    assert max_rel_err(grads, want_grads) <= REL_TOL
    for name in ("mean", "var"):
        got, want = getattr(model.norm, name)[...], getattr(ref.norm, name)[...]
        assert rel_err(got, want) <= REL_TOL, name
