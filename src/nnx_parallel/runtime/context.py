"""Context-parallel attention at call time (the `ContextParallel` style).

A hooked attention call runs with every array argument that has the
sequence length laid out sequence-sharded over the style's axis (the first
input on `seq_dim`; positions `(B, S)` and masks `(B, 1, S, S)` on the first
dim of that length after the batch, so a mask is sharded on its query rows)
and its outputs leave sequence-sharded. Inside, the attention itself is put
where the module computes it:

- `jax.nn.dot_product_attention`, looked up at call time (so also through
  `nnx.dot_product_attention`, the default `attention_fn` of
  `nnx.MultiHeadAttention`), is replaced for the duration of the hooked call
  (a scoped patch, restored in `finally`; it only changes what is traced),
  and so is a module's own `attention_fn` attribute.
  `all_gather`: q keeps its sequence shard, K/V are laid out whole over the
  axis (GSPMD all-gathers them; backward reduces dK/dV over it), the output
  is sequence-sharded. `ring`: `ring_attention` below.
- Inline attention (einsum + mask + softmax in the module's code): nothing to
  replace. `all_gather` leaves it to GSPMD: q and the output are
  sequence-sharded, the scores `[B, H, S/cp, S]`, and GSPMD gathers K/V where
  the einsum needs them, after RoPE (tests assert the HLO). `ring` raises a
  `PlanError` after tracing the call (nothing was run).

The arrays are global all along (a layout is not a change of meaning), so a
causal mask the module builds from the sequence length (`tril(S, S)`) stays
right. On Explicit axes the call runs inside `auto_axes` (the region of
`runtime/regions.py`): sharding-in-types would refuse an einsum of two
sequence-sharded operands. A decoding call
(`decode=True`, a one-token input) runs as written, once warned.
"""

from __future__ import annotations

import contextlib

import jax
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat
from nnx_parallel.core.layouts import ContextAttention
from nnx_parallel.errors import PlanError
from nnx_parallel.runtime import layout, regions, trace
from nnx_parallel.runtime.ring import ring_call

U = _compat.UNCONSTRAINED


def decoding(module, args, ctx: ContextAttention, kwargs) -> bool:
    """True for a decoding call (`decode=True`, a one-token or no array
    input): it runs as written (route `context as-written/as-is/as-is`)."""
    x = args[0] if args else None
    if not layout.is_array(x):
        return True
    flag = kwargs.get("decode")
    if flag is True or flag is None and vars(module).get("decode") is True:
        return True
    return x.ndim < -ctx.seq_dim or x.shape[ctx.seq_dim] == 1


def warn_decoding(module, ctx: ContextAttention) -> None:
    name = type(module).__name__
    trace.warn_once(
        (name, "context-decode"),
        f"{name}: a decoding call (decode=True or a one-token input) runs without "
        f"context parallelism over {ctx.axis!r}: its K/V cache is not sequence-sharded.",
        stacklevel=7,
    )


def call(module, method, ctx: ContextAttention, mesh: Mesh, args, kwargs, auto_axes=False):
    """One context-parallel call of `method` (see the module docstring); with
    `auto_axes` (Explicit axes), inside the `auto_axes` region: state and
    modules in the arguments written back, outputs laid out like the first
    input, whose type then has the sequence over the axis."""
    x = args[0]
    seq = _check_length(module, x, ctx, mesh)
    inner = _inner(method, ctx, mesh, seq)
    if not auto_axes:
        return inner(module, *args, **kwargs)
    args = (_sequence_sharded(x, ctx, mesh),) + tuple(args[1:])
    return regions.auto_axes_call(module, inner, mesh, args, kwargs)


def _check_length(module, x, ctx: ContextAttention, mesh: Mesh) -> int:
    seq, n = x.shape[ctx.seq_dim], mesh.shape[ctx.axis]
    n, what = (2 * n, f"2 x the size {n}") if ctx.load_balance else (n, f"the size {n}")
    if seq % n:
        pad = -(-seq // n) * n
        raise PlanError(
            f"ContextParallel({ctx.axis!r}) on {type(module).__name__}: the first input's "
            f"sequence dim (dim {ctx.seq_dim} of shape {tuple(x.shape)}) has length {seq}, "
            f"not divisible by {what} of mesh axis {ctx.axis!r}"
            f"{' (load_balance splits it in 2 chunks per device)' if ctx.load_balance else ''}. "
            f"Pad the sequence (tokens, positions and masks) to {pad}, or use a sequence length "
            f"that is a multiple of {n}."
        )
    return seq


def _seq_dim_of(x, seq: int, first: bool, ctx: ContextAttention) -> int | None:
    """The dim of `x` to shard: `seq_dim` of the first input, else the first
    dim of length `seq` after the batch dim (dim 0 of a rank >= 2 array)."""
    if first:
        return x.ndim + ctx.seq_dim
    start = 1 if x.ndim >= 2 else 0
    return next((d for d in range(start, x.ndim) if x.shape[d] == seq), None)


def _lay_out(x, dim: int | None, axis: str, mesh: Mesh):
    if dim is None or not layout.is_array(x) or not x.ndim:
        return x
    spec = [U] * x.ndim
    spec[dim] = axis
    return layout.constrain(x, P(*spec), mesh)


def _inner(method, ctx: ContextAttention, mesh: Mesh, seq: int):
    """The call with its inputs and outputs sequence-sharded and attention replaced."""

    def lay(tree, first=None):
        def one(x):
            if not layout.is_array(x) or not x.ndim:
                return x  # modules (caches, rngs) and scalars pass as they are
            return _lay_out(x, _seq_dim_of(x, seq, x is first, ctx), ctx.axis, mesh)

        node = lambda x: isinstance(x, (nnx.Module, nnx.Variable))  # noqa: E731
        return jax.tree.map(one, tree, is_leaf=node)

    def call(module, *args, **kwargs):
        args, kwargs = lay(args, first=args[0]), lay(kwargs)
        with _replaced(module, ctx, mesh, seq) as hits:
            out = method(module, *args, **kwargs)
        if ctx.strategy == "ring" and not hits:
            raise PlanError(_NO_RING.format(name=type(module).__name__, axis=ctx.axis))
        return lay(out)

    return call


_NO_RING = (
    "ContextParallel({axis!r}, strategy='ring') on {name}: the module computes attention "
    "inline (no call of jax.nn.dot_product_attention, nnx.dot_product_attention or an "
    "attention_fn was seen), so there is no attention call to replace with ring attention. "
    "Use strategy='all_gather' for this module, or have it call jax.nn.dot_product_attention."
)


# Replacing the attention call -------------------------------------------------


@contextlib.contextmanager
def _replaced(module, ctx: ContextAttention, mesh: Mesh, seq: int):
    """Within: `jax.nn.dot_product_attention` and the module's `attention_fn`
    run context-parallel; yields a list that gets one entry per replaced call."""
    hits: list[str] = []
    original = jax.nn.dot_product_attention
    own = vars(module).get("attention_fn")
    jax.nn.dot_product_attention = _replacement(original, ctx, mesh, seq, hits, ring=True)
    if callable(own):
        object.__setattr__(module, "attention_fn", _replacement(own, ctx, mesh, seq, hits))
    try:
        yield hits
    finally:
        jax.nn.dot_product_attention = original
        if callable(own):
            object.__setattr__(module, "attention_fn", own)


def _replacement(fn, ctx: ContextAttention, mesh: Mesh, seq: int, hits: list, ring=False):
    """`fn(query, key, value, bias?, mask?, ...)` with K/V gathered or rotated.

    `ring` says `fn` is `jax.nn.dot_product_attention`, whose arguments ring
    attention understands; an `attention_fn` gets the gathered layout only
    (a ring strategy then still replaces the `jax.nn` call inside it)."""

    def attention(query, key, value, *args, **kwargs):
        if trace.has("attention") or query.shape[-3] != seq or key.shape[-3] != seq:
            return fn(query, key, value, *args, **kwargs)  # nested, or not self-attention
        if ctx.strategy == "ring" and not ring:
            return fn(query, key, value, *args, **kwargs)
        hits.append(ctx.strategy)
        with trace.flagged("attention"):  # an attention call we replaced is traced
            if ctx.strategy == "ring":
                return ring_call(query, key, value, *args, ctx=ctx, mesh=mesh, **kwargs)
            return _gathered(fn, ctx, mesh, seq, query, key, value, *args, **kwargs)

    return attention


def _gathered(fn, ctx: ContextAttention, mesh: Mesh, seq: int, query, key, value, *a, **kw):
    """all_gather: q rows sharded, K/V whole over the axis, masks on their rows."""
    rows = lambda x: _lay_out(x, x.ndim - 3, ctx.axis, mesh)  # noqa: E731
    # K/V whole over the axis: GSPMD all-gathers them here. XLA:CPU: the
    # backward is an all-reduce of dK/dV plus a slice (cp x the bytes of a
    # reduce-scatter); XLA's GPU pipeline has a reduce-scatter creator pass
    # meant to fuse that pair (not measured here).
    whole = lambda x: layout.constrain(x, P(*[U] * (x.ndim - 3), None, U, U), mesh)  # noqa: E731
    query, key, value = rows(query), whole(key), whole(value)

    def mask_rows(x):
        if not layout.is_array(x) or x.ndim < 2 or x.shape[-2] != seq:
            return x
        return _lay_out(x, x.ndim - 2, ctx.axis, mesh)

    a = tuple(mask_rows(x) for x in a)
    kw = {k: mask_rows(v) if k in ("bias", "mask") else v for k, v in kw.items()}
    return rows(fn(query, key, value, *a, **kw))


# Explicit axes -------------------------------------------------------------------


def _sequence_sharded(x, ctx: ContextAttention, mesh: Mesh):
    """Explicit axes: `x` resharded so its type has the sequence over the axis."""
    spec = list(layout.type_spec(x))
    spec[x.ndim + ctx.seq_dim] = ctx.axis
    spec = layout.drop_manual(P(*spec))
    if tuple(spec) == tuple(layout.type_spec(x)):
        return x
    return layout.reshard_here(x, mesh, spec)
