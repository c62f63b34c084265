"""SIGKILLs `npx.save(..., overwrite=True)` at named stages (for test_checkpoint_crash.py).

Usage: python tests/ckpt_kill_child.py ROOT STAGE [STAGE ...]

Writes ROOT/old (model and optimizer from seed 0) and ROOT/new (seed 1), both
complete. Then, for each STAGE, copies ROOT/old to ROOT/<STAGE> and forks a
child that saves the seed-1 state over it; a hook in the child reports when
the save reaches STAGE and blocks there, and this process SIGKILLs it. The
stages are points in orbax's save (see HOOKS). Prints a JSON report.

This process imports JAX but never starts a backend, so each forked child
starts one of its own, as a fresh process would (and skips the imports).
"""

import json
import os
import select
import shutil
import signal
import sys
import threading

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT_DIR, os.path.join(ROOT_DIR, "src")]
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from orbax.checkpoint._src.path import atomicity, deleter  # noqa: E402

import nnx_parallel as npx  # noqa: E402
from tests import models  # noqa: E402

REPORT_TIMEOUT_S = 120
STAGES = (
    "tmp_created",  # the new step's temporary directory exists, nothing written yet
    "model_written",  # the model item's arrays are written, the item is not finalized
    "model_finalized",  # the model item is finalized; the optimizer maybe not yet
    "items_finalized",  # every item is finalized; the step is not renamed yet
    "step_committed",  # the new step is renamed into place; the old one is not deleted
    "old_half_deleted",  # half of the old step's files are deleted
    "save_returned",  # npx.save returned
)


def state(seed: int):
    """An MLP and its Adam optimizer, every array filled from `seed` on the host.

    No JAX computation (each eager op would compile, seconds per child).
    """
    rng = np.random.default_rng(seed)
    model = nnx.eval_shape(lambda: models.MLP(rngs=nnx.Rngs(0)))
    opt = nnx.eval_shape(lambda m: nnx.Optimizer(m, optax.adam(1e-2), wrt=nnx.Param), model)
    for obj in (model, opt):
        fill = lambda s: np.abs(rng.standard_normal(s.shape) * 100).astype(s.dtype)  # noqa: E731
        nnx.update(obj, jax.tree.map(fill, nnx.state(obj)))
    return model, opt


def block(report_fd: int, stage: str) -> None:
    os.write(report_fd, (stage + "\n").encode())
    threading.Event().wait()  # until SIGKILLed


def install(stage: str, report_fd: int) -> None:
    """Patches orbax so that the save blocks at `stage`, after reporting it."""
    tmp_cls = atomicity.AtomicRenameTemporaryPath
    create, finalize = tmp_cls.create, tmp_cls.finalize
    delete = deleter.StandardCheckpointDeleter.delete

    def item(self) -> str:
        return os.path.basename(str(self.get())).split(".")[0]

    async def hooked_create(self, *a, **k):
        out = await create(self, *a, **k)
        if stage == "tmp_created" and item(self).isdigit():
            block(report_fd, stage)
        return out

    async def hooked_finalize(self, *a, **k):
        name = item(self)
        if (stage, name) == ("model_written", "model") or (
            stage == "items_finalized" and name.isdigit()
        ):
            block(report_fd, stage)
        out = await finalize(self, *a, **k)
        if (stage, name) == ("model_finalized", "model") or (
            stage == "step_committed" and name.isdigit()
        ):
            block(report_fd, stage)
        return out

    def hooked_delete(self, step, *a, **k):
        if stage == "old_half_deleted":
            files = sorted(
                os.path.join(r, f) for r, _, fs in os.walk(self._directory / str(step)) for f in fs
            )
            for f in files[: len(files) // 2]:
                os.remove(f)
            block(report_fd, stage)
        return delete(self, step, *a, **k)

    tmp_cls.create, tmp_cls.finalize = hooked_create, hooked_finalize
    deleter.StandardCheckpointDeleter.delete = hooked_delete


def in_child(target, *args) -> int:
    """Forks; the child runs target(*args) and exits 0 (1 on error)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            target(*args)
            code = 0
        finally:
            os._exit(code)
    return pid


def write(path: str, seed: int, stage: str | None = None, report_fd: int | None = None) -> None:
    if stage is not None:
        install(stage, report_fd)
    model, opt = state(seed)
    npx.save(path, model, opt, overwrite=True)
    if stage == "save_returned":
        block(report_fd, stage)


def kill_at(root: str, stage: str) -> dict:
    path = os.path.join(root, stage)
    shutil.copytree(os.path.join(root, "old"), path)
    read_fd, write_fd = os.pipe()
    pid = in_child(write, path, 1, stage, write_fd)
    os.close(write_fd)
    ready, _, _ = select.select([read_fd], [], [], REPORT_TIMEOUT_S)
    reported = os.read(read_fd, 100).decode().strip() if ready else ""
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(read_fd)
    return {
        "reported": reported,
        "killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL,
    }


def main(root: str, stages: list[str]) -> None:
    for name, seed in (("old", 0), ("new", 1)):
        pid = in_child(write, os.path.join(root, name), seed)
        assert os.waitpid(pid, 0)[1] == 0, f"writing the {name} checkpoint failed"
    print(json.dumps({stage: kill_at(root, stage) for stage in stages}))


if __name__ == "__main__":
    unknown = set(sys.argv[2:]) - set(STAGES)
    assert not unknown, f"unknown stages {unknown}; known: {STAGES}"
    main(sys.argv[1], sys.argv[2:])
