"""The manifest of a checkpoint step (paths, shapes, dtypes, checksums) and restore's checks against it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnx_parallel.checkpoint._checksums import _checksums
from nnx_parallel.errors import CheckpointError, PlanError

MODEL_ITEM = "model"
OPTIMIZER_ITEM = "optimizer"
METADATA_ITEM = "metadata"
MANIFEST_ITEM = "nnx_parallel"
FORMAT = 1
_TMP_MARK = ".orbax-checkpoint-tmp"

OptimizerArg = nnx.Optimizer | Callable[[nnx.Module], nnx.Optimizer] | None


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
