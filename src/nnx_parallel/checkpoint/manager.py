"""CheckpointManager and the one-step save / restore built on it."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from flax import nnx
from jax.sharding import Mesh
from typing_extensions import Self

from nnx_parallel.checkpoint import _faults
from nnx_parallel.checkpoint.directory import (
    _check_ours,
    _check_step,
    _directory,
    _ocp,
    _orbax_manager,
)
from nnx_parallel.checkpoint.manifest import (
    FORMAT,
    MANIFEST_ITEM,
    METADATA_ITEM,
    MODEL_ITEM,
    OPTIMIZER_ITEM,
    OptimizerArg,
    _cast,
    _check_metadata,
    _damaged_manifest,
    _flat,
    _manifest_entry,
    _manifest_problem,
    _mismatches,
    _raise_mismatches,
    _saved_dtype_target,
    _verify,
)
from nnx_parallel.checkpoint.targets import (
    _check_saveable,
    _fill_optimizer,
    _model_target,
    _optimizer_abstract,
    _optimizer_target,
    _pure,
)
from nnx_parallel.errors import CheckpointError, PlanError


class Restored(NamedTuple):
    """One step, restored whole by `CheckpointManager.restore`."""

    step: int
    model: nnx.Module
    optimizer: nnx.Optimizer | None
    metadata: dict | None


class CheckpointManager:
    """Numbered checkpoints of a model, its optimizer and metadata, on orbax.

    Each `save(step, ...)` writes one step directory, `directory/<step>`,
    with orbax's `CheckpointManager`: written under a temporary name and
    renamed when complete, so a crash leaves every finished step intact.
    Model, optimizer and metadata are items of one orbax Composite step:
    `restore` reads them from the same step, all or nothing. Only the last
    `keep` steps stay on disk; older ones are deleted after a newer one is
    complete. With `async_save`, `save` returns once the arrays are copied
    off the devices and the files are written in the background: training
    may go on (and change the model) meanwhile; `wait()` blocks until done.

    Every array gets a checksum at save time, checked on restore: a changed
    or damaged file raises `CheckpointError` naming the array.

    Args:
      directory: Where the steps go; created if missing. An existing
        directory must be empty or hold only checkpoints of ours.
      keep: How many of the newest steps to keep (None: all).
      async_save: Write in the background.

    Raises:
      CheckpointError: `directory` is empty, a file, or holds files that
        nnx_parallel did not write.
      PlanError: `keep` is not a positive int.

    Example:
      >>> import optax, tempfile
      >>> mlp = parallelize(lambda: TinyMLP(rngs=nnx.Rngs(0)), fsdp8, FSDP(min_size=16))
      >>> adam = lambda m: nnx.Optimizer(m, optax.adam(1e-3), wrt=nnx.Param)
      >>> with CheckpointManager(tempfile.mkdtemp(), keep=2) as ckpt:
      ...     for step in range(3):
      ...         ckpt.save(step, mlp, adam(mlp), metadata={"loss": 1.0 / (step + 1)})
      ...     ckpt.wait()
      ...     r = ckpt.restore(lambda: TinyMLP(rngs=nnx.Rngs(1)), mesh8, {"up": ColumnParallel()},
      ...                      optimizer=adam)
      ...     steps = ckpt.all_steps()
      >>> steps, r.step, r.metadata, r.model.up.kernel[...].sharding.spec
      ([1, 2], 2, {'loss': 0.3333333333333333}, P(None, 'model'))
    """

    def __init__(self, directory: str | os.PathLike, keep: int | None = 3, async_save: bool = True):
        self.directory = _directory(directory)
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise PlanError(
                f"keep must be a positive int (or None to keep every step), got {keep!r}."
            )
        _check_ours(self.directory)
        self._last_saved: int | None = None
        self._in_flight: list = []  # orbax threads of the save in flight
        self._deferred: BaseException | None = None  # its error, met by another manager
        _faults.settle(self, self.directory)  # opening cleans up tmp dirs: not theirs
        self._manager = _orbax_manager(self.directory, keep, bool(async_save), create=True)
        _faults.writers(self.directory).add(self)

    @classmethod
    def _reader(cls, directory: str) -> CheckpointManager:
        """A manager that only reads (creates nothing, deletes nothing)."""
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise CheckpointError(
                f"No checkpoint at {directory}: it is a file, not a checkpoint directory. Pass "
                "the directory that save (or a CheckpointManager) wrote."
            )
        if not os.path.isdir(directory):
            raise CheckpointError(f"No checkpoint at {directory}: the directory does not exist.")
        self = cls.__new__(cls)
        self.directory = directory
        self._manager = _orbax_manager(directory, None, False, create=False)
        self._last_saved = None
        self._in_flight, self._deferred = [], None
        return self

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def all_steps(self) -> list[int]:
        """The completed steps on disk, oldest first (waits for a save in flight)."""
        self.wait()
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest completed step, or None (waits for a save in flight).

        Example:
          >>> import tempfile
          >>> with CheckpointManager(tempfile.mkdtemp(), async_save=False) as ckpt:
          ...     before = ckpt.latest_step()
          ...     ckpt.save(7, TinyMLP(rngs=nnx.Rngs(0)))
          ...     after = ckpt.latest_step()
          >>> before, after
          (None, 7)
        """
        steps = self.all_steps()
        return steps[-1] if steps else None

    def wait(self) -> None:
        """Blocks until a background save is on disk; raises its error, if any."""
        self._raise_deferred()
        with _faults.released_on_error(self._in_flight):
            self._manager.wait_until_finished()
        self._in_flight = []

    def _raise_deferred(self) -> None:
        error, self._deferred = self._deferred, None
        if error is not None:
            self._in_flight = []
            raise error

    def close(self) -> None:
        """Waits for a background save, then releases orbax's threads."""
        _faults.writers(self.directory).discard(self)
        try:
            with _faults.released_on_error(self._in_flight):
                self._manager.close()
        finally:
            self._in_flight = []
        self._raise_deferred()

    def save(
        self,
        step: int,
        model: nnx.Module,
        optimizer: nnx.Optimizer | None = None,
        metadata: dict | None = None,
    ) -> None:
        """Saves model, optimizer and metadata as one step, shard by shard.

        The values saved are those at the call, even with `async_save` and a
        model that training changes before the files are written.

        Args:
          step: The step number; must exceed every step already saved here.
          model: The module whose whole state is saved.
          optimizer: An `nnx.Optimizer` (or any NNX object) saved with it.
          metadata: A JSON-serializable dict saved with it (e.g. data loader
            position, config).

        Raises:
          PlanError: `model`/`optimizer` are not NNX objects, hold no arrays,
            or `metadata` is not JSON-serializable.
          CheckpointError: `step` is not newer than the latest step.

        Example:
          >>> import tempfile
          >>> with CheckpointManager(tempfile.mkdtemp()) as ckpt:
          ...     ckpt.save(0, TinyMLP(rngs=nnx.Rngs(0)), metadata={"epoch": 3})
          ...     ckpt.save(0, TinyMLP(rngs=nnx.Rngs(0)))
          Traceback (most recent call last):
          ...
          nnx_parallel.errors.CheckpointError: Step 0 is not newer than step 0, ...
        """
        step = _check_step(step)
        _check_saveable(model, optimizer)
        _check_metadata(metadata)
        trees = {MODEL_ITEM: _pure(model, "model")}
        if optimizer is not None:
            trees[OPTIMIZER_ITEM] = _pure(optimizer, "optimizer")
        self._raise_deferred()
        if _faults.settle(self, self.directory):  # another manager's steps count too
            self._manager.reload()
        newest = max([*self._manager.all_steps(), self._last_saved or -1])
        if step <= newest:
            raise CheckpointError(
                f"Step {step} is not newer than step {newest}, already saved in "
                f"{self.directory}. Save with a step above {newest}, or use a new directory."
            )
        ocp = _ocp()
        manifest = {
            "format": FORMAT,
            "metadata": metadata is not None,
            "items": {name: _manifest_entry(tree) for name, tree in trees.items()},
        }
        args = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()}
        args[MANIFEST_ITEM] = ocp.args.JsonSave(manifest)
        if metadata is not None:
            args[METADATA_ITEM] = ocp.args.JsonSave(metadata)
        before = set(threading.enumerate())
        with _faults.released_on_error([]):  # no orbax thread outlives a failed save
            self._manager.save(step, args=ocp.args.Composite(**args))
        self._in_flight = _faults.started_since(before)  # released if the save fails later
        self._last_saved = step

    def restore(
        self,
        model: nnx.Module | Callable[[], nnx.Module],
        mesh: Mesh,
        plan: Any,
        step: int | None = None,
        optimizer: OptimizerArg = None,
        *,
        strict: bool = True,
        cast: bool = False,
    ) -> Restored:
        """Restores one step, whole, directly into the layout `plan` gives on `mesh`.

        Args:
          model: The model's structure: a zero-argument factory (never run),
            an abstract model (`nnx.eval_shape`), or a model (only read).
          mesh: The mesh to restore onto (may differ from the one saved from).
          plan: The plan to restore with, as for `parallelize`.
          step: The step to read; None for the latest.
          optimizer: None, an `nnx.Optimizer` whose state is replaced in
            place, or a callable `model -> nnx.Optimizer`, evaluated
            abstractly. The step must hold optimizer state.
          strict: If True, a pattern that matches no module raises `PlanError`.
          cast: Convert saved dtypes that differ from the model's (e.g. a
            float32 checkpoint into a bfloat16 model). Without it, they raise.

        Returns:
          `Restored(step, model, optimizer, metadata)`: the parallelized
          model (hooks installed), the optimizer (None if not asked for),
          and the metadata dict saved with the step (None if none).

        Raises:
          PlanError: `model` or `optimizer` is not usable, or the saved
            paths, shapes or dtypes differ from the model's (every
            mismatching path is listed).
          CheckpointError: no such step, the step lacks an item asked for, its
            manifest is damaged, or a value read differs from the one saved
            (checksum). `step` that is not an int >= 0 raises `PlanError`.

        Example:
          >>> import optax, tempfile
          >>> sgd = lambda m: nnx.Optimizer(m, optax.sgd(0.1), wrt=nnx.Param)
          >>> with CheckpointManager(tempfile.mkdtemp(), async_save=False) as ckpt:
          ...     ckpt.save(0, TinyMLP(rngs=nnx.Rngs(0)))
          ...     ckpt.restore(lambda: TinyMLP(rngs=nnx.Rngs(0)), mesh8, {}, optimizer=sgd)
          Traceback (most recent call last):
          ...
          nnx_parallel.errors.CheckpointError: Step 0 in ... has no optimizer state: ...
        """
        abstract, resolution = _model_target(model, mesh, plan, strict)
        opt = None if optimizer is None else _optimizer_abstract(optimizer, abstract)
        step = self._pick_step(step)
        where = f"step {step} in {self.directory}"
        manifest = self._manifest(step, where)
        graphdef, state = nnx.split(abstract)
        targets = {MODEL_ITEM: nnx.to_pure_dict(state)}
        if opt is not None:
            if OPTIMIZER_ITEM not in manifest["items"]:
                raise CheckpointError(
                    f"Step {step} in {self.directory} has no optimizer state: it was saved "
                    "without one. Restore without optimizer= (and start a fresh optimizer), "
                    "or restore a step saved with an optimizer."
                )
            opt_graphdef, opt_state = nnx.split(opt)
            targets[OPTIMIZER_ITEM] = _optimizer_target(opt_state, resolution)
        _raise_mismatches(
            [
                line
                for item, target in targets.items()
                for line in _mismatches(item, _flat(target), manifest["items"][item], cast)
            ],
            where,
        )
        values, metadata = self._read(step, targets, manifest, cast, where)
        nnx.replace_by_pure_dict(state, values[MODEL_ITEM])
        restored_opt = None
        if optimizer is not None:
            restored_opt = _fill_optimizer(optimizer, opt_graphdef, opt_state, values)
        return Restored(step, nnx.merge(graphdef, state), restored_opt, metadata)

    def _pick_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            legacy = os.path.isdir(os.path.join(self.directory, MODEL_ITEM))
            raise CheckpointError(
                f"No checkpoint in {self.directory}: it holds no completed step. "
                + (
                    "It holds a 'model' folder: the layout of checkpoints written before "
                    "step directories; read it with orbax's StandardCheckpointer and save "
                    "it again."
                    if legacy
                    else "Check the path; a save that was interrupted leaves no step."
                )
            )
        if step is None:
            return steps[-1]
        step = _check_step(step)
        if step not in steps:
            raise CheckpointError(f"No step {step} in {self.directory}; its steps: {steps}.")
        return step

    def _manifest(self, step: int, where: str) -> dict:
        """Our manifest of `step`, after checking every item it lists is on disk."""
        ocp = _ocp()
        step_dir = os.path.join(self.directory, str(step))
        if not os.path.isdir(os.path.join(step_dir, MANIFEST_ITEM)):
            raise CheckpointError(f"The checkpoint {where} was not written by nnx_parallel.")
        try:
            manifest = self._manager.restore(
                step, args=ocp.args.Composite(**{MANIFEST_ITEM: ocp.args.JsonRestore()})
            )[MANIFEST_ITEM]
        except Exception as e:  # orbax / json: an unreadable manifest file (details chained)
            raise _damaged_manifest(where, f"it cannot be read ({type(e).__name__}: {e})") from e
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise CheckpointError(
                f"The checkpoint {where} has an unknown format: {manifest!r:.80}."
            )
        problem = _manifest_problem(manifest)
        if problem:
            raise _damaged_manifest(where, problem)
        expected = [*manifest["items"], *([METADATA_ITEM] if manifest["metadata"] else [])]
        missing = [i for i in expected if not os.path.isdir(os.path.join(step_dir, i))]
        if missing:
            raise CheckpointError(
                f"The checkpoint {where} is incomplete: items {missing} are missing. Its "
                "files were removed after the save; restore another step."
            )
        return manifest

    def _read(self, step: int, targets: dict, manifest: dict, cast: bool, where: str):
        """Reads the items of one step in one orbax restore, then checks and casts."""
        ocp = _ocp()
        saved = manifest["items"]
        reads = {k: _saved_dtype_target(t, saved[k]) if cast else t for k, t in targets.items()}
        args = {k: ocp.args.StandardRestore(t) for k, t in reads.items()}
        if manifest["metadata"]:
            args[METADATA_ITEM] = ocp.args.JsonRestore()
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # orbax / TensorStore: unreadable files (details chained)
            raise CheckpointError(
                f"The checkpoint {where} could not be read ({type(e).__name__} from orbax, "
                "chained above): its files are damaged, or were changed or removed after the "
                "save. Restore another step, or save again."
            ) from e
        for k in reads:
            _verify(k, out[k], saved[k], where)
        values = {k: _cast(out[k], targets[k]) if cast else out[k] for k in reads}
        return values, out[METADATA_ITEM] if manifest["metadata"] else None
