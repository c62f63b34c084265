"""Spec algebra (`_specs`) and dotted paths (`_paths`): the helpers everything shares."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat, _paths, _specs

U = _compat.UNCONSTRAINED


@pytest.mark.parametrize(
    "entry, axes",
    [(None, ()), ("model", ("model",)), (("data", "fsdp"), ("data", "fsdp")), (U, ())],
)
def test_axes_of(entry, axes):
    assert _specs.axes_of(entry) == axes


def test_entry_of_round_trips():
    assert _specs.entry_of(()) is None
    assert _specs.entry_of(["model"]) == "model"
    assert _specs.entry_of(("data", "fsdp")) == ("data", "fsdp")


def test_drop_and_keep_axes_keep_unconstrained_entries():
    spec = P(("data", "fsdp"), "model", None, U)
    assert _specs.drop_axes(spec, {"fsdp", "model"}) == P("data", None, None, U)
    assert _specs.keep_axes(spec, {"fsdp"}) == P("fsdp", None, None, U)
    assert _specs.drop_entry(("data", "fsdp"), {"data", "fsdp"}) is None


def test_sizes_pad_and_shard_shape():
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    assert _specs.size(mesh, ("data", "model")) == 8 and _specs.size(mesh, None) == 1
    assert _specs.pad(P("model"), 3) == ("model", None, None)
    assert _specs.with_dim(None, 2, 1, "model") == P(None, "model")
    assert _specs.replicated(3) == P(None, None, None)
    assert _specs.shard_shape((8, 16), P("data", "model"), mesh) == (4, 4)
    assert _specs.spec_axes(P(("data", "model"), None)) == {"data", "model"}


def test_itemsize_counts_prng_key_data():
    key = jax.random.key(0)
    assert _specs.itemsize(key.dtype) == 8
    assert _specs.itemsize(jnp.bfloat16) == 2 and _specs.nbytes((3, 4), jnp.float32) == 48


def test_paths():
    keypath = [
        jax.tree_util.DictKey("blocks"),
        jax.tree_util.SequenceKey(0),
        jax.tree_util.DictKey("kernel"),
        jax.tree_util.GetAttrKey("value"),
    ]
    assert _paths.keys(keypath) == ("blocks", 0, "kernel")
    assert _paths.leaf_path(keypath) == "blocks.0.kernel"
    assert _paths.ancestors("a.b.c") == ["a.b", "a", ""]
    assert _paths.ancestors("") == []
    assert _paths.generalize("blocks.10.mlp.0") == "blocks.*.mlp.*"
