"""Tests for nnx_parallel.checkpoint.manifest: entries, damage checks, mismatches, verify, cast."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nnx_parallel.checkpoint import manifest as M
from nnx_parallel.checkpoint._checksums import _checksum
from nnx_parallel.errors import CheckpointError, PlanError

TREE = {
    "up": {"kernel": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "bias": jnp.zeros(3)},
    "steps": [jnp.array(1, jnp.int32)],
}


def test_flat_and_manifest_entry():
    assert list(M._flat(TREE)) == ["steps.0", "up.bias", "up.kernel"]
    entry = M._manifest_entry(TREE)
    assert entry["up.kernel"] == {
        "shape": [2, 3],
        "dtype": "float32",
        "checksum": int(_checksum(TREE["up"]["kernel"])),
    }
    assert entry["steps.0"]["shape"] == [] and entry["steps.0"]["dtype"] == "int32"


def test_manifest_problem_names_each_kind_of_damage():
    good = {"metadata": False, "items": {"model": M._manifest_entry(TREE)}}
    assert M._manifest_problem(good) == ""
    assert M._manifest_problem({"items": good["items"]}) == "its 'metadata' flag is missing"
    assert M._manifest_problem({"metadata": True, "items": {"optimizer": {}}}) == (
        "its 'items' ({'optimizer': {}}) do not list the model"
    )
    assert M._manifest_problem({"metadata": True, "items": {"model": [1, 2]}}) == (
        "item 'model' lists [1, 2], not arrays"
    )
    broken = {"metadata": True, "items": {"model": {"up.kernel": {"shape": [2, 3]}}}}
    assert M._manifest_problem(broken) == (
        "the entry of model.up.kernel lacks ['dtype', 'checksum']"
    )
    err = M._damaged_manifest("step 3 of /c", "its 'metadata' flag is missing")
    assert isinstance(err, CheckpointError) and "step 3 of /c has a damaged manifest" in str(err)


def test_mismatches_lines_and_raise():
    saved = M._manifest_entry(TREE)
    target = {
        "up.kernel": jax.ShapeDtypeStruct((2, 4), jnp.float32),
        "up.bias": jax.ShapeDtypeStruct((3,), jnp.bfloat16),
        "extra": jax.ShapeDtypeStruct((1,), jnp.float32),
    }
    lines = M._mismatches("model", target, saved, cast=False)
    assert lines == [
        "model.steps.0: in the checkpoint, not in the model",
        "model.extra: in the model, not in the checkpoint",
        "model.up.bias: dtype float32 in the checkpoint, bfloat16 in the model",
        "model.up.kernel: shape (2, 3) in the checkpoint, (2, 4) in the model",
    ]
    assert "up.bias" not in " ".join(M._mismatches("model", target, saved, cast=True))
    M._raise_mismatches([], "here")  # nothing to report: no error
    with pytest.raises(PlanError, match=r"4 mismatching path\(s\)(.|\n)*pass cast=True"):
        M._raise_mismatches(lines, "at /c")


def test_verify_raises_on_a_changed_value():
    saved = M._manifest_entry(TREE)
    M._verify("model", TREE, saved, "at /c")  # unchanged: passes
    changed = jax.tree.map(lambda x: x, TREE)
    changed["up"]["kernel"] = TREE["up"]["kernel"].at[1, 2].add(1.0)
    with pytest.raises(CheckpointError) as err:
        M._verify("model", changed, saved, "at /c")
    msg = str(err.value)
    assert "The checkpoint at /c is corrupt: the values read for model.up.kernel differ" in msg
    assert "up.bias" not in msg and "steps.0" not in msg


def test_cast_and_saved_dtype_target_and_metadata_checks():
    values = {"a": jnp.ones(2, jnp.float32), "b": jnp.arange(2, dtype=jnp.int32)}
    target = {
        "a": jax.ShapeDtypeStruct((2,), jnp.bfloat16),
        "b": jax.ShapeDtypeStruct((2,), jnp.int32),
    }
    out = M._cast(values, target)
    assert out["a"].dtype == jnp.bfloat16 and out["b"] is values["b"]
    np.testing.assert_array_equal(np.asarray(out["a"], np.float32), [1.0, 1.0])
    saved = M._manifest_entry(values)
    read_as = M._saved_dtype_target(target, saved)
    assert read_as["a"].dtype == jnp.float32 and read_as["b"] is target["b"]
    M._check_metadata(None)
    M._check_metadata({"epoch": 3, "tags": ["a"]})
    with pytest.raises(PlanError, match="metadata must be a dict, got list"):
        M._check_metadata([1])
    with pytest.raises(PlanError, match="metadata must be JSON-serializable"):
        M._check_metadata({"x": object()})
