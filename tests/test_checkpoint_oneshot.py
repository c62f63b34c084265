"""Tests for nnx_parallel.checkpoint.oneshot: save and restore of one checkpoint at a path."""

import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import nnx_parallel as npx
from nnx_parallel.checkpoint import CheckpointError, restore, save
from tests import models

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:orbax")

TP = jax.make_mesh((8,), ("model",))
FSDP = jax.make_mesh((8,), ("fsdp",))
TP_PLAN = {"up": npx.ColumnParallel("model"), "down": npx.RowParallel("model")}


def tp_mlp(seed=0):
    return npx.parallelize(models.MLP(rngs=nnx.Rngs(seed)), TP, TP_PLAN)


def test_round_trip_onto_another_plan(tmp_path):
    mlp = tp_mlp()
    opt = nnx.Optimizer(mlp, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    save(tmp_path / "c", mlp, opt)
    assert os.listdir(tmp_path / "c") == ["0"]  # one step, numbered 0
    sgd = lambda m: nnx.Optimizer(m, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)  # noqa: E731
    back, opt2 = restore(
        tmp_path / "c", lambda: models.MLP(rngs=nnx.Rngs(1)), FSDP, npx.FSDP(min_size=16), sgd
    )
    assert back.up.kernel[...].sharding.spec == P(None, "fsdp")
    assert back.down.kernel[...].sharding.spec == P("fsdp", None)
    for name in ("up", "down"):
        for leaf in ("kernel", "bias"):
            got = getattr(getattr(back, name), leaf)[...]
            want = getattr(getattr(mlp, name), leaf)[...]
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    trace = opt2.opt_state[0].trace["up"]["kernel"][...]
    assert trace.sharding.spec == P(None, "fsdp") and trace.shape == (16, 64)


def test_save_twice_refuses_then_overwrite_replaces(tmp_path):
    path = tmp_path / "c"
    save(path, tp_mlp(0))
    with pytest.raises(
        CheckpointError, match=r"already holds a checkpoint \(step 0\).*overwrite=True"
    ):
        save(path, tp_mlp(1))
    newer = tp_mlp(1)
    save(path, newer, overwrite=True)
    assert os.listdir(path) == ["1"]  # the old step is gone once the new one is whole
    back = restore(path, lambda: models.MLP(rngs=nnx.Rngs(0)), TP, TP_PLAN)
    np.testing.assert_array_equal(np.asarray(back.up.kernel[...]), np.asarray(newer.up.kernel[...]))
    assert not np.array_equal(np.asarray(back.up.kernel[...]), np.asarray(tp_mlp(0).up.kernel[...]))


def test_bad_inputs_raise_before_writing(tmp_path):
    with pytest.raises(npx.PlanError, match="save expects the model to be an nnx.Module, got dict"):
        save(tmp_path / "c", {"w": 1})
    assert not (tmp_path / "c").exists()
    with pytest.raises(CheckpointError, match="must name a directory"):
        save("", tp_mlp())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="not an nnx_parallel checkpoint directory"):
        save(tmp_path / "mine", tp_mlp())
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_restore_without_optimizer_state_or_checkpoint_raises(tmp_path):
    save(tmp_path / "c", tp_mlp())
    adam = lambda m: nnx.Optimizer(m, optax.adam(1e-2), wrt=nnx.Param)  # noqa: E731
    factory = lambda: models.MLP(rngs=nnx.Rngs(0))  # noqa: E731
    with pytest.raises(CheckpointError, match="Step 0 in .* has no optimizer state"):
        restore(tmp_path / "c", factory, TP, TP_PLAN, optimizer=adam)
    with pytest.raises(
        CheckpointError, match="No checkpoint at .*none: the directory does not exist"
    ):
        restore(tmp_path / "none", factory, TP, TP_PLAN)
