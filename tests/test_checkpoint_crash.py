"""SIGKILL at any stage of an overwriting `npx.save` leaves the old or the new checkpoint, whole.

tests/ckpt_kill_child.py writes an old and a new checkpoint, then, once per
stage, saves the new state over a copy of the old one in a forked child and
SIGKILLs it when a hook reports that the save reached the stage. Here every
killed directory is restored and must equal exactly the old checkpoint
(model AND optimizer) or exactly the new one: never an error, never a mix.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import nnx_parallel as npx
from tests import models

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:orbax")

CHILD = Path(__file__).with_name("ckpt_kill_child.py")
# Stage of the overwriting save -> which checkpoint a restore must return.
EXPECTED = {
    "tmp_created": "old",
    "model_written": "old",
    "model_finalized": "old",
    "items_finalized": "old",
    "step_committed": "new",
    "old_half_deleted": "new",
    "save_returned": "new",
}


def child_env() -> dict:
    flags = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))


def host(model, opt) -> dict:
    trees = {"model": nnx.state(model), "optimizer": nnx.state(opt)}
    return jax.tree.map(np.asarray, {k: nnx.to_pure_dict(v) for k, v in trees.items()})


def same(a: dict, b: dict) -> bool:
    la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    return [p for p, _ in la] == [p for p, _ in lb] and all(
        x.dtype == y.dtype and np.array_equal(x, y) for (_, x), (_, y) in zip(la, lb)
    )


def test_sigkill_during_overwrite_leaves_old_or_new(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(CHILD), str(tmp_path), *EXPECTED],
        capture_output=True,
        text=True,
        timeout=400,
        env=child_env(),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    mesh = jax.make_mesh((8,), ("fsdp",))
    plan = npx.FSDP(min_size=16)
    factory = lambda: models.MLP(rngs=nnx.Rngs(5))  # noqa: E731
    adam = lambda m: nnx.Optimizer(m, optax.adam(1e-2), wrt=nnx.Param)  # noqa: E731
    read = lambda name: npx.restore(tmp_path / name, factory, mesh, plan, optimizer=adam)  # noqa: E731
    refs = {name: host(*read(name)) for name in ("old", "new")}
    assert not same(refs["old"], refs["new"])
    for stage, want in EXPECTED.items():
        assert report[stage] == {"reported": stage, "killed": True}, (stage, report[stage])
        got = host(*read(stage))
        matches = [name for name, ref in refs.items() if same(got, ref)]
        assert matches == [want], (stage, matches)

    # Saving over the debris of a killed save completes and clears it.
    model, opt = read("new")
    debris = {
        "model_written": (["0", "1.orbax-checkpoint-tmp"], "1"),
        "old_half_deleted": (["0", "1"], "2"),
    }
    for stage, (before, after) in debris.items():
        assert sorted(os.listdir(tmp_path / stage)) == before
        npx.save(tmp_path / stage, model, opt, overwrite=True)
        assert os.listdir(tmp_path / stage) == [after]
        assert same(host(*read(stage)), refs["new"])
