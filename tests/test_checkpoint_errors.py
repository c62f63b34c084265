"""Checkpoint bad input and damage: every case raises our error, naming the path and the fix."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import nnx_parallel as npx
from nnx_parallel.checkpoint import CheckpointError
from tests import models
from tests.helpers import adam

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:orbax")

MESH = jax.make_mesh((8,), ("fsdp",))
PLAN = npx.FSDP(min_size=16)


class Net(nnx.Module):
    """Linear layers of a chosen width and dtype, plus an array of random bits."""

    def __init__(self, hidden=32, dtype=jnp.float32, *, rngs):
        self.up = nnx.Linear(16, hidden, param_dtype=dtype, rngs=rngs)
        self.down = nnx.Linear(hidden, 16, param_dtype=dtype, rngs=rngs)
        # Random bits do not compress, so their bytes appear verbatim in the files.
        self.noise = nnx.Param(jax.random.bits(rngs.params(), (32, 64), jnp.uint32))


def sgd(m):
    return nnx.Optimizer(m, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)


def test_flipped_byte_raises_naming_the_array(tmp_path):
    model = Net(rngs=nnx.Rngs(0))
    npx.save(tmp_path / "c", model)
    needle = np.asarray(model.noise[...]).tobytes()[1024:1088]
    files = [f for f in (tmp_path / "c").rglob("*") if f.is_file() and needle in f.read_bytes()]
    assert files  # found where the array's bytes lie
    for f in files:
        data = bytearray(f.read_bytes())
        data[data.find(needle) + 5] ^= 0x10  # one bit of one element
        f.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError,
        match=r"corrupt: the values read for model\.noise differ"
        r" from those saved \(checksum mismatch\)",
    ) as err:
        npx.restore(tmp_path / "c", lambda: Net(rngs=nnx.Rngs(1)), MESH, PLAN)
    assert "up.kernel" not in str(err.value)


def test_unreadable_files_raise_checkpoint_error(tmp_path):
    npx.save(tmp_path / "c", Net(rngs=nnx.Rngs(0)))
    for f in (tmp_path / "c/0/model").rglob("d/*"):
        f.unlink()  # the array data
    with pytest.raises(CheckpointError, match="could not be read .* from orbax"):
        npx.restore(tmp_path / "c", lambda: Net(rngs=nnx.Rngs(1)), MESH, PLAN)


def test_shape_mismatch_lists_every_path(tmp_path):
    npx.save(tmp_path / "c", Net(hidden=32, rngs=nnx.Rngs(0)), adam(Net(rngs=nnx.Rngs(0))))
    with pytest.raises(npx.PlanError) as err:
        npx.restore(tmp_path / "c", lambda: Net(hidden=64, rngs=nnx.Rngs(0)), MESH, PLAN)
    msg = str(err.value)
    assert "3 mismatching path(s)" in msg
    for line in [
        "model.up.kernel: shape (16, 32) in the checkpoint, (16, 64) in the model",
        "model.up.bias: shape (32,) in the checkpoint, (64,) in the model",
        "model.down.kernel: shape (32, 16) in the checkpoint, (64, 16) in the model",
        "with the configuration it was saved with",
    ]:
        assert line in msg
    assert "down.bias" not in msg and "noise" not in msg  # same shapes: not listed
    assert "cast=True" not in msg and "strict=False" not in msg and "partial_restore" not in msg
    # A different optimizer: every leaf that differs is listed (sgd's trace vs adam's mu/nu).
    with pytest.raises(
        npx.PlanError,
        match=r"optimizer\.opt_state\.0\.mu\.up\.kernel: in the "
        r"checkpoint, not in the model(.|\n)*optimizer\.opt_state\.0\.trace\.up\."
        r"kernel: in the model, not in the checkpoint",
    ):
        npx.restore(tmp_path / "c", lambda: Net(rngs=nnx.Rngs(0)), MESH, PLAN, optimizer=sgd)


def test_dtype_mismatch_raises_and_cast_converts(tmp_path):
    saved = Net(rngs=nnx.Rngs(0))
    npx.save(tmp_path / "c", saved)
    bf16 = lambda: Net(dtype=jnp.bfloat16, rngs=nnx.Rngs(1))  # noqa: E731
    with pytest.raises(
        npx.PlanError,
        match=r"4 mismatching(.|\n)*model\.down\.bias: dtype "
        r"float32 in the checkpoint, bfloat16 in the model(.|\n)*cast=True",
    ):
        npx.restore(tmp_path / "c", bf16, MESH, PLAN)
    back = npx.restore(tmp_path / "c", bf16, MESH, PLAN, cast=True)
    kernel = back.up.kernel[...]
    assert kernel.dtype == jnp.bfloat16 and kernel.sharding.spec == P(None, "fsdp")
    np.testing.assert_array_equal(
        np.asarray(kernel), np.asarray(saved.up.kernel[...].astype(jnp.bfloat16))
    )
    assert back.noise[...].dtype == jnp.uint32  # same dtype: read as is


def test_paths_that_are_not_checkpoints_are_refused(tmp_path):
    model = Net(rngs=nnx.Rngs(0))
    with pytest.raises(CheckpointError, match="must name a directory, got ''"):
        npx.save("", model)
    with pytest.raises(CheckpointError, match="must name a directory"):
        npx.restore("", lambda: Net(rngs=nnx.Rngs(0)), MESH, PLAN)
    mine = tmp_path / "mine"
    (mine / "model").mkdir(parents=True)  # the user's own folder, where the old layout wrote
    (mine / "model" / "notes.txt").write_text("keep me")
    with pytest.raises(
        CheckpointError,
        match=r"mine is not an nnx_parallel checkpoint "
        r"directory: it holds model, which nnx_parallel did not write",
    ):
        npx.save(mine, model, overwrite=True)
    assert (mine / "model" / "notes.txt").read_text() == "keep me"
    with pytest.raises(CheckpointError, match="no completed step. It holds a 'model' folder"):
        npx.restore(mine, lambda: Net(rngs=nnx.Rngs(0)), MESH, PLAN)
    with pytest.raises(CheckpointError, match="is a file"):
        npx.save(mine / "model" / "notes.txt", model)
    with pytest.raises(
        CheckpointError, match="No checkpoint at .*nowhere: the directory does not exist"
    ):
        npx.restore(tmp_path / "nowhere", lambda: Net(rngs=nnx.Rngs(0)), MESH, PLAN)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: it holds no completed step"):
        npx.restore(tmp_path / "empty", lambda: Net(rngs=nnx.Rngs(0)), MESH, PLAN)
    assert not (tmp_path / "nowhere").exists()


def test_save_rejects_what_is_not_a_module(tmp_path):
    model = Net(rngs=nnx.Rngs(0))
    with pytest.raises(npx.PlanError, match="model to be an nnx.Module, got dict"):
        npx.save(tmp_path / "a", {"w": jnp.ones(3)})
    with pytest.raises(npx.PlanError, match="optimizer to be an nnx.Optimizer .*got int"):
        npx.save(tmp_path / "a", model, 3)
    with pytest.raises(npx.PlanError, match=r"the model \(Module\) holds no arrays"):
        npx.save(tmp_path / "a", nnx.Module())
    assert not (tmp_path / "a").exists() or not os.listdir(tmp_path / "a")
    with pytest.raises(npx.PlanError, match="model or a zero-argument factory, got int"):
        npx.restore(tmp_path, 3, MESH, PLAN)


def test_overwrite_without_optimizer_leaves_no_stale_optimizer(tmp_path):
    model = models.MLP(rngs=nnx.Rngs(0))
    npx.save(tmp_path / "c", model, adam(model))
    npx.save(tmp_path / "c", models.MLP(rngs=nnx.Rngs(1)), overwrite=True)
    with pytest.raises(CheckpointError, match="has no optimizer state: it was saved without one"):
        npx.restore(
            tmp_path / "c", lambda: models.MLP(rngs=nnx.Rngs(0)), MESH, PLAN, optimizer=adam
        )
    back = npx.restore(tmp_path / "c", lambda: models.MLP(rngs=nnx.Rngs(0)), MESH, PLAN)
    np.testing.assert_array_equal(
        np.asarray(back.up.kernel[...]), np.asarray(models.MLP(rngs=nnx.Rngs(1)).up.kernel[...])
    )


def test_checksum_is_layout_invariant_and_host_equals_device():
    from nnx_parallel.checkpoint._checksums import (
        _checksum_jit,
        _checksums,
        _host_partial,
        _host_readable,
    )

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    base = jax.random.normal(jax.random.key(0), (8, 12))
    for dtype in (jnp.float32, jnp.bfloat16, jnp.int8, jnp.uint16):
        x = base.astype(dtype)
        layouts = [x, np.asarray(x)] + [
            jax.device_put(x, jax.NamedSharding(mesh, s))
            for s in (P("data", "model"), P(None, "data"), P())
        ]
        assert all(_host_readable(y) for y in layouts)
        host = {_checksums({"x": y})["x"] for y in layouts}
        device = int(_checksum_jit(layouts[2]))  # one compile per dtype
        assert host == {device}, (dtype, host, device)
        flipped = np.asarray(x).copy()
        flipped.view(np.uint8)[5] ^= 1  # one bit
        assert _checksums({"x": flipped})["x"] != host.pop()
    big = jax.device_put(
        jnp.arange(2**20, dtype=jnp.float32).reshape(1024, 1024),
        jax.NamedSharding(mesh, P("model")),
    )  # 4 MiB: hashed on the devices
    assert not _host_readable(big)
    assert _checksums({"b": big})["b"] == _host_partial(big)
    scalar, key = jnp.float32(3.0), jax.random.key(1)
    assert _checksums({"s": scalar})["s"] == int(_checksum_jit(scalar))
    assert not _host_readable(key) and _checksums({"k": key})["k"] == int(_checksum_jit(key))
