"""Sharded checkpoints through orbax-checkpoint, restorable onto any mesh and plan.

`save` writes each array shard by shard (orbax / TensorStore); nothing is
gathered. `restore` first builds the target, every array a
`jax.ShapeDtypeStruct` carrying the `NamedSharding` the new plan gives it
(`abstract_parallelize`), so each device reads only its own blocks: nothing
is restored replicated and resharded afterwards. Optimizer state leaves
take the sharding of the parameter they mirror (Adam's `mu`/`nu` of
`blocks.0.mlp.up.kernel` are laid out like that kernel).

Layout on disk: `path/model` and, if given, `path/optimizer`, each an orbax
`StandardCheckpointer` tree of the state's pure dict (`nnx.to_pure_dict`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from nnx_parallel.core.resolve import Resolution
from nnx_parallel.errors import PlanError
from nnx_parallel.reshard import mirror_sharding
from nnx_parallel.runtime.sharded_init import abstract_copy, abstract_parallelize

MODEL_ITEM = "model"
OPTIMIZER_ITEM = "optimizer"

OptimizerArg = nnx.Optimizer | Callable[[nnx.Module], nnx.Optimizer] | None


def _checkpointer():
    import orbax.checkpoint as ocp  # optional dependency: pip install orbax-checkpoint

    return ocp.StandardCheckpointer()


def save(path: str | os.PathLike, model: nnx.Module, optimizer: nnx.Optimizer | None = None, *, overwrite: bool = False) -> None:
    """Saves a (parallelized) model, and optionally its optimizer, shard by shard.

    Args:
      path: Directory to create.
      model: The module whose whole state (params, batch stats, RNG state,
        `nnx.data` arrays) is saved.
      optimizer: An `nnx.Optimizer` (or any NNX object) to save alongside.
      overwrite: Replace an existing checkpoint at `path`.

    Example:
      >>> import tempfile
      >>> mlp = parallelize(lambda: TinyMLP(rngs=nnx.Rngs(0)), fsdp8, FSDP(min_size=16))
      >>> path = tempfile.mkdtemp() + "/ckpt"
      >>> save(path, mlp)
      >>> back = restore(path, lambda: TinyMLP(rngs=nnx.Rngs(1)), mesh8, {"up": ColumnParallel()})
      >>> back.up.kernel[...].sharding.spec, bool((back.up.kernel[...] == mlp.up.kernel[...]).all())
      (P(None, 'model'), True)
    """
    path = os.path.abspath(os.fspath(path))
    items = {MODEL_ITEM: model} | ({OPTIMIZER_ITEM: optimizer} if optimizer is not None else {})
    with _checkpointer() as ck:
        for name, obj in items.items():
            ck.save(os.path.join(path, name), nnx.to_pure_dict(nnx.state(obj)), force=overwrite)


def restore(
    path: str | os.PathLike,
    model: nnx.Module | Callable[[], nnx.Module],
    mesh: Mesh,
    plan: Any,
    optimizer: OptimizerArg = None,
    *,
    strict: bool = True,
) -> nnx.Module | tuple[nnx.Module, nnx.Optimizer]:
    """Restores a checkpoint directly into the layout `plan` gives on `mesh`.

    The mesh and plan may differ from those at save time (other device
    count, FSDP instead of tensor parallel, ...); values are bit-exact.

    Args:
      path: A directory written by `save`.
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

    Returns:
      The restored, parallelized model (hooks installed), or
      `(model, optimizer)` when `optimizer` is given.

    Raises:
      PlanError: `model` is neither a module nor a factory.

    Example:
      >>> import optax, tempfile
      >>> mlp = parallelize(lambda: TinyMLP(rngs=nnx.Rngs(0)), mesh8, {"up": ColumnParallel()})
      >>> path = tempfile.mkdtemp() + "/ckpt"
      >>> save(path, mlp, nnx.Optimizer(mlp, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param))
      >>> sgd = lambda m: nnx.Optimizer(m, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
      >>> mlp2, opt2 = restore(path, lambda: TinyMLP(rngs=nnx.Rngs(0)), fsdp8, FSDP(min_size=16), optimizer=sgd)
      >>> opt2.opt_state[0].trace["up"]["kernel"][...].sharding.spec
      P(None, 'fsdp')
    """
    path = os.path.abspath(os.fspath(path))
    if isinstance(model, nnx.Module):
        model = abstract_copy(model, fresh=True)
    elif not callable(model):
        raise PlanError(f"restore expects a model or a zero-argument factory, got {type(model).__name__}.")
    abstract, resolution = abstract_parallelize(model, mesh, plan, strict=strict)
    graphdef, state = nnx.split(abstract)
    with _checkpointer() as ck:
        values = ck.restore(os.path.join(path, MODEL_ITEM), nnx.to_pure_dict(state))
        nnx.replace_by_pure_dict(state, values)
        restored = nnx.merge(graphdef, state)
        if optimizer is None:
            return restored
        opt = optimizer if isinstance(optimizer, nnx.Pytree) else nnx.eval_shape(optimizer, restored)
        opt_graphdef, opt_state = nnx.split(opt)
        target = _optimizer_target(opt_state, resolution)
        values = ck.restore(os.path.join(path, OPTIMIZER_ITEM), target)
    nnx.replace_by_pure_dict(opt_state, values)
    if isinstance(optimizer, nnx.Pytree):
        nnx.update(optimizer, opt_state)
        return restored, optimizer
    return restored, nnx.merge(opt_graphdef, opt_state)


def _optimizer_target(opt_state: nnx.State, resolution: Resolution) -> dict:
    """Pure dict of sharded ShapeDtypeStructs for an optimizer's state."""

    def target(keypath, leaf):
        sharding = mirror_sharding(keypath, leaf.shape, resolution)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(target, nnx.to_pure_dict(opt_state))
