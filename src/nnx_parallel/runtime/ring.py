"""Ring attention: exact attention over K/V blocks rotated around a mesh axis.

`ring_call` stands in for `jax.nn.dot_product_attention` inside a hooked
`ContextParallel(strategy="ring")` call (`runtime/context.py`); inside a
`shard_map` manual over the axis, `ring_attention` scores each device's
query block against the K/V block it holds, merges it into a running max,
sum and output in float32 (online softmax), and passes K and V on with
`ppermute`. With `load_balance`, the rows are moved into head-tail chunk
order first (`balanced_order`) and chunk pairs above the causal diagonal
are skipped. Backward recomputes each block's scores from its K/V block and
running statistics (flash attention's trade) instead of keeping cp blocks of
them: the recompute sits inside the backward loop, so XLA cannot merge it
with the forward (as it does with a plain `jax.checkpoint` on XLA:CPU).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat
from nnx_parallel.errors import PlanError
from nnx_parallel.runtime import layout

_UNSUPPORTED = ("query_seq_lengths", "key_value_seq_lengths", "return_residual")
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # jax.nn's masked score


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


def _chunk_of(dev, j: int, size: int):
    """The head-tail layout: the global chunk index of device `dev`'s j-th
    chunk (j = 0 or 1) of `2 * size`; `dev` may be traced."""
    return dev if j == 0 else 2 * size - 1 - dev


def _holder(chunk: int, size: int) -> int:
    """The device that holds global chunk `chunk` in the head-tail layout."""
    return chunk if chunk < size else 2 * size - 1 - chunk


def _to_balanced(x, dim: int, axis: str, n: int):
    """This device's rows in `balanced_order` (natural chunks 2d, 2d+1 in;
    chunks d, 2n-1-d out): one `ppermute` per half block, each a bijection."""
    d = jax.lax.axis_index(axis)
    halves = jnp.split(x, 2, axis=dim)
    got = []
    for s in (0, 1):
        dest = [_holder(2 * src + s, n) for src in range(n)]  # natural chunk 2src+s
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
        dest = [_chunk_of(src, int(src % 2 != s), n) // 2 for src in range(n)]
        out.append(jax.lax.ppermute(mine, axis, list(enumerate(dest))))
    return jnp.concatenate(out, dim)


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
        for chunk in (_chunk_of(d, 0, size), _chunk_of(d, 1, size))
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
    pairs per hop (3 on its own block). Without `balanced`, causal alone skips
    nothing: device `size - 1` would still score all `size` blocks (the
    critical path), and the `lax.cond` costs temp memory (measured: 71,944
    against 48,952 B on the GQA test model), so masked blocks are computed and
    masked there. With a `window` (left, right), every chunk pair out of
    reach is skipped on every device, and without `balanced` the ring stops
    after the hops that bring a block in reach (`_hops`): with a causal
    window shorter than a block, one hop instead of `size - 1`.
    """
    i = jax.lax.axis_index(axis)
    b, tq, n_heads, h = q.shape
    kv_heads = k.shape[2]
    shape = _Shape(
        kv_heads, n_heads // kv_heads, 2 if balanced else 1, tq // (2 if balanced else 1)
    )
    merges = [
        jax.checkpoint(functools.partial(_merge, qj, shape, bias, mask, scale, causal, window))
        for qj in range(shape.parts)
    ]
    qg = q.reshape(b, shape.parts, shape.c, kv_heads, shape.groups, h)

    # A window makes most chunk pairs dead on every device: skip them, and
    # without balancing stop the ring once no block is in reach.
    skip = (causal and balanced) or window is not None

    def block(stats, k, v, src):
        live = functools.partial(_pair_live, c=shape.c, causal=causal, window=window)
        return _block(stats, k, v, i, src, qg, merges, shape, size, live if skip else None)

    perm = [(d, (d + 1) % size) for d in range(size)]

    def hop(carry, step):
        k, v, stats = carry
        k, v = jax.lax.ppermute((k, v), axis, perm)
        return (k, v, block(stats, k, v, (i - step) % size)), None

    rows = (b, kv_heads, shape.groups, shape.c)
    fresh = (jnp.full(rows, _NEG, jnp.float32), jnp.zeros(rows, jnp.float32))
    stats = tuple((*fresh, jnp.zeros((*rows, h), jnp.float32)) for _ in range(shape.parts))
    # Varying over the axis from the start: a skipped chunk pair (`lax.cond`)
    # returns its carry, whose type must match the merged one's.
    stats = jax.tree.map(lambda x: _compat.pcast_varying(x, (axis,)), stats)
    stats = block(stats, k, v, i)
    hops = _hops(size, tq, causal, window, balanced)
    if hops:
        (_, _, stats), _ = jax.lax.scan(hop, (k, v, stats), jnp.arange(1, hops + 1))
    out = jnp.concatenate([acc / l_sum[..., None] for _, l_sum, acc in stats], axis=3)
    out = out.astype(q.dtype)  # [b, k, g, t, h]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, tq, n_heads, h)


class _Shape(NamedTuple):
    """Head and chunk counts of one ring attention: K/V heads, query heads per
    K/V head, chunks per block (2 when balanced) and rows per chunk."""

    kv_heads: int
    groups: int
    parts: int
    c: int


def _hops(size: int, rows: int, causal: bool, window, balanced: bool) -> int:
    """How many times K/V move on: `size - 1`, fewer where a window keeps every
    query from the blocks further back (natural order, nothing ahead: causal
    or a right window of 0). At hop s a device holds the block s behind its
    own, whose nearest key is (s - 1) * rows + 1 before its first query.

    Example:
      >>> _hops(4, 16, True, (8, 0), False), _hops(4, 16, True, (17, 0), False)
      (1, 2)
    """
    if window is None or balanced or not (causal or window[1] == 0):
        return size - 1
    if window[0] <= 0:
        return 0
    return min(size - 1, (window[0] - 1) // rows + 1)


def _pair_live(qid, kid, *, c: int, causal: bool, window):
    """Whether global query chunk `qid` may attend to any key of chunk `kid`
    (chunks of `c` rows): not wholly above the causal diagonal, not wholly
    outside the window (left, right)."""
    live = kid <= qid if causal else jnp.bool_(True)
    if window is not None:
        gap = (qid - kid) * c  # first query minus first key
        live = live & (gap - (c - 1) <= window[0]) & (-gap - (c - 1) <= window[1])
    return live


def _block(stats, k, v, i, src, qg, merges, shape: _Shape, size: int, live):
    """All chunk pairs of the local queries against device `src`'s K/V block;
    with `live`, pairs that cannot attend (above the causal diagonal, outside
    the window) are skipped behind a `lax.cond`."""
    c, out = shape.c, []
    for qj in range(shape.parts):
        carry = stats[qj]
        for kj in range(shape.parts):
            qid, kid = _chunk_of(i, qj, size), _chunk_of(src, kj, size)
            kc, vc = k[:, kj * c : (kj + 1) * c], v[:, kj * c : (kj + 1) * c]
            args = (qg[:, qj], kc, vc, qid, kid, kid * c)  # bias/mask columns: natural order
            step = lambda carry, f=merges[qj], args=args: f(carry, *args)  # noqa: E731
            if live is not None:  # a chunk pair no query may attend adds nothing
                carry = jax.lax.cond(live(qid, kid), step, lambda carry: carry, carry)
            else:
                carry = step(carry)
        out.append(carry)
    return tuple(out)


def _merge(qj, shape: _Shape, bias, mask, scale, causal, window, carry, qc, kc, vc, qid, kid, col0):
    """Scores of q chunk `qj` (global chunk `qid`) against a K/V chunk (global
    chunk `kid`, whose first column in `bias`/`mask` is `col0`), merged into
    the running max / sum / output `carry` (online softmax, float32)."""
    m, l_sum, acc = carry
    c = shape.c
    qpos, kpos = qid * c + jnp.arange(c), kid * c + jnp.arange(c)

    def cols(x):
        if x.shape[-2] != 1 and shape.parts > 1:
            x = x[..., qj * c : (qj + 1) * c, :]
        if x.shape[-1] != 1:
            x = jax.lax.dynamic_slice_in_dim(x, col0, c, -1)
        return _grouped(x, shape.kv_heads, shape.groups)

    s = jnp.einsum("btkgh,bskh->bkgts", qc, kc, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        s = s + cols(bias).astype(jnp.float32)
    s = jnp.where(_block_mask(qpos, kpos, causal, window, mask, cols), s, _NEG)
    m_new = jax.lax.stop_gradient(jnp.maximum(m, s.max(-1)))
    p = jnp.exp(s - m_new[..., None])
    corr = jnp.exp(m - m_new)
    pv = jnp.einsum("bkgts,bskh->bkgth", p, vc.astype(jnp.float32))
    return m_new, l_sum * corr + p.sum(-1), acc * corr[..., None] + pv


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


def _grouped(x, kv_heads: int, groups: int):
    """A `[B|1, N|1, T, S]` array as `[B|1, K|1, G|1, T, S]` (GQA heads split)."""
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape(x.shape[0], kv_heads, groups, *x.shape[2:])
