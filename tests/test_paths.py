"""nnx_parallel._paths: dotted paths, their ancestors, and plan patterns made from them."""

import jax
import jax.numpy as jnp

from nnx_parallel._paths import ancestors, generalize, join, keys, leaf_path, within


def test_join_and_leaf_path_of_a_tree_key_path():
    assert join(("blocks", 0, "kernel")) == "blocks.0.kernel"
    tree = {"blocks": [{"kernel": jnp.zeros(2)}]}
    (path, _), = jax.tree_util.tree_leaves_with_path(tree)
    assert keys(path) == ("blocks", 0, "kernel")
    assert leaf_path(path) == "blocks.0.kernel"


def test_ancestors_nearest_first_ending_at_the_root():
    assert ancestors("blocks.0.mlp") == ["blocks.0", "blocks", ""]
    assert ancestors("up") == [""]
    assert ancestors("") == []


def test_within_is_segment_wise():
    assert within("blocks.0.mlp", "blocks.0") and within("blocks.0", "blocks.0")
    assert not within("blocks.01", "blocks.0")
    assert within("anything", "")


def test_generalize_replaces_integer_segments_only():
    assert generalize("blocks.12.mlp.up") == "blocks.*.mlp.up"
    assert generalize("layer2.up") == "layer2.up"
