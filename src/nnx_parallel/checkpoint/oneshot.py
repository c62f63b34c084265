"""`save` and `restore`: one checkpoint at a path, as a CheckpointManager keeping one step."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from nnx_parallel.checkpoint.directory import (
    _directory,
)
from nnx_parallel.checkpoint.manager import CheckpointManager
from nnx_parallel.checkpoint.manifest import (
    OptimizerArg,
)
from nnx_parallel.checkpoint.targets import (
    _check_saveable,
)
from nnx_parallel.errors import CheckpointError


def save(
    path: str | os.PathLike,
    model: nnx.Module,
    optimizer: nnx.Optimizer | None = None,
    *,
    overwrite: bool = False,
) -> None:
    """Saves a (parallelized) model, and optionally its optimizer, shard by shard.

    Crash-safe: `path` is a `CheckpointManager` directory keeping one step.
    Overwriting writes the new step beside the old one and deletes the old
    one only once the new one is complete, so a crash at any moment leaves
    the old or the new checkpoint restorable, never neither, never a mix.

    Args:
      path: The checkpoint directory (created if missing).
      model: The module whose whole state (params, batch stats, RNG state,
        `nnx.data` arrays) is saved.
      optimizer: An `nnx.Optimizer` (or any NNX object) to save alongside.
      overwrite: Replace an existing checkpoint at `path`.

    Raises:
      CheckpointError: `path` is empty, holds a checkpoint (and not
        `overwrite`), or holds files that are not a checkpoint of ours.
      PlanError: `model` is not an `nnx.Module` (or holds no arrays).

    Example:
      >>> import tempfile
      >>> mlp = parallelize(lambda: TinyMLP(rngs=nnx.Rngs(0)), fsdp8, FSDP(min_size=16))
      >>> path = tempfile.mkdtemp() + "/ckpt"
      >>> save(path, mlp)
      >>> back = restore(path, lambda: TinyMLP(rngs=nnx.Rngs(1)), mesh8, {"up": ColumnParallel()})
      >>> back.up.kernel[...].sharding.spec, bool((back.up.kernel[...] == mlp.up.kernel[...]).all())
      (P(None, 'model'), True)
      >>> save(path, mlp)
      Traceback (most recent call last):
      ...
      nnx_parallel.errors.CheckpointError: ... already holds a checkpoint (step 0). ...
    """
    directory = _directory(path)
    _check_saveable(model, optimizer)
    with CheckpointManager(directory, keep=1, async_save=False) as manager:
        latest = manager.latest_step()
        if latest is not None and not overwrite:
            raise CheckpointError(
                f"{directory} already holds a checkpoint (step {latest}). Pass overwrite=True "
                "to replace it (the old one stays until the new one is complete), or pick "
                "another path."
            )
        manager.save(0 if latest is None else latest + 1, model, optimizer)


def restore(
    path: str | os.PathLike,
    model: nnx.Module | Callable[[], nnx.Module],
    mesh: Mesh,
    plan: Any,
    optimizer: OptimizerArg = None,
    *,
    strict: bool = True,
    cast: bool = False,
) -> nnx.Module | tuple[nnx.Module, nnx.Optimizer]:
    """Restores a checkpoint directly into the layout `plan` gives on `mesh`.

    The mesh and plan may differ from those at save time (other device
    count, FSDP instead of tensor parallel, ...); values are bit-exact and
    checked against the checksums written at save time.

    Args:
      path: A directory written by `save` (or by a `CheckpointManager`: its
        latest step is read).
      model: The model's structure: a zero-argument factory (never run:
        only its shapes are read), an abstract model (`nnx.eval_shape`), or
        a model (its values are ignored and it is not modified).
      mesh: The mesh to restore onto.
      plan: The plan to restore with, as for `parallelize`.
      optimizer: None, an `nnx.Optimizer` whose state is replaced in place
        with the saved one, or a callable `model -> nnx.Optimizer` (e.g.
        `lambda m: nnx.Optimizer(m, optax.adam(1e-3), wrt=nnx.Param)`),
        evaluated abstractly. Its state leaves are sharded like the
        params they mirror, the rest replicated.
      strict: If True, a pattern that matches no module raises `PlanError`.
      cast: Convert saved dtypes that differ from the model's; without it
        they raise `PlanError`.

    Returns:
      The restored, parallelized model (hooks installed), or
      `(model, optimizer)` when `optimizer` is given.

    Raises:
      PlanError: `model` is neither a module nor a factory, or the saved
        paths, shapes or dtypes differ from the model's (all listed).
      CheckpointError: no checkpoint at `path` (or `path` is a file), no
        optimizer state saved when one is asked for, a damaged manifest, or
        damaged files (the array is named).

    Example:
      >>> import optax, tempfile
      >>> mlp = parallelize(lambda: TinyMLP(rngs=nnx.Rngs(0)), mesh8, {"up": ColumnParallel()})
      >>> path = tempfile.mkdtemp() + "/ckpt"
      >>> save(path, mlp, nnx.Optimizer(mlp, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param))
      >>> sgd = lambda m: nnx.Optimizer(m, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
      >>> mlp2, opt2 = restore(path, lambda: TinyMLP(rngs=nnx.Rngs(0)), fsdp8, FSDP(min_size=16),
      ...                      optimizer=sgd)
      >>> opt2.opt_state[0].trace["up"]["kernel"][...].sharding.spec
      P(None, 'fsdp')
    """
    manager = CheckpointManager._reader(_directory(path))
    with manager:
        r = manager.restore(model, mesh, plan, optimizer=optimizer, strict=strict, cast=cast)
    return r.model if optimizer is None else (r.model, r.optimizer)
