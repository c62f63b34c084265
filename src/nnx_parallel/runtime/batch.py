"""Which inputs and outputs of a call carry the batch: one shape-only trace.

The FSDP `shard_map` route runs a call once per batch shard, so it must know
which inputs to split on dim 0 and which dim of each output holds the
batch. The batch size is dim 0 of the first array input; another input
splits on dim 0 only if its dim 0 is the same size (positions `(T,)`, scalar
cache indices and tables stay whole).

The outputs' batch dims come from one `eval_shape` of the call with the
batch as a symbolic dimension `b` (JAX's shape polymorphism): an output dim
equal to `b` holds the batch, a dim free of `b` does not, anything else
(`2*b`, a reshape that folds the batch) cannot run per shard. Code that
branches on the batch size cannot be traced symbolically; then the call is
traced at two concrete sizes (the full and the per-device batch), and the
dims that differ by the batch factor hold it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from nnx_parallel import _compat
from nnx_parallel.runtime import trace
from nnx_parallel.runtime.flat import Flat


class NotPerShard(Exception):
    """The call cannot run once per batch shard; the message says why."""


@dataclasses.dataclass(frozen=True)
class Split:
    """How a call maps over the batch: which arrays of the flattened
    arguments split on dim 0 (`inputs`), and each output leaf's batch dim
    (`outputs`: -1 where the output is the same on every device)."""

    inputs: tuple[bool, ...]
    outputs: Any


def batch_size(flat: Flat) -> int | None:
    """Dim 0 of the first array input (None: no array, or a scalar)."""
    first = next(iter(flat.arrays), None)
    return None if first is None or not first.ndim else first.shape[0]


def split(shapes_of, flat: Flat, n_batch: int) -> Split:
    """The `Split` of a call. `shapes_of(arrays)` traces its output shapes
    for abstract `arrays` (in `flat.arrays`' order); raises `NotPerShard`."""
    b = batch_size(flat)
    inputs = tuple(x.ndim > 0 and x.shape[0] == b for x in flat.arrays)

    def abstract(size):
        return [
            jax.ShapeDtypeStruct(((size,) + tuple(x.shape[1:])) if s else x.shape, x.dtype)
            for x, s in zip(flat.arrays, inputs)
        ]

    with trace.probe():
        try:
            sym = _compat.symbolic_dim("b")
            return Split(
                inputs, jax.tree.map(lambda o: _symbolic_dim(o, sym), shapes_of(abstract(sym)))
            )
        except NotPerShard:
            raise
        except Exception:  # noqa: BLE001 - code that needs a number: two concrete traces
            pass
        try:
            full, local = shapes_of(abstract(b)), shapes_of(abstract(b // n_batch))
        except Exception as e:  # noqa: BLE001 - the real call reports real errors
            raise NotPerShard(
                f"its call does not trace with a per-device batch ({type(e).__name__}: {e})"
            ) from e
    return Split(inputs, jax.tree.map(lambda f, d: _concrete_dim(f, d, n_batch), full, local))


def _symbolic_dim(out, sym) -> int:
    dims = [d for d, n in enumerate(out.shape) if _compat.is_symbolic(n)]
    if not dims:
        return -1
    if len(dims) == 1 and out.shape[dims[0]] == sym:
        return dims[0]
    raise NotPerShard(f"its outputs do not split over the batch (output shape {out.shape})")


def _concrete_dim(full, local, n_batch: int) -> int:
    diff = [d for d in range(len(full.shape)) if full.shape[d] != local.shape[d]]
    if not diff:
        return -1
    if len(diff) == 1 and full.shape[diff[0]] == local.shape[diff[0]] * n_batch:
        return diff[0]
    raise NotPerShard(
        f"its outputs do not split over the batch (output {full.shape} vs per-device {local.shape})"
    )
