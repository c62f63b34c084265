"""Loss-parallel cross-entropy: the loss of vocab-sharded logits, never gathered.

A vocab-parallel LM head (`ColumnParallel` on the head) leaves each device a
`(..., vocab / n)` slice of the logits. Gathering them for an ordinary loss
moves `n - 1` slices of the largest activation of the model to every device.
`cross_entropy` instead runs inside a `shard_map` over the vocab axis and
combines three small per-token numbers across devices: the max logit (pmax),
the sum of exponentials (psum) and the target logit (psum). Traffic per token
is three scalars instead of `vocab` floats.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat, _specs
from nnx_parallel.errors import MeshAxisError, PlanError


def cross_entropy(
    logits: jax.Array, labels: jax.Array, mesh: Mesh, axis: str = "model"
) -> jax.Array:
    """Softmax cross-entropy of logits sharded on their last (vocab) dim.

    Equal to `optax.softmax_cross_entropy_with_integer_labels(logits, labels)`,
    computed without all-gathering `logits`: each device works on its vocab
    slice and only per-token scalars cross devices. Other mesh axes (a batch
    axis such as `'data'`) stay automatic, so batch sharding is kept.

    Args:
      logits: Float array `(..., vocab)`; `vocab` must divide by the size of
        `axis`. Ideally already sharded on its last dim over `axis` (a
        `ColumnParallel` head leaves it so); otherwise it is sliced locally.
      labels: Integer array `(...)` of target ids in `[0, vocab)`.
      mesh: The mesh `axis` belongs to.
      axis: The mesh axis the vocab dim is sharded over.

    Returns:
      Per-example losses of shape `labels.shape` (float32 or wider): take
      `.mean()` for the usual scalar loss.

    Raises:
      MeshError: `axis` is not a mesh axis.
      PlanError: shapes do not fit (labels rank, vocab not divisible).

    Example:
      >>> logits = jax.random.normal(jax.random.key(0), (4, 64))
      >>> labels = jax.numpy.arange(4)
      >>> with jax.set_mesh(mesh8):
      ...     loss = cross_entropy(logits, labels, mesh8)
      >>> loss.shape
      (4,)
    """
    if axis not in mesh.axis_names:
        raise MeshAxisError(
            f"cross_entropy: mesh axis {axis!r} is not in the mesh {tuple(mesh.axis_names)}. "
            f"Pass axis= the axis the logits' vocab dim is sharded over."
        )
    if logits.ndim != labels.ndim + 1 or logits.shape[:-1] != labels.shape:
        raise PlanError(
            f"cross_entropy: logits {logits.shape} and labels {labels.shape} do not fit: expected "
            "logits (..., vocab) and labels (...) with the same leading dims."
        )
    n = mesh.shape[axis]
    vocab = logits.shape[-1]
    if vocab % n:
        raise PlanError(
            f"cross_entropy: vocab size {vocab} is not divisible by mesh axis {axis!r} (size {n}). "
            f"Pad the vocab to a multiple of {n}."
        )
    body = functools.partial(_local_loss, axis=axis, local_vocab=vocab // n)
    lead = _batch_layout(logits, labels.ndim, axis)
    manual = {axis} | _specs.spec_axes(lead)
    if len(manual) > 1:  # Explicit axes: keep the batch layout the logits carry
        labels = _compat.reshard(labels, mesh, P(*lead))
    logits = _vocab_sharded(logits, P(*lead, axis), mesh, axis)
    mapped = _compat.shard_map(
        body,
        mesh=_abstract_or(mesh),
        in_specs=(P(*lead, axis), P(*lead)),
        out_specs=P(*lead),
        axis_names=manual,
    )
    return mapped(logits, labels)


def _local_loss(local_logits, local_labels, *, axis: str, local_vocab: int):
    """Per-token loss on one vocab shard, inside the shard_map over `axis`."""
    local_logits = local_logits.astype(jnp.promote_types(local_logits.dtype, jnp.float32))
    # The max only stabilises exp(); its gradient cancels, so stop it
    # (pmax has no transpose rule).
    local_max = jax.lax.stop_gradient(jnp.max(local_logits, axis=-1))
    top = jax.lax.pmax(local_max, axis)
    sum_exp = jax.lax.psum(jnp.sum(jnp.exp(local_logits - top[..., None]), axis=-1), axis)
    start = jax.lax.axis_index(axis) * local_vocab
    local_ids = local_labels - start
    mine = (local_ids >= 0) & (local_ids < local_vocab)
    picked = jnp.take_along_axis(
        local_logits, jnp.clip(local_ids, 0, local_vocab - 1)[..., None], axis=-1
    )
    target = jax.lax.psum(jnp.where(mine, picked[..., 0], 0.0), axis)
    return jnp.log(sum_exp) + top - target


def _batch_layout(logits: jax.Array, n_lead: int, axis: str) -> tuple:
    """How the leading dims of `logits` are sharded (Explicit axes), else None.

    With Explicit axes the shard_map must name every sharded axis, or the batch
    would be gathered on entry; with Auto axes the partitioner keeps it anyway.
    """
    spec = _specs.pad(_compat.spec_of(logits), n_lead + 1)[:n_lead]
    return tuple(_specs.drop_axes(spec, {axis}))


def _vocab_sharded(logits: jax.Array, spec: P, mesh: Mesh, axis: str) -> jax.Array:
    """Explicit axes: `logits` resharded onto `spec` if their type says otherwise
    (e.g. replicated over `axis`: each device then keeps its vocab slice)."""
    if not _compat.is_explicit(mesh, (axis,)):
        return logits  # Auto axes: shard_map slices the input itself
    if _specs.pad(_compat.spec_of(logits), logits.ndim) == _specs.pad(spec, logits.ndim):
        return logits
    return _compat.reshard(logits, _abstract_or(mesh), spec)


def _abstract_or(mesh: Mesh):
    """The context mesh when tracing under `jax.set_mesh`, else `mesh`."""
    context = _compat.abstract_mesh()
    return mesh if context.empty else context
