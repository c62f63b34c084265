"""Tests for nnx_parallel.checkpoint.directory: paths, foreign entries, ownership and steps."""

import os

import numpy as np
import pytest

from nnx_parallel.checkpoint.directory import (
    _check_ours,
    _check_step,
    _directory,
    _foreign_entries,
)
from nnx_parallel.checkpoint.manifest import _TMP_MARK, MANIFEST_ITEM
from nnx_parallel.errors import CheckpointError, PlanError


def test_directory_is_absolute_and_refuses_empty_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _directory("ckpt/run1") == os.path.join(str(tmp_path), "ckpt", "run1")
    assert _directory(tmp_path / "x") == str(tmp_path / "x")
    for empty in ("", "   "):
        with pytest.raises(CheckpointError, match=f"must name a directory, got {empty!r}"):
            _directory(empty)


def test_foreign_entries_keeps_only_our_steps_and_tmp_dirs(tmp_path):
    (tmp_path / "3" / MANIFEST_ITEM).mkdir(parents=True)  # a step of ours
    (tmp_path / "7").mkdir()  # a step half deleted by a crash: ours too
    (tmp_path / f"8{_TMP_MARK}").mkdir()  # an unfinished step
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "12").write_text("a file named like a step")
    assert _foreign_entries(str(tmp_path)) == ["12", "notes.txt"]
    # Without any manifest, digit directories are not ours either.
    other = tmp_path / "other"
    (other / "0" / "model").mkdir(parents=True)
    assert _foreign_entries(str(other)) == ["0"]


def test_check_ours(tmp_path):
    _check_ours(str(tmp_path / "missing"))  # nothing there yet: fine
    _check_ours(str(tmp_path))  # empty: fine
    (tmp_path / "0" / MANIFEST_ITEM).mkdir(parents=True)
    _check_ours(str(tmp_path))  # our steps only: fine
    a_file = tmp_path / "file.bin"
    a_file.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"file\.bin is a file, not a directory"):
        _check_ours(str(a_file))
    for name in ("a", "b", "c", "d", "e"):
        (tmp_path / name).mkdir()
    with pytest.raises(CheckpointError) as err:
        _check_ours(str(tmp_path))
    msg = str(err.value)
    assert "is not an nnx_parallel checkpoint directory: it holds a, b, c, d, e, ..." in msg
    assert "file.bin" not in msg  # only the first five are named
    assert "Pick a new or empty directory" in msg


def test_check_step_accepts_non_negative_ints_only():
    assert _check_step(0) == 0
    assert _check_step(np.int64(5)) == 5 and type(_check_step(np.int32(2))) is int
    for bad in (-1, True, 1.0, "3", None):
        with pytest.raises(PlanError, match="step must be an int >= 0, got " + repr(bad)):
            _check_step(bad)
