"""Checkpoint faults (issue 24 f, g): no orbax thread outlives a failed save, and a
second manager on a directory neither deletes a save in flight nor saves a step twice.

Namesake tests of checkpoint/_faults.py.
"""

import threading

import numpy as np
import pytest
from flax import nnx
from orbax.checkpoint._src.futures import future as orbax_future
from orbax.checkpoint._src.path import async_path

import nnx_parallel as npx
from nnx_parallel import CheckpointError
from tests.models import MLP


def _orbax_threads():
    return [
        t
        for t in threading.enumerate()
        if isinstance(t, orbax_future._SignalingThread) and t.is_alive() and not t.daemon
    ]


def test_failed_async_save_leaves_no_orbax_thread(tmp_path, monkeypatch):
    # Before: five non-daemon orbax threads waited 300 s for a directory that was never
    # made, and the interpreter waited for them at exit (about 305 s).
    async def cannot_mkdir(*args, **kwargs):
        raise PermissionError(f"injected: {args[0]} is read-only")

    model = MLP(rngs=nnx.Rngs(0))
    ckpt = npx.CheckpointManager(tmp_path / "ckpt", keep=1, async_save=True)
    before = _orbax_threads()
    monkeypatch.setattr(async_path, "mkdir", cannot_mkdir)
    with pytest.raises(PermissionError, match="injected"):
        ckpt.save(0, model)
        ckpt.wait()  # the error surfaces here when the save itself returned
    assert [t.name for t in _orbax_threads() if t not in before] == []
    monkeypatch.undo()
    ckpt.close()


def test_second_manager_waits_for_the_save_in_flight(tmp_path, monkeypatch):
    # Before: opening the second manager deleted the first one's temporary step
    # directory, and no step was written.
    gate = threading.Event()
    rename = async_path.rename

    async def slow_rename(*args, **kwargs):
        gate.wait(10)  # the finalize of step 0 waits until the second manager is open
        return await rename(*args, **kwargs)

    monkeypatch.setattr(async_path, "rename", slow_rename)
    model = MLP(rngs=nnx.Rngs(0))
    first = npx.CheckpointManager(tmp_path / "ckpt", keep=2, async_save=True)
    first.save(0, model)
    timer = threading.Timer(1.0, gate.set)  # the old code deleted step 0 within that second
    timer.start()
    second = npx.CheckpointManager(tmp_path / "ckpt", keep=2, async_save=False)
    timer.join()
    assert second.all_steps() == [0]
    with pytest.raises(CheckpointError, match=r"Step 0 is not newer than step 0"):
        second.save(0, model)  # the same step from two managers: our error, not orbax's
    first.save(1, model)
    with pytest.raises(CheckpointError, match=r"Step 1 is not newer than step 1"):
        second.save(1, model)  # while the first one's step 1 is in flight
    first.close()
    second.close()
    back = npx.restore(tmp_path / "ckpt", lambda: MLP(rngs=nnx.Rngs(1)), _mesh(), {})
    np.testing.assert_array_equal(back.up.kernel[...], model.up.kernel[...])


def _mesh():
    import jax

    return jax.make_mesh((8,), ("model",))
