"""Spec algebra: the one place that reads and rewrites PartitionSpec entries.

A spec entry is `None` (unsharded), one mesh axis name, or a tuple of names
(the dim is sharded over their product). Every helper that asks "which axes
does this entry name?" or "this spec without those axes" lives here, so the
idiom is written once.

Example:
  >>> axes_of(("data", "model")), axes_of("model"), axes_of(None)
  (('data', 'model'), ('model',), ())
  >>> drop_axes(P(("data", "fsdp"), "model"), {"fsdp"})
  P('data', 'model')
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from typing import Any

from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat

AxisNames = str | tuple[str, ...]


def axes_of(entry: Any) -> tuple[str, ...]:
    """The mesh axis names one spec entry (or an `axis=` argument) names."""
    if entry is None or entry is _compat.UNCONSTRAINED:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def entry_of(names: Iterable[str]) -> Any:
    """The spec entry for `names`: None, one name, or a tuple of names."""
    names = tuple(names)
    if not names:
        return None
    return names[0] if len(names) == 1 else names


def spec_axes(spec: Iterable[Any]) -> set[str]:
    """Every mesh axis a spec (or any sequence of entries) names."""
    return {a for entry in spec for a in axes_of(entry)}


def size(mesh: Mesh, entry: Any) -> int:
    """How many shards one entry cuts a dim into on `mesh`."""
    return math.prod(mesh.shape[a] for a in axes_of(entry))


def pad(spec: Iterable[Any] | None, ndim: int) -> tuple:
    """`spec`'s entries, padded with None to `ndim`."""
    entries = tuple(spec or ())
    return entries + (None,) * (ndim - len(entries))


def _filter(entry: Any, keep) -> Any:
    if entry is None or entry is _compat.UNCONSTRAINED:
        return entry
    return entry_of(a for a in axes_of(entry) if keep(a))


def drop_axes(spec: Iterable[Any], axes: Collection[str]) -> P:
    """`spec` without the mesh axes `axes` (unconstrained entries stay)."""
    return P(*(_filter(e, lambda a: a not in axes) for e in spec))


def keep_axes(spec: Iterable[Any], axes: Collection[str]) -> P:
    """`spec` naming only the mesh axes in `axes`."""
    return P(*(_filter(e, lambda a: a in axes) for e in spec))


def drop_entry(entry: Any, axes: Collection[str]) -> Any:
    """One entry without the mesh axes `axes`."""
    return _filter(entry, lambda a: a not in axes)


def with_dim(spec: Iterable[Any] | None, ndim: int, dim: int, entry: Any) -> P:
    """`spec` (padded to `ndim`) with dim `dim` set to `entry`."""
    entries = list(pad(spec, ndim))
    entries[dim] = entry
    return P(*entries)


def replicated(ndim: int) -> P:
    """The spec of an unsharded array of rank `ndim`."""
    return P(*([None] * ndim))


def shard_shape(shape: tuple[int, ...], spec: Iterable[Any], mesh: Mesh) -> tuple[int, ...]:
    """The per-device block shape of an array of `shape` laid out as `spec`."""
    return tuple(n // size(mesh, e) for n, e in zip(shape, pad(spec, len(shape))))


def itemsize(dtype: Any) -> int:
    """Bytes per element; typed PRNG keys count their raw key data."""
    import jax
    import numpy as np

    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return 8  # threefry key data: 2 x uint32
    return np.dtype(dtype).itemsize


def nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    """Bytes of an array of `shape` and `dtype`."""
    return math.prod(shape) * itemsize(dtype)
