"""What restore reads into: abstract model and optimizer targets laid out by the new plan, and what save accepts."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from nnx_parallel.checkpoint.manifest import OPTIMIZER_ITEM, OptimizerArg, _flat
from nnx_parallel.core.resolve import Resolution
from nnx_parallel.errors import PlanError
from nnx_parallel.reshard import mirror_sharding
from nnx_parallel.runtime.sharded_init import abstract_copy, abstract_parallelize


def _optimizer_target(opt_state: nnx.State, resolution: Resolution) -> dict:
    """Pure dict of sharded ShapeDtypeStructs for an optimizer's state."""

    def target(keypath, leaf):
        sharding = mirror_sharding(keypath, leaf.shape, resolution)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(target, nnx.to_pure_dict(opt_state))


def _model_target(model: Any, mesh: Mesh, plan: Any, strict: bool):
    """(abstract model, resolution): the layout `plan` gives on `mesh`."""
    if isinstance(model, nnx.Module):
        model = abstract_copy(model, fresh=True)
    elif not callable(model):
        raise PlanError(
            f"restore expects a model or a zero-argument factory, got {type(model).__name__}."
        )
    return abstract_parallelize(model, mesh, plan, strict=strict)


def _optimizer_abstract(optimizer: OptimizerArg, abstract_model: nnx.Module) -> nnx.Pytree:
    if isinstance(optimizer, nnx.Pytree):
        return optimizer
    if not callable(optimizer):
        raise PlanError(
            "optimizer must be an nnx.Optimizer or a callable model -> nnx.Optimizer, "
            f"got {type(optimizer).__name__}."
        )
    opt = nnx.eval_shape(optimizer, abstract_model)
    if not isinstance(opt, nnx.Pytree):
        raise PlanError(f"optimizer(model) must return an nnx.Optimizer, got {type(opt).__name__}.")
    return opt


def _check_saveable(model: Any, optimizer: Any) -> None:
    if not isinstance(model, nnx.Module):
        raise PlanError(
            f"save expects the model to be an nnx.Module, got {type(model).__name__}. Pass "
            "the model first and the optimizer (an nnx.Optimizer) second."
        )
    if optimizer is not None and not isinstance(optimizer, nnx.Pytree):
        raise PlanError(
            f"save expects the optimizer to be an nnx.Optimizer (or another NNX object), got "
            f"{type(optimizer).__name__}."
        )
    _pure(model, "model")  # before anything touches the disk
    if optimizer is not None:
        _pure(optimizer, "optimizer")


def _pure(obj: Any, what: str) -> dict:
    """The pure dict of `obj`'s state; refuses an object without arrays."""
    tree = nnx.to_pure_dict(nnx.state(obj))
    for path, leaf in _flat(tree).items():
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            raise PlanError(
                f"save: {what} state {path!r} holds a {type(leaf).__name__} ({leaf!r:.40}), not "
                "an array; a checkpoint stores arrays. Make it one where the model is built "
                f"(e.g. nnx.Param(jnp.asarray({leaf!r:.40}))). Nothing was written."
            )
    if not jax.tree_util.tree_leaves(tree):
        raise PlanError(
            f"save: the {what} ({type(obj).__name__}) holds no arrays: nothing to save."
        )
    return tree


def _fill_optimizer(optimizer, graphdef, state, values) -> nnx.Optimizer:
    """The restored optimizer: `optimizer` updated in place, or one built from
    its abstract twin's graph (when a factory was passed)."""
    nnx.replace_by_pure_dict(state, values[OPTIMIZER_ITEM])
    if isinstance(optimizer, nnx.Pytree):
        nnx.update(optimizer, state)
        return optimizer
    return nnx.merge(graphdef, state)
