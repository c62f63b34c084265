"""What a checkpoint step holds and what restore checks: paths, manifest, mismatches."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from nnx_parallel.checkpoint._checksums import _checksums
from nnx_parallel.core.resolve import Resolution
from nnx_parallel.errors import CheckpointError, PlanError
from nnx_parallel.reshard import mirror_sharding
from nnx_parallel.runtime.sharded_init import abstract_copy, abstract_parallelize

MODEL_ITEM = "model"
OPTIMIZER_ITEM = "optimizer"
METADATA_ITEM = "metadata"
MANIFEST_ITEM = "nnx_parallel"
FORMAT = 1
_TMP_MARK = ".orbax-checkpoint-tmp"

OptimizerArg = nnx.Optimizer | Callable[[nnx.Module], nnx.Optimizer] | None


def _ocp():
    import orbax.checkpoint as ocp  # optional dependency: pip install orbax-checkpoint

    return ocp


# Paths ----------------------------------------------------------------------


def _directory(path: str | os.PathLike) -> str:
    """Absolute path; refuses '' (it would mean the working directory)."""
    text = os.fspath(path)
    if not isinstance(text, str) or not text.strip():
        raise CheckpointError(
            f"A checkpoint path must name a directory, got {text!r}: an empty path would "
            "write into the working directory. Pass e.g. 'checkpoints/run1'."
        )
    return os.path.abspath(text)


def _foreign_entries(directory: str) -> list[str]:
    """Entries of `directory` that a checkpoint directory of ours never contains.

    Ours: step directories (digits) of which at least one holds our
    manifest (another may be half deleted by a crash), and orbax's
    temporary directories of unfinished steps (cleaned up on the next save).
    """
    names = sorted(os.listdir(directory))
    steps = [n for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n))]
    if not any(os.path.isdir(os.path.join(directory, n, MANIFEST_ITEM)) for n in steps):
        steps = []
    return [n for n in names if n not in steps and _TMP_MARK not in n]


def _check_ours(directory: str) -> None:
    """Refuses to write into a folder that holds anything but our steps."""
    if not os.path.exists(directory):
        return
    if not os.path.isdir(directory):
        raise CheckpointError(f"Checkpoint path {directory} is a file, not a directory.")
    foreign = _foreign_entries(directory)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise CheckpointError(
            f"{directory} is not an nnx_parallel checkpoint directory: it holds {shown}, "
            "which nnx_parallel did not write. Refusing to write there, since saving "
            "would mix with or delete those files. Pick a new or empty directory."
        )


# Trees and the manifest -----------------------------------------------------


def _key_name(key: Any) -> str:
    return str(getattr(key, "key", getattr(key, "idx", key)))


def _flat(tree: Any) -> dict[str, Any]:
    """{'blocks.0.mlp.up.kernel': leaf} of a pure dict."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _dtype_name(x: Any) -> str:
    return str(x.dtype)


def _manifest_entry(tree: dict) -> dict:
    flat = _flat(tree)
    sums = _checksums(flat)
    return {
        p: {"shape": list(np.shape(x)), "dtype": _dtype_name(x), "checksum": sums[p]}
        for p, x in flat.items()
    }


def _manifest_problem(manifest: dict) -> str:
    """What is wrong with a manifest's structure ('' if nothing): see `save`."""
    items = manifest.get("items")
    if not isinstance(manifest.get("metadata"), bool):
        return "its 'metadata' flag is missing"
    if not isinstance(items, dict) or MODEL_ITEM not in items:
        return f"its 'items' ({items!r:.40}) do not list the model"
    for item, entries in items.items():
        if not isinstance(entries, dict):
            return f"item {item!r} lists {entries!r:.40}, not arrays"
        for path, entry in entries.items():
            keys = ("shape", "dtype", "checksum")
            missing = [k for k in keys if not isinstance(entry, dict) or k not in entry]
            if missing:
                return f"the entry of {item}.{path} lacks {missing}"
    return ""


def _damaged_manifest(where: str, problem: str) -> CheckpointError:
    return CheckpointError(
        f"The checkpoint {where} has a damaged manifest (the '{MANIFEST_ITEM}' item, which "
        f"lists every array's shape, dtype and checksum): {problem}. The arrays cannot be "
        "checked without it, so nothing was restored. Restore another step (all_steps() lists "
        "them), or save again from a live model."
    )


def _check_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise PlanError(f"metadata must be a dict, got {type(metadata).__name__}.")
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as e:
        raise PlanError(
            f"metadata must be JSON-serializable (str keys; str, numbers, bools, lists, "
            f"dicts), and json says: {e}. Convert arrays with .tolist() or float()."
        ) from None


# Restore checks -------------------------------------------------------------


def _mismatches(item: str, target: dict[str, Any], saved: dict[str, dict], cast: bool) -> list:
    """One line per path whose presence, shape or dtype differs from the checkpoint."""
    lines = []
    for p in sorted(saved.keys() - target.keys()):
        lines.append(f"{item}.{p}: in the checkpoint, not in the model")
    for p in sorted(target.keys() - saved.keys()):
        lines.append(f"{item}.{p}: in the model, not in the checkpoint")
    for p in sorted(saved.keys() & target.keys()):
        want, have = saved[p], target[p]
        if tuple(want["shape"]) != tuple(have.shape):
            lines.append(
                f"{item}.{p}: shape {tuple(want['shape'])} in the checkpoint, "
                f"{tuple(have.shape)} in the model"
            )
        elif want["dtype"] != _dtype_name(have) and (not cast or "key<" in want["dtype"]):
            lines.append(
                f"{item}.{p}: dtype {want['dtype']} in the checkpoint, "
                f"{_dtype_name(have)} in the model"
            )
    return lines


def _raise_mismatches(lines: list[str], where: str) -> None:
    if not lines:
        return
    fixes = ["build the model (and optimizer) with the configuration it was saved with"]
    if any(": dtype " in line for line in lines):
        fixes.append("pass cast=True to convert the saved dtypes to the model's on purpose")
    raise PlanError(
        f"The checkpoint {where} does not fit the model: {len(lines)} mismatching "
        "path(s):\n  " + "\n  ".join(lines) + "\nTo fix: " + "; or ".join(fixes) + "."
    )


def _saved_dtype_target(target: dict, saved: dict[str, dict]) -> dict:
    """`target` with each leaf's dtype replaced by the saved one (to cast after reading)."""

    def leaf(keypath, x):
        name = saved[".".join(_key_name(k) for k in keypath)]["dtype"]
        if name == _dtype_name(x):
            return x
        return jax.ShapeDtypeStruct(x.shape, jnp.dtype(name), sharding=x.sharding)

    return jax.tree_util.tree_map_with_path(leaf, target)


def _verify(item: str, values: dict, saved: dict[str, dict], where: str) -> None:
    """Raises CheckpointError naming every array whose checksum differs."""
    got = _checksums(_flat(values))
    bad = sorted(p for p, entry in saved.items() if got[p] != entry["checksum"])
    if bad:
        raise CheckpointError(
            f"The checkpoint {where} is corrupt: the values read for "
            + ", ".join(f"{item}.{p}" for p in bad)
            + " differ from those saved (checksum mismatch). The files were changed or "
            "damaged after the save; restore another step, or save again."
        )


def _cast(values: dict, target: dict) -> dict:
    return jax.tree.map(lambda v, t: v if v.dtype == t.dtype else v.astype(t.dtype), values, target)


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


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise PlanError(f"A checkpoint step must be an int >= 0, got {step!r}.")
    return int(step)


def _orbax_manager(directory: str, keep: int | None, async_save: bool, create: bool):
    ocp = _ocp()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=create,
        cleanup_tmp_directories=create,
    )
    return ocp.CheckpointManager(directory, options=options)
