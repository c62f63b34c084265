"""The checkpoint directory: paths, foreign files, steps and the orbax manager."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from nnx_parallel.checkpoint.manifest import _TMP_MARK, MANIFEST_ITEM
from nnx_parallel.errors import CheckpointError, PlanError


def _ocp():
    import orbax.checkpoint as ocp  # optional dependency: pip install orbax-checkpoint

    return ocp


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
