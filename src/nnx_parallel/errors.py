"""Exception types. Every message says what happened, why, and what to do."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ParallelError(ValueError):
    """Base class of every error nnx_parallel raises on bad input."""


class PlanError(ParallelError):
    """A plan, a style or a declaration cannot be applied to this model."""


class CheckpointError(ParallelError):
    """A checkpoint directory is missing, incomplete, corrupt or not ours."""


class MeshError(ParallelError):
    """The mesh does not fit the plan (unknown axis, wrong device count)."""


class MeshAxisError(PlanError, MeshError):
    """A plan, spec or argument names a mesh axis the mesh does not have.

    Raised the same way wherever an axis name is read (styles, specs,
    `@sharded`, layouts, batch axes, `shard_batch`, `cross_entropy`,
    `estimate`): `except PlanError` and `except MeshError` both catch it.
    """


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """' Did you mean 'x'?' for the closest candidate, or ''."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""
