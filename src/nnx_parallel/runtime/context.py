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
import functools
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
        if ctx.load_balance:  # head-tail order inside, this device's rows back out
            q, k, v = (_to_balanced(x, 1, ctx.axis, n) for x in (q, k, v))
            b, m = (
                x if x is None or x.shape[2] == 1 else _to_balanced(x, 2, ctx.axis, n)
                for x in (b, m)
            )
        out = ring_attention(
            q, k, v, b, m, axis=ctx.axis, size=n, scale=scale,
            causal=bool(kwargs.get("is_causal")), window=window, balanced=ctx.load_balance,
        )  # fmt: skip
        return _from_balanced(out, 1, ctx.axis, n) if ctx.load_balance else out

    present = [x for x in extra if x is not None]
    fn = _compat.shard_map(
        local,
        mesh=layout.context_mesh(mesh),
        in_specs=(seq_spec, seq_spec, seq_spec, *extra_specs),
        out_specs=seq_spec,
        axis_names={ctx.axis},
    )
    return fn(query, key, value, *present)


def _to_balanced(x, dim: int, axis: str, n: int):
    """This device's rows in `balanced_order` (natural chunks 2d, 2d+1 in;
    chunks d, 2n-1-d out): one `ppermute` per half block, each a bijection."""
    d = jax.lax.axis_index(axis)
    halves = jnp.split(x, 2, axis=dim)
    got = []
    for s in (0, 1):
        dest = [g if g < n else 2 * n - 1 - g for g in (2 * src + s for src in range(n))]
        got.append(jax.lax.ppermute(halves[s], axis, list(enumerate(dest))))
    even = d % 2 == 0  # an even device gets its first chunk from the even halves
    return jnp.concatenate([jnp.where(even, got[0], got[1]), jnp.where(even, got[1], got[0])], dim)


def _from_balanced(x, dim: int, axis: str, n: int):
    """The inverse of `_to_balanced`: chunks d, 2n-1-d in, natural 2d, 2d+1 out."""
    d = jax.lax.axis_index(axis)
    first, second = jnp.split(x, 2, axis=dim)
    out = []
    for s in (0, 1):
        mine = jnp.where(d % 2 == s, first, second)  # the chunk of parity s this device holds
        dest = [(src if src % 2 == s else 2 * n - 1 - src) // 2 for src in range(n)]
        out.append(jax.lax.ppermute(mine, axis, list(enumerate(dest))))
    return jnp.concatenate(out, dim)


def _block_mask(qpos, kpos, causal, window, mask, cols):
    """Which (query row, key column) pairs of a chunk pair may attend, as
    `[B|1, K|1, G|1, rows, cols]`; `qpos`/`kpos` are global positions."""
    qpos, kpos = qpos[:, None], kpos[None, :]
    ok = jnp.ones((qpos.shape[0], kpos.shape[1]), bool)
    if causal:
        ok = ok & (qpos >= kpos)
    if window is not None:
        ok = ok & (qpos - kpos <= window[0]) & (kpos - qpos <= window[1])
    ok = ok[None, None, None]
    if mask is not None:
        ok = ok & cols(mask).astype(bool)
    return ok


_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # jax.nn's masked score


def balanced_order(seq: int, size: int) -> list[int]:
    """The load-balanced sequence order (PyTorch's head-tail balancer): the
    sequence in `2 * size` chunks, device d holding chunks d and 2*size-1-d,
    so each device's causal attention work is the same.

    Example:
      >>> balanced_order(8, 2)
      [0, 1, 6, 7, 2, 3, 4, 5]
    """
    c = seq // (2 * size)
    return [
        j
        for d in range(size)
        for chunk in (d, 2 * size - 1 - d)
        for j in range(chunk * c, (chunk + 1) * c)
    ]


def ring_attention(
    q, k, v, bias, mask, *, axis, size, scale, causal=False, window=None, balanced=False
):
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

    With `balanced`, a block is two chunks in `balanced_order` (device d: global
    chunks d and 2*size-1-d; `bias`/`mask` rows to match, columns in natural
    order), and chunk pairs
    are scored one by one; with `causal`, a chunk pair wholly above the
    diagonal is skipped (`lax.cond`), so every device scores 2 of its 4 chunk
    pairs per hop (3 on its own block). Without `balanced` nothing is skipped:
    device `size - 1` would still score all `size` blocks (the critical path),
    and the `lax.cond` costs temp memory (measured: 71,944 against 48,952 B
    on the GQA test model), so masked blocks are computed and masked there.
    """
    i = jax.lax.axis_index(axis)
    b, tq, n_heads, h = q.shape
    kv_heads = k.shape[2]
    groups = n_heads // kv_heads
    parts = 2 if balanced else 1
    c = tq // parts

    def chunk_of(dev, j):
        """The global chunk index of a device's j-th chunk (chunks of c rows)."""
        return dev if j == 0 else 2 * size - 1 - dev

    def merge(qj, carry, qc, kc, vc, qid, kid, col0):
        """Scores of q chunk `qj` (global chunk `qid`) against a K/V chunk (global
        chunk `kid`, whose first column in `bias`/`mask` is `col0`), merged in."""
        m, l_sum, acc = carry
        qpos, kpos = qid * c + jnp.arange(c), kid * c + jnp.arange(c)

        def cols(x):
            if x.shape[-2] != 1 and parts > 1:
                x = x[..., qj * c : (qj + 1) * c, :]
            if x.shape[-1] != 1:
                x = jax.lax.dynamic_slice_in_dim(x, col0, c, -1)
            return _grouped(x, kv_heads, groups)

        s = jnp.einsum("btkgh,bskh->bkgts", qc, kc, preferred_element_type=jnp.float32) * scale
        if bias is not None:
            s = s + cols(bias).astype(jnp.float32)
        s = jnp.where(_block_mask(qpos, kpos, causal, window, mask, cols), s, _NEG)
        m_new = jax.lax.stop_gradient(jnp.maximum(m, s.max(-1)))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        pv = jnp.einsum("bkgts,bskh->bkgth", p, vc.astype(jnp.float32))
        return m_new, l_sum * corr + p.sum(-1), acc * corr[..., None] + pv

    # Backward recomputes each block's scores from its K/V block and running
    # stats (flash attention's trade) instead of keeping cp blocks of them:
    # the recompute sits inside the backward loop, so XLA cannot merge it
    # with the forward (as it does with a plain `jax.checkpoint` on XLA:CPU).
    merges = [jax.checkpoint(functools.partial(merge, qj)) for qj in range(parts)]
    qg = q.reshape(b, parts, c, kv_heads, groups, h)

    def block(stats, k, v, src):
        """All chunk pairs of q against device `src`'s K/V block."""
        out = []
        for qj in range(parts):
            carry = stats[qj]
            for kj in range(parts):
                qid, kid = chunk_of(i, qj), chunk_of(src, kj)
                kc, vc = k[:, kj * c : (kj + 1) * c], v[:, kj * c : (kj + 1) * c]
                args = (qg[:, qj], kc, vc, qid, kid, kid * c)  # columns in natural order
                step = lambda carry, f=merges[qj], args=args: f(carry, *args)  # noqa: E731
                if causal and balanced:  # a chunk pair wholly above the diagonal adds nothing
                    carry = jax.lax.cond(kid <= qid, step, lambda carry: carry, carry)
                else:
                    carry = step(carry)
            out.append(carry)
        return tuple(out)

    perm = [(d, (d + 1) % size) for d in range(size)]

    def hop(carry, step):
        k, v, stats = carry
        k, v = jax.lax.ppermute((k, v), axis, perm)
        return (k, v, block(stats, k, v, (i - step) % size)), None

    rows = (b, kv_heads, groups, c)
    fresh = (jnp.full(rows, _NEG, jnp.float32), jnp.zeros(rows, jnp.float32))
    stats = tuple((*fresh, jnp.zeros((*rows, h), jnp.float32)) for _ in range(parts))
    # Varying over the axis from the start: a skipped chunk pair (`lax.cond`)
    # returns its carry, whose type must match the merged one's.
    stats = jax.tree.map(lambda x: _compat.pcast_varying(x, (axis,)), stats)
    stats = block(stats, k, v, i)
    (_, _, stats), _ = jax.lax.scan(hop, (k, v, stats), jnp.arange(1, size))
    out = jnp.concatenate([acc / l_sum[..., None] for _, l_sum, acc in stats], axis=3)
    out = out.astype(q.dtype)  # [b, k, g, t, h]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, tq, n_heads, h)


def _grouped(x, kv_heads: int, groups: int):
    """A `[B|1, N|1, T, S]` array as `[B|1, K|1, G|1, T, S]` (GQA heads split)."""
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape(x.shape[0], kv_heads, groups, *x.shape[2:])
