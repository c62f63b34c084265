"""The FSDP gather as one differentiable call: all-gather, compute, re-gather, reduce-scatter.

`gathered_call(fn, shards, inputs, plan)` runs `fn(params, inputs)` inside a
manual region (`shard_map` over the batch axes) on parameters all-gathered
from their local shards, under a `jax.custom_vjp`:

- forward: each shard is *tied* to a dependency (the call's inputs, or with
  prefetch the previous call's token), cast to the compute dtype and
  all-gathered. Only the shards and the inputs are saved for backward,
  never the gathered copy.
- backward: the shards are tied to the incoming cotangent (prefetch: to
  the next call's token cotangent) and gathered again, the call's vjp runs
  on that copy, and the parameter gradients are cast to the reduce dtype
  and reduce-scattered (then summed over the batch axes the parameter is
  replicated on).

Why the tie: a plain `all_gather` in forward and again in backward (what
`jax.checkpoint` asks for) lowers to two identical instructions, which XLA's
CSE merges into one, whose result then lives from forward to backward on
every layer: step memory O(depth). `tie` adds to each shard an exact zero
computed from the dependency; no XLA pass can prove it zero, so the two
gathers are different values, and neither can run before its dependency is
ready. An `optimization_barrier` does not do this: XLA:CPU expands barriers
before CSE, and the gathers merge again.

`GatherPlan.keep` (FSDP's `reshard_after_forward=False`) saves the gathered
copy for backward instead: one all-gather per parameter per step, memory
O(depth).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from nnx_parallel import _compat, _specs

_NO_DIM = None


@dataclasses.dataclass(frozen=True)
class GatherPlan:
    """How `gathered_call` gathers and scatters one module's parameters.

    Attributes:
      dims: Per flattened parameter leaf, the dim to gather (None: the leaf
        is used as it is and gets a plain all-reduce-free cotangent).
      axes: Manual mesh axes to all-gather over and reduce-scatter over.
      batch_axes: Manual axes the batch is split over; a gradient is summed
        over those of them that are not in `axes`.
      keep: Save the gathered copy for backward (no re-gather).
      prefetch: 0: each gather waits for its own call's input (forward) or
        output cotangent (backward). 1: for the previous call's token, so
        it can run while the previous call computes (see `gathered_call`).
      param_dtype: Cast floating shards to this dtype before gathering, and
        floating inputs before the call (None: keep dtypes).
      reduce_dtype: Dtype gradients are reduce-scattered in (None: the
        gradient's own dtype).
    """

    dims: tuple[int | None, ...]
    axes: tuple[str, ...]
    batch_axes: tuple[str, ...] = ()
    keep: bool = False
    prefetch: int = 0
    param_dtype: Any = None
    reduce_dtype: Any = None


def _axis(axes: tuple[str, ...]):
    return axes if len(axes) > 1 else axes[0]


def _is_float(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def tie(leaves: list, dep, batch_axes: tuple[str, ...] = ()) -> list:
    """`leaves`, made to depend on `dep` through a data dependency XLA keeps.

    Each floating leaf gets a zero added that is computed from one element
    `e` of `dep` (`where(isfinite(e), e, 0) * 0`: exactly zero, whatever
    `e`). No XLA pass can prove it zero, so whatever is computed from the
    result waits for `dep` and is a new value that CSE cannot merge with the
    same computation on `leaves` elsewhere. (An `optimization_barrier` is
    not enough: XLA:CPU expands barriers before CSE.)
    """
    zero = _zero(dep)
    if zero is None:
        return list(leaves)
    # Never make a leaf vary over a manual axis other than the batch axes (a
    # tensor-parallel axis): a bias replicated over 'model' must stay so.
    extra = _compat.varying_axes(zero) - set(batch_axes)
    return [
        x + zero.astype(x.dtype) if _is_float(x) and extra <= _compat.varying_axes(x) else x
        for x in leaves
    ]


def _cast(x, dtype):
    return x.astype(dtype) if dtype is not None and _is_float(x) else x


def gather_leaves(shards: list, plan: GatherPlan) -> list:
    """All-gathers each leaf on its dim over `plan.axes`, cast to param_dtype first."""
    out = []
    for x, dim in zip(shards, plan.dims):
        x = _cast(x, plan.param_dtype)
        if dim is not _NO_DIM:
            x = _bits_gather(x, _axis(plan.axes), dim)
        out.append(x)
    return out


def _bits_gather(x, axis, dim: int):
    """`all_gather(x)`; a sub-32-bit float is gathered as same-width unsigned
    ints, so the wire carries its own bytes (XLA:CPU otherwise widens a bf16
    all-gather to f32). Not differentiable: only `gathered_call` uses it."""
    if not _is_float(x) or x.dtype.itemsize >= 4:
        return jax.lax.all_gather(x, axis, axis=dim, tiled=True)
    uint = {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]
    bits = jax.lax.all_gather(jax.lax.bitcast_convert_type(x, uint), axis, axis=dim, tiled=True)
    return jax.lax.bitcast_convert_type(bits, x.dtype)


def _varying(x, axes: tuple[str, ...]):
    """`x` typed as varying over `axes` (so its vjp sums nothing implicitly)."""
    have = _compat.varying_axes(x)
    return _compat.pcast_varying(x, tuple(a for a in axes if a not in have))


def _scatter(grad, shard, dim, plan: GatherPlan):
    """The gradient of one shard: reduce-scatter over `axes`, psum over the rest."""
    if grad is None or not _is_float(shard):
        return None
    g = _cast(grad, plan.reduce_dtype)
    if dim is not _NO_DIM:
        g = jax.lax.psum_scatter(g, _axis(plan.axes), scatter_dimension=dim, tiled=True)
    # Sum over the manual axes the shard is replicated on (its type says which).
    extra = tuple(sorted(_compat.varying_axes(g) - _compat.varying_axes(shard)))
    if extra:
        g = jax.lax.psum(g, extra)
    return g.astype(shard.dtype)


def gathered_call(fn: Callable, shards: list, inputs: Any, plan: GatherPlan, prev: Any = None):
    """`fn(gathered_leaves, inputs)` with FSDP gathers, in a manual region.

    Args:
      fn: The computation, called with the list of gathered parameter leaves
        (same order as `shards`) and `inputs` (a pytree, possibly cast).
      shards: The local parameter leaves.
      inputs: Pytree of the call's other operands (activations, state).
      plan: How to gather and scatter.
      prev: The token an earlier call returned (prefetch): the forward
        gather waits for it instead of for `inputs`, and the backward
        re-gather for its cotangent, which the earlier call's successor
        produces as soon as its own backward starts.

    Returns:
      `(fn's output, token)`: the token is a (1,) float32 array computed
      from `inputs`, to pass as `prev` to the next call.
    """
    return _custom(fn, plan, prev is not None)(shards, inputs, () if prev is None else prev)


def _zero(dep):
    """A float32 scalar zero that XLA cannot prove zero: it depends on `dep`."""
    first = next((d for d in jax.tree.leaves(dep) if hasattr(d, "dtype") and d.size), None)
    if first is None:
        return None
    e = _one_element(first).astype(jnp.float32)
    return jnp.where(jnp.isfinite(e), e, jnp.zeros_like(e)) * 0


def _one_element(x):
    """One element of `x`, read locally where its layout allows.

    On Explicit axes a dim sharded over a non-manual axis cannot be sliced to
    one element; such dims are reduced instead (a scalar all-reduce over
    that axis). Every other dim is indexed at 0.
    """
    sharded = [d for d, e in enumerate(_specs.pad(_compat.spec_of(x), x.ndim)) if e is not None]
    if not sharded:
        return jnp.ravel(x)[0]
    part = x[tuple(slice(None) if d in sharded else 0 for d in range(x.ndim))]
    return jnp.max(part)


def _token(inputs):
    zero = _zero(inputs)
    return jnp.zeros((1,), jnp.float32) if zero is None else jnp.reshape(zero, (1,))


def _cast_inputs(inputs, plan: GatherPlan):
    return jax.tree.map(lambda x: _cast(x, plan.param_dtype), inputs)


def _custom(fn: Callable, plan: GatherPlan, chained: bool):
    @jax.custom_vjp
    def run(shards, inputs, prev):
        full = gather_leaves(tie(shards, prev if chained else inputs, plan.batch_axes), plan)
        return fn(full, _cast_inputs(inputs, plan)), _token(inputs)

    def fwd(shards, inputs, prev):
        if not plan.keep:
            return run(shards, inputs, prev), (shards, inputs, prev, None)
        full = gather_leaves(tie(shards, prev if chained else inputs, plan.batch_axes), plan)
        out = fn(full, _cast_inputs(inputs, plan)), _token(inputs)
        return out, (shards, inputs, prev, full)  # keep: the gathered copy lives on

    def bwd(res, cts):
        shards, inputs, prev, full = res
        g, g_token = cts
        if full is None:
            # prefetch: the next call's backward sends g_token as soon as it starts.
            when = g_token if plan.prefetch else g
            full = gather_leaves(tie(shards, when, plan.batch_axes), plan)
        full = [_varying(x, plan.batch_axes) if _is_float(x) else x for x in full]
        _, vjp = jax.vjp(lambda p, i: fn(p, _cast_inputs(i, plan)), full, inputs)
        g_full, g_inputs = vjp(g)
        g_shards = [_scatter(gf, s, d, plan) for gf, s, d in zip(g_full, shards, plan.dims)]
        g_inputs = jax.tree.map(lambda gi, x: gi if _is_float(x) else None, g_inputs, inputs)
        zero = _zero(g)
        g_prev = jax.tree.map(lambda t: jnp.zeros_like(t) + zero.astype(t.dtype), prev)
        return g_shards, g_inputs, g_prev

    run.defvjp(fwd, bwd)
    return run


# Prefetch: the token of the last gathered call in the current trace ---------------------

_last: list = [None, None]  # [trace state, token]


def last_token() -> Any:
    """The token of the previous gathered call in this trace, or None."""
    state, token = _last
    return token if state is not None and state == _compat.trace_state() else None


def set_last_token(token: Any) -> None:
    _last[:] = [_compat.trace_state(), token]


def clear_last_token() -> None:
    _last[:] = [None, None]


def last_token_state() -> tuple:
    """What `restore_last_token_state` puts back (a refused trace's token must not leak)."""
    return tuple(_last)


def restore_last_token_state(saved: tuple) -> None:
    _last[:] = list(saved)
