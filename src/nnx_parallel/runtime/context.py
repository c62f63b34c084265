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
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat
from nnx_parallel.core.layouts import ContextAttention
from nnx_parallel.errors import PlanError
from nnx_parallel.runtime import layout, regions, trace

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
    if seq % n:
        pad = -(-seq // n) * n
        raise PlanError(
            f"ContextParallel({ctx.axis!r}) on {type(module).__name__}: the first input's "
            f"sequence dim (dim {ctx.seq_dim} of shape {tuple(x.shape)}) has length {seq}, "
            f"not divisible by the size {n} of mesh axis {ctx.axis!r}. Pad the sequence (tokens, "
            f"positions and masks) to {pad}, or use a sequence length that is a multiple of {n}."
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


# Ring attention --------------------------------------------------------------------

_UNSUPPORTED = ("query_seq_lengths", "key_value_seq_lengths", "return_residual")


def ring_call(query, key, value, bias=None, mask=None, *, ctx, mesh, **kwargs):
    """`jax.nn.dot_product_attention(...)` as ring attention over `ctx.axis`."""
    bad = [k for k in _UNSUPPORTED if kwargs.get(k) is not None and kwargs.get(k) is not False]
    if bad or query.ndim != 4:
        why = f"arguments {bad}" if bad else f"rank-{query.ndim} queries"
        raise PlanError(
            f"ContextParallel({ctx.axis!r}, strategy='ring'): ring attention does not take "
            f"{why} of jax.nn.dot_product_attention. Use strategy='all_gather' for this module."
        )
    n = mesh.shape[ctx.axis]
    seq_spec = P(None, ctx.axis)
    extra, extra_specs = [], []
    for x in (bias, mask):
        if x is not None:
            x = jnp.asarray(x)
            x = x.reshape((1,) * (4 - x.ndim) + x.shape)
            extra_specs.append(P(None, None, ctx.axis) if x.shape[-2] > 1 else P())
        extra.append(x)
    window = kwargs.get("local_window_size")
    window = (window, window) if isinstance(window, int) else window
    scale = kwargs.get("scale") or 1.0 / math.sqrt(query.shape[-1])

    def local(q, k, v, *bm):
        it = iter(bm)
        b, m = (next(it) if x is not None else None for x in extra)
        return ring_attention(
            q, k, v, b, m, axis=ctx.axis, size=n, scale=scale,
            causal=bool(kwargs.get("is_causal")), window=window,
        )  # fmt: skip

    present = [x for x in extra if x is not None]
    fn = _compat.shard_map(
        local,
        mesh=layout.context_mesh(mesh),
        in_specs=(seq_spec, seq_spec, seq_spec, *extra_specs),
        out_specs=seq_spec,
        axis_names={ctx.axis},
    )
    return fn(query, key, value, *present)


def _block_mask(i, src, tq, tk, causal, window, mask, cols):
    """Which (query row, key column) pairs of this block pair may attend, as
    `[B|1, K|1, G|1, T/size, T/size]`."""
    qpos = i * tq + jnp.arange(tq)[:, None]
    kpos = src * tk + jnp.arange(tk)[None, :]
    ok = jnp.ones((tq, tk), bool)
    if causal:
        ok = ok & (qpos >= kpos)
    if window is not None:
        ok = ok & (qpos - kpos <= window[0]) & (kpos - qpos <= window[1])
    ok = ok[None, None, None]
    if mask is not None:
        ok = ok & cols(mask).astype(bool)
    return ok


_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # jax.nn's masked score


def ring_attention(q, k, v, bias, mask, *, axis, size, scale, causal=False, window=None):
    """Exact attention of local queries over K/V blocks rotated around `axis`.

    Inside a shard_map manual over `axis`: `q`, `k`, `v` are this device's
    sequence block `[B, T/size, N or K, H]` (GQA: N = K * G); `bias` and
    `mask` its query rows `[B|1, N|1, T/size|1, T|1]`. Each of `size` steps
    scores q against the K/V block it holds (`[B, N, T/size, T/size]`, in
    float32), merges it into a running max / sum / output (online softmax),
    and passes the block on with `ppermute`: `size - 1` hops each of K and V.
    Masked scores take jax.nn's finite large negative, so a fully masked row
    comes out as jax.nn's does (uniform). Backward is JAX's autodiff through
    the unrolled steps (each `ppermute` transposes to one back).
    """
    i = jax.lax.axis_index(axis)
    b, tq, n_heads, h = q.shape
    tk, kv_heads = k.shape[1], k.shape[2]
    groups = n_heads // kv_heads
    qg = q.reshape(b, tq, kv_heads, groups, h)

    def merge(carry, k, v, src):
        """Scores of q against the K/V block from device `src`, merged in."""
        m, l_sum, acc = carry

        def cols(x):
            x = x if x.shape[-1] == 1 else jax.lax.dynamic_slice_in_dim(x, src * tk, tk, -1)
            return _grouped(x, kv_heads, groups)

        s = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
        if bias is not None:
            s = s + cols(bias).astype(jnp.float32)
        s = jnp.where(_block_mask(i, src, tq, tk, causal, window, mask, cols), s, _NEG)
        m_new = jax.lax.stop_gradient(jnp.maximum(m, s.max(-1)))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        pv = jnp.einsum("bkgts,bskh->bkgth", p, v.astype(jnp.float32))
        return m_new, l_sum * corr + p.sum(-1), acc * corr[..., None] + pv

    # Backward recomputes each block's scores from its K/V block and running
    # stats (flash attention's trade) instead of keeping cp blocks of them:
    # the recompute sits inside the backward loop, so XLA cannot merge it
    # with the forward (as it does with a plain `jax.checkpoint` on XLA:CPU).
    merge = jax.checkpoint(merge)
    perm = [(d, (d + 1) % size) for d in range(size)]

    def hop(carry, step):
        k, v, stats = carry
        k, v = jax.lax.ppermute((k, v), axis, perm)
        return (k, v, merge(stats, k, v, (i - step) % size)), None

    rows = (b, kv_heads, groups, tq)
    stats = (jnp.full(rows, _NEG, jnp.float32), jnp.zeros(rows, jnp.float32))
    stats = merge((*stats, jnp.zeros((*rows, h), jnp.float32)), k, v, i)
    (_, _, (_, l_sum, acc)), _ = jax.lax.scan(hop, (k, v, stats), jnp.arange(1, size))
    out = (acc / l_sum[..., None]).astype(q.dtype)  # [b, k, g, t, h]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, tq, n_heads, h)


def _grouped(x, kv_heads: int, groups: int):
    """A `[B|1, N|1, T, S]` array as `[B|1, K|1, G|1, T, S]` (GQA heads split)."""
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape(x.shape[0], kv_heads, groups, *x.shape[2:])
