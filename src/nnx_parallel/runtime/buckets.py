"""One collective for many arrays: FSDP's flat buffers (FSDP2's copy-in / copy-out).

An FSDP unit gathers all its parameter shards at once. Each shard is
flattened, the shards of one dtype are concatenated into one buffer, the
buffer is all-gathered once (stacked over devices, not tiled), and each
parameter is cut back out and laid out with the gathered dim in place.
Gradients go the other way: each full gradient is cut into its per-device
chunks, the chunks of one dtype are concatenated, and one reduce-scatter
returns each device its own. A sum over replicated axes (`psum`) is grouped
the same way. The copies in and out are layout work on `Ψ_unit` bytes; in
exchange a unit issues one collective per dtype per direction instead of one
per parameter, which on GPUs and TPUs saves a launch latency (about 10-30 µs
each) per parameter and lets the collective run at full link bandwidth.

Example:
  >>> import jax.numpy as jnp
  >>> groups = by_key([jnp.ones(2), jnp.ones(3, jnp.int32), jnp.ones(4)], lambda x: x.dtype)
  >>> sorted(len(v) for v in groups.values())
  [1, 2]
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp

from nnx_parallel import _compat


def by_key(items: list, key: Callable[[Any], Hashable]) -> dict[Hashable, list[int]]:
    """Indices of `items` grouped by `key(item)`, in first-seen order."""
    groups: dict[Hashable, list[int]] = {}
    for i, x in enumerate(items):
        groups.setdefault(key(x), []).append(i)
    return groups


# XLA:CPU workaround, see docs/xla_cpu.md (bf16 gathers bit-cast).
def _wire(x):
    """`x` as the bits the wire should carry: a sub-32-bit float as same-width
    unsigned ints (XLA:CPU widens a bf16 all-gather to f32 otherwise; on GPU
    and TPU the bit cast is free and changes nothing)."""
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4:
        return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize])
    return x


def _unwire(x, dtype):
    return x if x.dtype == dtype else jax.lax.bitcast_convert_type(x, dtype)


def all_gather(shards: list, dims: list[int], axis) -> list:
    """Each shard all-gathered (tiled) on its dim over `axis`, one collective per dtype."""
    out: list = [None] * len(shards)
    for idx in by_key(shards, lambda x: x.dtype).values():
        if len(idx) == 1:  # one leaf: no buffer to pack, no copy out
            i = idx[0]
            out[i] = _unwire(
                jax.lax.all_gather(_wire(shards[i]), axis, axis=dims[i], tiled=True),
                shards[i].dtype,
            )
            continue
        flat = jnp.concatenate([_wire(jnp.ravel(shards[i])) for i in idx])
        stacked = jax.lax.all_gather(flat, axis, axis=0, tiled=False)  # (n, total)
        stacked = _unwire(stacked, shards[idx[0]].dtype)
        _unpack(stacked, [shards[i] for i in idx], [dims[i] for i in idx], idx, out)
    return out


def psum_gather(shards: list, dims: list[int], axis) -> list:
    """`all_gather`'s result through one all-reduce: each device writes its
    shards into its own slot of a zero buffer and the buffers are summed.

    For small leaves (biases, norm scales) that a module reads element-wise:
    XLA's fusion recomputes such reads (`x @ w + b`) in backward straight
    from the buffer they were cut from, which keeps a shared all-gather
    buffer alive from forward to backward. An all-reduce writes a buffer of
    their own. It moves twice their bytes; they are a tiny share of a unit.
    """
    out: list = [None] * len(shards)
    me = jax.lax.axis_index(axis)
    for idx in by_key(shards, lambda x: x.dtype).values():
        flat = jnp.concatenate([jnp.ravel(shards[i]) for i in idx])
        n = _compat.axis_size(axis if isinstance(axis, tuple) else (axis,))
        slots = jnp.zeros((n,) + flat.shape, flat.dtype).at[me].set(flat)
        _unpack(
            jax.lax.psum(slots, axis), [shards[i] for i in idx], [dims[i] for i in idx], idx, out
        )
    return out


def _unpack(stacked, shards: list, dims: list[int], idx: list[int], out: list) -> None:
    """Cuts each shard's gathered copy out of `stacked` (n, total) into `out`."""
    n, offset = stacked.shape[0], 0
    for i, x, dim in zip(idx, shards, dims):
        piece = stacked[:, offset : offset + x.size].reshape((n,) + x.shape)
        offset += x.size
        piece = jnp.moveaxis(piece, 0, dim)  # (..., n, local, ...)
        out[i] = piece.reshape(x.shape[:dim] + (n * x.shape[dim],) + x.shape[dim + 1 :])


def reduce_scatter(grads: list, dims: list[int], axis, n: int) -> list:
    """Each full gradient summed over `axis` and cut to this device's chunk of its
    dim (as `psum_scatter(tiled=True)`), one collective per dtype."""
    out: list = [None] * len(grads)
    for idx in by_key(grads, lambda x: x.dtype).values():
        if len(idx) == 1:  # one leaf: no buffer to pack
            i = idx[0]
            out[i] = jax.lax.psum_scatter(grads[i], axis, scatter_dimension=dims[i], tiled=True)
            continue
        chunks = []
        for i in idx:
            g, dim = grads[i], dims[i]
            split = g.shape[:dim] + (n, g.shape[dim] // n) + g.shape[dim + 1 :]
            chunks.append(jnp.moveaxis(g.reshape(split), dim, 0).reshape(n, -1))
        mine = jax.lax.psum_scatter(jnp.concatenate(chunks, axis=1), axis, scatter_dimension=0)
        offset = 0
        for i in idx:
            g, dim = grads[i], dims[i]
            local = g.shape[:dim] + (g.shape[dim] // n,) + g.shape[dim + 1 :]
            size = g.size // n
            out[i] = mine[offset : offset + size].reshape(local)
            offset += size
    return out


def psum(values: list, axes: list[tuple[str, ...]]) -> list:
    """Each value summed over its own axes (none: as it is), one collective per
    (axes, dtype) group."""
    out = list(values)
    groups = by_key(list(range(len(values))), lambda i: (axes[i], values[i].dtype))
    for (names, _), idx in groups.items():
        if not names:
            continue
        flat = jax.lax.psum(jnp.concatenate([jnp.ravel(values[i]) for i in idx]), names)
        offset = 0
        for i in idx:
            out[i] = flat[offset : offset + values[i].size].reshape(values[i].shape)
            offset += values[i].size
    return out
