"""npx.CheckpointManager: numbered steps, keep N, resume, async save, one composite step."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nnx_parallel as npx
from nnx_parallel.checkpoint import CheckpointError
from tests import models
from tests.helpers import adam
from tests.helpers import assert_trees_equal as assert_same
from tests.helpers import host_state as host

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:orbax")

MESH = jax.make_mesh((8,), ("fsdp",))
PLAN = npx.FSDP(min_size=16)


def factory():
    return models.MLP(rngs=nnx.Rngs(9))


@nnx.jit(donate_argnums=(0, 1))
def train_step(model, opt):
    grads = nnx.grad(lambda m: (m(jnp.ones((8, 16))) ** 2).mean())(model)
    opt.update(model, grads)


def test_keep_last_n_resume_and_pick_a_step(tmp_path):
    model = npx.parallelize(factory, MESH, PLAN)
    opt = adam(model)
    saved = {}
    with npx.CheckpointManager(tmp_path, keep=2) as ckpt:
        for step in range(4):
            train_step(model, opt)
            ckpt.save(step, model, opt, metadata={"step": step, "data": [step, "x"]})
            saved[step] = (host(model), host(opt))
        assert ckpt.all_steps() == [2, 3]
    # A new manager on the same directory resumes from the latest step.
    with npx.CheckpointManager(tmp_path, keep=2) as ckpt:
        assert ckpt.latest_step() == 3
        r = ckpt.restore(factory, MESH, PLAN, optimizer=adam)
        assert (r.step, r.metadata) == (3, {"step": 3, "data": [3, "x"]})
        assert_same(host(r.model), saved[3][0])
        assert_same(host(r.optimizer), saved[3][1])
        older = ckpt.restore(factory, MESH, PLAN, step=2, optimizer=adam)
        assert older.step == 2 and older.metadata["step"] == 2
        assert_same(host(older.model), saved[2][0])
        assert_same(host(older.optimizer), saved[2][1])
        with pytest.raises(CheckpointError, match=r"No step 0 in .*; its steps: \[2, 3\]"):
            ckpt.restore(factory, MESH, PLAN, step=0)
        with pytest.raises(CheckpointError, match="Step 3 is not newer than step 3"):
            ckpt.save(3, model)
        # Training resumes identically from the restored step.
        train_step(model, opt)
        train_step(r.model, r.optimizer)
        assert_same(host(r.model), host(model))


def test_async_save_writes_the_values_at_save_time(tmp_path):
    model = npx.parallelize(factory, MESH, PLAN)
    opt = adam(model)
    before = (host(model), host(opt))
    given = model.up.kernel[...]
    with npx.CheckpointManager(tmp_path, async_save=True) as ckpt:
        ckpt.save(0, model, opt)
        for _ in range(3):  # donates (frees) the buffers the save was given
            train_step(model, opt)
        assert given.is_deleted()
        ckpt.wait()
        r = ckpt.restore(factory, MESH, PLAN, optimizer=adam)
    assert_same(host(r.model), before[0])
    assert_same(host(r.optimizer), before[1])
    assert not np.array_equal(host(model)["up"]["kernel"], before[0]["up"]["kernel"])


def test_one_step_is_restored_whole_or_not_at_all(tmp_path):
    model = npx.parallelize(factory, MESH, PLAN)
    opt = adam(model)
    with npx.CheckpointManager(tmp_path, keep=None, async_save=False) as ckpt:
        ckpt.save(0, model, opt)
        train_step(model, opt)
        ckpt.save(1, model)  # no optimizer in this step
        with pytest.raises(CheckpointError, match="Step 1 in .* has no optimizer state"):
            ckpt.restore(factory, MESH, PLAN, optimizer=adam)
        assert ckpt.restore(factory, MESH, PLAN).optimizer is None  # the model alone is fine
        shutil.rmtree(tmp_path / "0" / "optimizer")  # an item lost after the save
        with pytest.raises(
            CheckpointError,
            match=r"step 0 .* is incomplete: items \['optimizer'\]"
            " are missing",
        ):
            ckpt.restore(factory, MESH, PLAN, step=0, optimizer=adam)
        (tmp_path / "1" / "nnx_parallel" / "metadata").write_text(json.dumps({"format": 99}))
        with pytest.raises(CheckpointError, match="step 1 .* has an unknown format"):
            ckpt.restore(factory, MESH, PLAN, step=1)


def test_bad_arguments(tmp_path):
    model = models.MLP(rngs=nnx.Rngs(0))
    with pytest.raises(npx.PlanError, match="keep must be a positive int .*got 0"):
        npx.CheckpointManager(tmp_path, keep=0)
    with npx.CheckpointManager(tmp_path, async_save=False) as ckpt:
        with pytest.raises(npx.PlanError, match="step must be an int >= 0, got -1"):
            ckpt.save(-1, model)
        with pytest.raises(npx.PlanError, match="metadata must be a dict, got list"):
            ckpt.save(0, model, metadata=[1])
        with pytest.raises(npx.PlanError, match="JSON-serializable .*Convert arrays with"):
            ckpt.save(0, model, metadata={"loss": jnp.ones(())})
        with pytest.raises(CheckpointError, match="no completed step"):
            ckpt.restore(factory, MESH, PLAN)
        ckpt.save(0, model)
        with pytest.raises(npx.PlanError, match="callable model -> nnx.Optimizer, got int"):
            ckpt.restore(factory, MESH, PLAN, optimizer=3)
        with pytest.raises(npx.PlanError, match="must return an nnx.Optimizer, got tuple"):
            ckpt.restore(factory, MESH, PLAN, optimizer=lambda m: (m,))
    plain = tmp_path / "plain"  # an orbax step that nnx_parallel did not write
    (plain / "0" / "default").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="step 0 in .*plain was not written by nnx_parallel"):
        npx.restore(plain, factory, MESH, PLAN)
    with pytest.raises(CheckpointError, match="plain is not an nnx_parallel checkpoint directory"):
        npx.CheckpointManager(plain)
