"""Feeding a mesh from many processes, and reading metrics back on each.

With `jax.distributed`, every process holds only some of the mesh's
devices, and no process may assume it can see a whole array. Each process
loads its own slice of the global batch; `shard_batch` assembles the slices
into one global `jax.Array` without any process holding all of it.
`reduce_metrics` turns step metrics into plain floats that are identical on
every process, so logging code needs no `if process_index == 0` arithmetic.

In a single process both functions still work, and do what you would expect:
the "local" batch is the whole batch.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat
from nnx_parallel.errors import MeshAxisError, MeshError, ParallelError

# Mesh axes that split the batch, in the order they split it.
BATCH_AXES = ("data", "fsdp")
OPS = ("mean", "sum")


def batch_spec(mesh: Mesh) -> P:
    """The default batch layout: dim 0 over the mesh's batch axes.

    The axes are those of `BATCH_AXES` ('data', then 'fsdp') that `mesh`
    has. A mesh with neither (pure tensor parallel) replicates the batch,
    and then every process must pass the same whole batch.

    Args:
      mesh: The mesh to feed.

    Returns:
      `P(('data', 'fsdp'))`, `P('data')`, ... or `P()`.

    Example:
      >>> batch_spec(mesh2x4), batch_spec(make_mesh(data=2, fsdp=4)), batch_spec(mesh8)
      (P('data',), P(('data', 'fsdp'),), P())
    """
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    if not axes:
        return P()
    return P(axes if len(axes) > 1 else axes[0])


def local_batch_slice(global_batch_size: int, mesh: Mesh, spec: P | None = None) -> slice:
    """The rows of a global batch that this process's devices hold.

    For data loaders that produce the same global batch on every process
    (or know its size): `shard_batch(batch[local_batch_slice(len(batch), mesh)], mesh)`
    rebuilds exactly `batch` as a global array.

    Args:
      global_batch_size: Rows in the global batch.
      mesh: The mesh the batch is sharded on.
      spec: The batch layout; default `batch_spec(mesh)`.

    Returns:
      A `slice` of rows (all of them in a single process).

    Raises:
      MeshError: `global_batch_size` does not split over the batch axes, or
        this process's rows are not one contiguous block.

    Example:
      >>> local_batch_slice(16, mesh2x4)
      slice(0, 16, None)
    """
    spec = batch_spec(mesh) if spec is None else spec
    shards = _batch_shards(mesh, spec)
    if global_batch_size % shards:
        raise MeshError(
            f"local_batch_slice: global batch size {global_batch_size} does not split into the "
            f"{shards} batch shards of spec {spec} on mesh {dict(mesh.shape)}. "
            f"Use a batch size that is a multiple of {shards}."
        )
    sharding = NamedSharding(mesh, spec)
    rows = sorted(
        {
            _bounds(i[0], global_batch_size)
            for i in sharding.addressable_devices_indices_map((global_batch_size,)).values()
        }
    )
    for (_, stop), (start, _) in zip(rows, rows[1:]):
        if stop != start:
            raise MeshError(
                f"local_batch_slice: this process holds rows {rows} of the batch, which are not one "
                f"contiguous block on mesh {dict(mesh.shape)}. Build the mesh with make_mesh (it keeps "
                "each process's devices together), or index the batch with these rows yourself."
            )
    return slice(rows[0][0], rows[-1][1])


def shard_batch(
    batch: Any, mesh: Mesh, spec: P | None = None, *, seq_axis: str | None = None
) -> Any:
    """Builds global arrays from each process's local slice of a batch.

    Every process calls this with its own rows (numpy or JAX arrays, any
    pytree); the result is one global `jax.Array` per leaf, sharded as
    `spec`, whose rows are the processes' slices in process order. Nothing
    is gathered: each device receives only its own block. A thin layer over
    `jax.make_array_from_process_local_data` that checks shapes first.

    Args:
      batch: A pytree of arrays; dim 0 of each is this process's rows.
      mesh: The mesh to place the batch on.
      spec: Layout of every leaf; default `batch_spec(mesh)` (dim 0 over
        'data'/'fsdp', replicated if the mesh has neither).
      seq_axis: Context parallelism: also shard each leaf's sequence dim
        over this mesh axis: dim 1 of tokens and positions `(B, S)` and of
        activations `(B, S, D)`, dim 2 (the query rows) of a rank-4 mask
        `(B, 1, S, S)`. Rank-1 leaves keep `spec`.

    Returns:
      The same pytree of global `jax.Array`s.

    Raises:
      ParallelError: a leaf has fewer dims than `spec` names, its rows
        do not split evenly over this process's batch shards, or its
        sequence does not split over `seq_axis` (the message says what to
        pad it to).
      MeshError: `seq_axis` is not a mesh axis.

    Example:
      >>> x = shard_batch({"tokens": jax.numpy.zeros((8, 3), int)}, mesh2x4)["tokens"]
      >>> x.shape, x.sharding.spec
      ((8, 3), P('data',))
      >>> cp = jax.make_mesh((2, 4), ("data", "context"))
      >>> b = {"tokens": jax.numpy.zeros((2, 8), int), "mask": jax.numpy.ones((2, 1, 8, 8), bool)}
      >>> {k: v.sharding.spec for k, v in shard_batch(b, cp, seq_axis="context").items()}
      {'mask': P('data', None, 'context', None), 'tokens': P('data', 'context')}
    """
    spec = batch_spec(mesh) if spec is None else spec
    local_shards = _local_batch_shards(mesh, spec)
    if seq_axis is not None and seq_axis not in mesh.axis_names:
        raise MeshAxisError(
            f"shard_batch: seq_axis={seq_axis!r} is not an axis of the mesh "
            f"{tuple(mesh.axis_names)}. Pass one of them, or None."
        )
    leaves, treedef = jax.tree_util.tree_flatten_with_path(batch)
    out = []
    for path, leaf in leaves:
        leaf = leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)
        name = jax.tree_util.keystr(path) or "<batch>"
        if leaf.ndim < len(spec):
            raise ParallelError(
                f"shard_batch: leaf {name} has shape {leaf.shape}, but spec {spec} lays out "
                f"{len(spec)} dims. Pass a spec with at most {leaf.ndim} entries for it, or "
                "shard that leaf separately."
            )
        if len(spec) and spec[0] is not None and leaf.shape[0] % local_shards:
            raise ParallelError(
                f"shard_batch: leaf {name} has {leaf.shape[0]} rows on process {jax.process_index()}, "
                f"not divisible by the {local_shards} batch shards of spec {spec} that this process's "
                f"devices hold on mesh {dict(mesh.shape)}. Make each process's batch a multiple of "
                f"{local_shards} rows."
            )
        leaf_spec = _with_sequence(spec, leaf, name, mesh, seq_axis)
        out.append(jax.make_array_from_process_local_data(NamedSharding(mesh, leaf_spec), leaf))
    return jax.tree_util.tree_unflatten(treedef, out)


def _with_sequence(spec: P, leaf: Any, name: str, mesh: Mesh, seq_axis: str | None) -> P:
    """`spec` with the leaf's sequence dim over `seq_axis` (see `shard_batch`)."""
    if seq_axis is None or leaf.ndim < 2:
        return spec
    dim = 2 if leaf.ndim == 4 else 1
    size = mesh.shape[seq_axis]
    if leaf.shape[dim] % size:
        pad = -(-leaf.shape[dim] // size) * size
        raise ParallelError(
            f"shard_batch: leaf {name} has shape {leaf.shape}; its sequence dim {dim} "
            f"({leaf.shape[dim]}) does not split over the {size} devices of seq_axis "
            f"{seq_axis!r}. Pad the sequence to {pad} (and mask the padding)."
        )
    entries = list(spec) + [None] * (leaf.ndim - len(spec))
    entries[dim] = seq_axis
    return P(*entries)


def reduce_metrics(metrics: Any, *, op: str = "mean") -> Any:
    """Turns step metrics into Python floats that are the same on every process.

    Two kinds of leaf, told apart by where they live:

    * a global `jax.Array` (not fully addressable: it spans processes, such
      as the loss a jitted step returns) is reduced over its elements on
      the devices (a replicated scalar is just read): no gather to a host;
    * anything process-local (a Python or numpy number, a fully addressable
      array) is first reduced over its own elements, then across processes
      with `process_allgather`: `mean` weights every process equally.

    In one process every leaf is local, and this is `float(op(leaf))`.
    Process-local leaves make it a collective: every process must call it
    at the same step with the same tree structure.

    Args:
      metrics: A pytree of scalars or arrays.
      op: `'mean'` or `'sum'`.

    Returns:
      The same pytree with a Python float per leaf.

    Raises:
      ParallelError: an unknown `op`, or a leaf that is not a real number
        (a string, an object, a complex value: a float cannot hold its
        imaginary part, so pass `x.real` and `x.imag`, or `abs(x)`).

    Example:
      >>> loss = jax.device_put(jax.numpy.arange(8.0), jax.NamedSharding(mesh8, P("model")))
      >>> reduce_metrics({"loss": loss, "lr": 0.5, "tokens": jax.numpy.int32(4)})
      {'loss': 3.5, 'lr': 0.5, 'tokens': 4.0}
      >>> reduce_metrics([loss], op="sum")
      [28.0]
    """
    if op not in OPS:
        raise ParallelError(f"reduce_metrics: op must be one of {OPS}, got {op!r}.")
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(metrics)[0]:
        _check_metric(keypath, leaf)
    leaves, treedef = jax.tree_util.tree_flatten(metrics)
    values: list[float | None] = [None] * len(leaves)
    local: dict[int, float] = {}
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            values[i] = _read_global(leaf, op)
        else:
            x = np.asarray(leaf, np.float64)
            local[i] = float(x.mean() if op == "mean" else x.sum())
    if local and jax.process_count() > 1:
        local = _across_processes(local, op)
    for i, v in local.items():
        values[i] = v
    return jax.tree_util.tree_unflatten(treedef, values)


# Helpers -------------------------------------------------------------------------


def _check_metric(keypath, leaf) -> None:
    """Raises `ParallelError` unless `leaf` holds real numbers (bool, int or float)."""
    dtype = leaf.dtype if isinstance(leaf, jax.Array) else np.asarray(leaf).dtype
    where = jax.tree_util.keystr(keypath) or "<root>"
    if dtype.kind == "c":
        raise ParallelError(
            f"reduce_metrics: metric {where} is complex ({dtype}); the result is a Python float, "
            "which would drop the imaginary part. Pass x.real and x.imag as two metrics, or abs(x)."
        )
    if dtype.kind not in "biuf":
        raise ParallelError(
            f"reduce_metrics: metric {where} is {type(leaf).__name__} {leaf!r:.40}, not a number. "
            "Only numbers are reduced: log strings and other values separately."
        )


def _read_global(x: jax.Array, op: str) -> float:
    """A global array reduced over its elements on the devices, read on this process."""
    if x.ndim or not x.sharding.is_fully_replicated:
        x = _REDUCERS[op](x.astype(jnp.float32))
    return float(np.asarray(x.addressable_data(0)))


_REDUCERS = {"mean": jax.jit(jnp.mean), "sum": jax.jit(jnp.sum)}


def _across_processes(local: dict[int, float], op: str) -> dict[int, float]:
    mine = np.asarray(list(local.values()), np.float32)
    every = np.asarray(_compat.process_allgather(mine), np.float64)  # (processes, n)
    reduced = every.mean(axis=0) if op == "mean" else every.sum(axis=0)
    return {i: float(v) for i, v in zip(local, reduced)}


def _batch_shards(mesh: Mesh, spec: P) -> int:
    """How many blocks dim 0 is split into; checks the axes exist."""
    first = spec[0] if len(spec) else None
    axes = () if first is None else (first if isinstance(first, tuple) else (first,))
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown:
        raise MeshAxisError(
            f"spec {spec} names mesh axes {unknown} that mesh {dict(mesh.shape)} does not have. "
            f"Use axes from {mesh.axis_names}, or omit spec for batch_spec(mesh)."
        )
    return math.prod(mesh.shape[a] for a in axes)


def _local_batch_shards(mesh: Mesh, spec: P) -> int:
    """Distinct dim-0 blocks among this process's devices."""
    shards = _batch_shards(mesh, spec)
    sharding = NamedSharding(mesh, P(spec[0] if len(spec) else None))
    return len(
        {
            _bounds(i[0], shards)
            for i in sharding.addressable_devices_indices_map((shards,)).values()
        }
    )


def _bounds(index: slice, size: int) -> tuple[int, int]:
    start, stop, _ = index.indices(size)
    return start, stop
