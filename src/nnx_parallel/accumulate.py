"""Gradient accumulation: one step's gradients from k microbatches, under a scan.

`accumulate(grad_fn, microbatches=k)` wraps `nnx.value_and_grad(loss_fn)`,
`nnx.grad(loss_fn)` or `nnx_parallel.zero.value_and_grad(loss_fn)` and returns
a function with the same signature. It splits dim 0 of every positional batch
array into k microbatches (microbatch i holds rows i, i + k, i + 2k, ...),
runs `grad_fn` on each inside one `jax.lax.scan` and combines what it returns:
with `reduction="mean"` (a loss that is a mean over its batch) the average over
microbatches, with `"sum"` the sum. Either way the result is that of the full
batch, while only one microbatch's activations are alive at a time.

The model is split once: its `nnx.Param`s are loop-invariant operands of the
scan (read, never carried, so XLA neither copies them per iteration nor
threads them through the loop state), and its other state (RNG counters,
batch statistics) is the scan's carry, so it advances from one microbatch to
the next exactly as k sequential calls would advance it.

Two paths, chosen once per trace from the model (`_choose`):

- `per-device`: the batch axes (`axis`) are in the parameters' mesh, no
  parameter is sharded over them (on Explicit axes: over any axis), no FSDP
  hook, no `nnx.BatchStat`. Gradient sync: none in the loop; one all-reduce
  (ZeRO-2: one reduce-scatter) after it.
- `global`: everything else (FSDP, one device, no mesh, batch statistics,
  tensor parallel on Explicit axes). Gradient sync: whatever `grad_fn` does,
  once per microbatch; each accumulator keeps its gradient's layout.

Tensor parallel on Explicit axes takes the global path because a partly
manual `shard_map` over the batch axes makes XLA all-gather the
tensor-parallel shards at its boundary (measured: 6 all-gathers for a
column/row-parallel MLP on a 2x4 mesh); on Auto axes it does not.

`per-device` runs the scan inside a `shard_map` over the batch axes, with the
parameters cast to device-varying, so each device's gradients stay partial
sums of its own rows; they are reduced once, after the scan (a plain scan at
the GSPMD level would all-reduce inside the loop, k times per step). With
`zero.value_and_grad` its loss function is differentiated directly and its
reduce-scatter deferred to the end.

`global` runs the scan at the GSPMD level and keeps each accumulator in its
gradient's layout. For FSDP each microbatch's backward reduce-scatters (the
transpose of the per-call all-gather), so the accumulator is a shard, never a
whole gradient; an `optimization_barrier` ties the sharded parameters to the
loop index so XLA does not hoist their all-gathers out of the loop and keep
whole parameters alive through it (not with `reshard_after_forward=False`).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from nnx_parallel import _compat, _specs
from nnx_parallel.accumulate_aux import AuxCodec
from nnx_parallel.accumulate_scan import _global, _is_array, _params_mesh, _per_device
from nnx_parallel.core.layouts import get_hooks
from nnx_parallel.errors import ParallelError

REDUCTIONS = ("mean", "sum")


def accumulate(
    grad_fn: Callable,
    *,
    microbatches: int,
    reduction: str = "mean",
    axis: str | tuple[str, ...] = "data",
    aux_reduce: str | Mapping[str, Any] | None = None,
) -> Callable:
    """Gradient accumulation over `microbatches` slices of the batch, under a scan.

    Reads as "accumulate this `value_and_grad` over k microbatches":
    `accumulate(nnx.value_and_grad(loss_fn), microbatches=4)` returns a
    function with the signature of `nnx.value_and_grad(loss_fn)`. Every array
    leaf of the positional arguments after the model is a batch argument, split
    on dim 0; keyword arguments and non-array leaves are passed whole to every
    microbatch. Every leaf `grad_fn` returns (loss, aux, gradients) is combined
    with `reduction`; integer leaves (counts) are always summed; aux leaves
    that are not float or integer scalars follow `aux_reduce`.

    On a data-parallel model (replicated parameters, batch sharded over
    `axis`) and with ZeRO-1/2, gradients are accumulated per device and
    synchronised once per step, as with `microbatches=1`. With FSDP each
    microbatch's gradients are reduce-scattered by the layers' own backward and
    accumulated as shards.

    Args:
      grad_fn: `nnx.value_and_grad(loss_fn)`, `nnx.grad(loss_fn)` (optionally
        `has_aux=True`) or `zero.value_and_grad(loss_fn)`, called as
        `grad_fn(model, *batch, **kwargs)`.
      microbatches: k >= 1; dim 0 of every batch array must divide by k, and
        by k times the devices each microbatch is split over where that is
        known (`axis` on the data-parallel path, FSDP's batch axes, an
        Explicit batch layout). 1 calls `grad_fn` unchanged.
      reduction: "mean" if the loss is a mean over its batch (the result is
        the average over microbatches, equal to the full batch's), "sum" if it
        is a sum (the result is the sum).
      axis: The mesh axis (or axes) the batch is sharded over, for the
        data-parallel path. `zero.value_and_grad` brings its own axis.
      aux_reduce: How to combine `has_aux` outputs: one of "mean", "sum",
        "max", "min", "concat" (per-example values, in batch order), "last",
        or a dict (nested like the aux) of them per leaf. Unnamed leaves: float
        scalars follow `reduction`, integer scalars are summed; bools and
        per-example arrays raise, naming the reduction to pass (see
        `accumulate_aux`).

    Returns:
      A function `(model, *batch, **kwargs) -> what grad_fn returns`. The
      model's non-parameter state is updated as k calls would update it.

    Raises:
      ParallelError: `microbatches` is not an int >= 1, `reduction` is not
        "mean" or "sum", the first argument is not an `nnx.Module`, there is no
        batch array, the batch arrays differ in dim 0, or dim 0 does not divide.

    Example:
      >>> mlp = TinyMLP(rngs=nnx.Rngs(0))
      >>> loss_fn = lambda m, x: (m(x) ** 2).mean()
      >>> x = jax.random.normal(jax.random.key(0), (32, 16))
      >>> loss, grads = nnx.jit(accumulate(nnx.value_and_grad(loss_fn), microbatches=4))(mlp, x)
      >>> full_loss, full_grads = nnx.jit(nnx.value_and_grad(loss_fn))(mlp, x)
      >>> got, want = grads["up"]["kernel"][...], full_grads["up"]["kernel"][...]
      >>> bool(jax.numpy.allclose(got, want, atol=1e-6))
      True
    """
    k = _check_microbatches(microbatches)
    if reduction not in REDUCTIONS:
        raise ParallelError(
            f"accumulate(reduction={reduction!r}): reduction must be one of {REDUCTIONS}. Use "
            "'mean' when the loss is a mean over its batch, 'sum' when it is a sum."
        )
    axes = _specs.axes_of(axis)
    zero_loss = getattr(grad_fn, "zero_loss_fn", None)
    if zero_loss is not None:
        axes = (grad_fn.zero_axis,)

    @functools.wraps(grad_fn, updated=())
    def run(model, *batch, **kwargs):
        if not isinstance(model, nnx.Module):
            raise ParallelError(
                "accumulate: the first argument must be the nnx.Module, got "
                f"{type(model).__name__}. Call the accumulated function as f(model, *batch)."
            )
        size = _batch_size(batch)
        _check_divisible(size, k)
        if k == 1:
            return grad_fn(model, *batch, **kwargs)
        plan = _choose(model, axes)
        _check_divisible(size, k, *_row_axes(model, batch, plan))
        if plan is None:
            # zero.value_and_grad's gradients are not laid out as their parameters.
            codec = AuxCodec(aux_reduce, k, size // k)
            out = _global(
                grad_fn, model, batch, kwargs, k, reduction, codec, declared=zero_loss is None
            )
            return codec.decode(out)
        mesh, used = plan
        n = math.prod(mesh.shape[a] for a in used)
        codec = AuxCodec(aux_reduce, k, size // (k * n), n)
        inner = grad_fn if zero_loss is None else nnx.value_and_grad(zero_loss)
        zero2 = zero_loss is not None
        out = _per_device(inner, model, batch, kwargs, k, reduction, mesh, used, zero2, codec)
        return codec.decode(out)

    return run


# Checks ---------------------------------------------------------------------------


def _check_microbatches(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ParallelError(
            f"accumulate(microbatches={k!r}): microbatches must be an int, got "
            f"{type(k).__name__}. Pass the number of microbatches, e.g. microbatches=4."
        )
    if k < 1:
        raise ParallelError(
            f"accumulate(microbatches={k}): microbatches must be >= 1. Pass 1 for no "
            "accumulation, or the number of slices to split the batch into."
        )
    return int(k)


def _check_divisible(size: int, k: int, n: int = 1, axes: tuple[str, ...] = ()) -> None:
    if size % (n * k) == 0:
        return
    if n == 1:
        raise ParallelError(
            f"accumulate(microbatches={k}): the batch size {size} (dim 0 of the batch "
            f"arguments) is not divisible by {k}. Use a batch size that is a multiple of {k}, "
            "or a number of microbatches that divides it."
        )
    raise ParallelError(
        f"accumulate(microbatches={k}): the batch size {size} is split over mesh axes {axes} "
        f"({n} devices) and then into {k} microbatches, so it must be a multiple of {n * k}. "
        f"Use a batch size that is a multiple of {n * k}, or fewer microbatches."
    )


def _row_axes(model, batch, plan) -> tuple[int, tuple[str, ...]]:
    """(devices each microbatch is split over, their mesh axes), where known."""
    if plan is not None:
        mesh, axes = plan
    else:
        gathers = [
            h.gather
            for _, node in nnx.iter_graph(model)
            if (h := get_hooks(node)) is not None and h.gather is not None
        ]
        mesh = _params_mesh(model)
        first = next(x for x in jax.tree.leaves(batch) if _is_array(x))
        lead = tuple(_compat.spec_of(first) or (None,))[:1]
        if gathers:  # FSDP splits each call over its batch axes
            axes = gathers[0].batch_axes
        elif lead and lead[0] is not None:  # an Explicit type says where dim 0 lives
            axes = _specs.axes_of(lead[0])
        else:
            return 1, ()
        mesh = mesh if mesh is not None else _compat.abstract_mesh()
    return math.prod(mesh.shape[a] for a in axes), tuple(axes)


def _batch_size(batch) -> int:
    leaves = jax.tree_util.tree_leaves_with_path(batch)
    arrays = [(jax.tree_util.keystr(p), x) for p, x in leaves if _is_array(x)]
    if not arrays:
        raise ParallelError(
            "accumulate: no batch array among the positional arguments after the model. Call it as "
            "f(model, x, ...) with the batch arrays positional (keyword arguments are not split)."
        )
    for name, x in arrays:
        if x.ndim == 0:
            raise ParallelError(
                f"accumulate: batch argument args{name} is a scalar, it has no dim 0 to split. "
                "Pass values that are the same for every microbatch as keyword arguments."
            )
    sizes = {name: int(x.shape[0]) for name, x in arrays}
    if len(set(sizes.values())) > 1:
        raise ParallelError(
            f"accumulate: the batch arguments differ in dim 0 ({sizes}); each is split into "
            "microbatches on dim 0, so all must have the same batch size. Pass arrays that are "
            "not per-example as keyword arguments."
        )
    return next(iter(sizes.values()))


# Which path -------------------------------------------------------------------------


def _choose(model, axes: tuple[str, ...]) -> tuple[Mesh, tuple[str, ...]] | None:
    """(mesh, batch axes) for the per-device path, or None for the global one."""
    mesh = _params_mesh(model)
    if mesh is None:
        return None
    used = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)
    if not used:
        return None
    for _, node in nnx.iter_graph(model):
        hooks = get_hooks(node)
        if hooks is not None and hooks.gather is not None:
            return None  # FSDP: its backward reduce-scatters per call
    explicit = _compat.is_explicit(mesh)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        spec = _compat.get_declared_spec(var) or ()
        names = _specs.spec_axes(spec)
        if names & set(used) or (explicit and names):
            # Sharded over the batch axes: not replicated per device. Tensor-parallel
            # on Explicit axes: a partly manual shard_map gathers the shards (measured).
            return None
    if nnx.to_flat_state(nnx.state(model, nnx.BatchStat)):
        return None  # statistics of a per-device slice are not the batch's
    return mesh, used
