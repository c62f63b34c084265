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

`GatherPlan.regather=False` (FSDP's `reshard_after_forward=False`) saves the
gathered copy for backward instead: one all-gather per parameter per step, memory
O(depth).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from nnx_parallel import _compat, _specs
from nnx_parallel.runtime import buckets

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
      regather: Gather again in backward (False: save the gathered copy).
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
    regather: bool = True
    prefetch: int = 0
    param_dtype: Any = None
    reduce_dtype: Any = None


def _axis(axes: tuple[str, ...]):
    return axes if len(axes) > 1 else axes[0]


def _is_float(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


# XLA:CPU workaround, see docs/xla_cpu.md (the tie against CSE).
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


def gather_leaves(shards: list, plan: GatherPlan, *, vectors: bool = True) -> list:
    """All-gathers each leaf on its dim over `plan.axes`, cast to param_dtype
    first: one all-gather per dtype for the leaves of 2 or more dims, one
    all-reduce per dtype for the rest (`buckets.psum_gather`). Without
    `vectors`, the 0-1-dim leaves come back as None."""
    out = [_cast(x, plan.param_dtype) for x in shards]
    axis = _axis(plan.axes)
    for small, collect in ((False, buckets.all_gather), (True, buckets.psum_gather)):
        where = [
            i for i, d in enumerate(plan.dims) if d is not _NO_DIM and is_vector(out[i]) == small
        ]
        if small and not vectors:
            for i in where:
                out[i] = None
        elif where:
            full = collect([out[i] for i in where], [plan.dims[i] for i in where], axis)
            for i, x in zip(where, full):
                out[i] = x
    return out


def is_vector(x) -> bool:
    """A leaf gathered with `psum_gather` and saved for backward (0 or 1 dims)."""
    return x.ndim <= 1


def _varying(x, axes: tuple[str, ...]):
    """`x` typed as varying over `axes` (so its vjp sums nothing implicitly)."""
    have = _compat.varying_axes(x)
    return _compat.pcast_varying(x, tuple(a for a in axes if a not in have))


def scatter_grads(grads: list, shards: list, plan: GatherPlan) -> list:
    """The gradients of the shards, None for non-float ones.

    Matrices: one reduce-scatter over `axes` per dtype, then a sum over the
    other manual axes the shard is replicated on. Vectors (see `is_vector`)
    and leaves used whole: one all-reduce per group of axes and dtype, a
    vector then keeps its own chunk.
    """
    out: list = [None] * len(shards)
    live = [i for i, (g, s) in enumerate(zip(grads, shards)) if g is not None and _is_float(s)]
    cast = {i: _cast(grads[i], plan.reduce_dtype) for i in live}
    gathered = {i for i in live if plan.dims[i] is not _NO_DIM}
    mats = [i for i in live if i in gathered and not is_vector(shards[i])]
    axis, n = _axis(plan.axes), _compat.axis_size(plan.axes)
    if mats:
        mine = buckets.reduce_scatter(
            [cast[i] for i in mats], [plan.dims[i] for i in mats], axis, n
        )
        cast.update(zip(mats, mine))
    # Sum over the manual axes the shard is replicated on (its type says which);
    # a gathered vector's sum is over `axes` too.
    sums = []
    for i in live:
        extra = _compat.varying_axes(cast[i]) - _compat.varying_axes(shards[i])
        if i in gathered and i not in mats:
            extra |= set(plan.axes)
        sums.append(tuple(sorted(extra)))
    summed = dict(zip(live, buckets.psum([cast[i] for i in live], sums)))
    me = jax.lax.axis_index(axis) if len(gathered) > len(mats) else None
    for i in live:
        g = summed[i]
        if i in gathered and i not in mats:
            size = shards[i].shape[plan.dims[i]]
            g = jax.lax.dynamic_slice_in_dim(g, me * size, size, axis=plan.dims[i])
        out[i] = g.astype(shards[i].dtype)
    return out


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
    @functools.partial(jax.checkpoint, policy=_save_all_but_layout)
    def forward(full, inputs):
        return fn(full, _cast_inputs(inputs, plan))

    def gather(shards, dep, vectors=True):
        full = gather_leaves(tie(shards, dep, plan.batch_axes), plan, vectors=vectors)
        # Varying over the batch axes: the vjp then sums nothing implicitly;
        # `_scatter` reduce-scatters each gradient itself.
        return [_varying(x, plan.batch_axes) if x is not None and _is_float(x) else x for x in full]

    @jax.custom_vjp
    def run(shards, inputs, prev):
        full = gather_leaves(tie(shards, prev if chained else inputs, plan.batch_axes), plan)
        return forward(full, inputs), _token(inputs)

    def fwd(shards, inputs, prev):
        full = gather(shards, prev if chained else inputs)
        # The call's own residuals (activations) are saved, so backward does not
        # run the forward again; the gathered matrices are not (without regather: they are)
        # and backward gathers them again. Vectors are saved: they are small.
        drop = [] if not plan.regather else [x for x in full if not is_vector(x)]
        out, kept, rebuild = _compat.vjp_without(forward, (full, inputs), drop)
        floats = jax.tree.map(_is_float, inputs)
        return (out, _token(inputs)), (shards, prev, kept, _Static((rebuild, floats)))

    def bwd(res, cts):
        shards, prev, kept, static = res
        rebuild, floats = static.value
        g, g_token = cts
        again = []
        if plan.regather:
            # prefetch: the next call's backward sends g_token as soon as it starts.
            when = g_token if plan.prefetch else g
            again = [
                x for x in gather(shards, when, vectors=False) if x is not None and not is_vector(x)
            ]
        g_full, g_inputs = rebuild(kept, again)(g)
        g_shards = scatter_grads(list(g_full), shards, plan)
        g_inputs = jax.tree.map(lambda gi, f: gi if f else None, g_inputs, floats)
        zero = _zero(g)
        g_prev = jax.tree.map(lambda t: jnp.zeros_like(t) + zero.astype(t.dtype), prev)
        return g_shards, g_inputs, g_prev

    run.defvjp(fwd, bwd)
    return run


# What a unit saves for backward: everything but layout ops (reshape,
# transpose, convert, broadcast, slices: copies of a value in another shape or
# dtype). Those are recomputed in backward from what they read, so a weight's
# transpose or cast is rebuilt from the re-gathered weight instead of keeping
# a param-sized copy of the forward's gathered buffer alive until backward.
# Element-wise math (activations, norms, softmax) is saved, not recomputed:
# measured on the GPT of benchmarks/step_time.py (d 256, 8 blocks, Adam step),
# recomputing it as well cost 134.66 MiB temp and 1.0049x DP's gradient FLOPs;
# recomputing layout ops only, 118.63 MiB and 1.0029x.
_LAYOUT_OPS = frozenset(
    """convert_element_type reduce_precision broadcast_in_dim reshape transpose squeeze
    expand_dims copy copy_p slice dynamic_slice concatenate pad rev iota pvary pcast
    bitcast_convert_type""".split()
)


def _save_all_but_layout(prim, *_, **__) -> bool:
    return prim.name not in _LAYOUT_OPS


class _Static:
    """A residual that is no array (a function, flags): a pytree with no leaves."""

    def __init__(self, value):
        self.value = value


jax.tree_util.register_pytree_node(_Static, lambda s: ((), s), lambda s, _: s)
