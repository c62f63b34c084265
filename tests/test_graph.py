"""nnx_parallel.core.graph: the module graph, pattern matching and plan normalization."""

import pytest
from flax import nnx

import nnx_parallel as npx
from nnx_parallel.core.graph import (
    aliases,
    choose,
    match,
    normalize_plan,
    specificity,
    suggest,
    walk,
)
from tests import models


def test_walk_lists_modules_and_owned_params():
    model = models.MLP(rngs=nnx.Rngs(0))
    modules, params = walk(model)
    assert set(modules) == {"", "up", "down"}
    assert set(params) == {"up.kernel", "up.bias", "down.kernel", "down.bias"}
    owner, name, var = params["down.kernel"]
    assert (owner, name) == ("down", "kernel") and var is model.down.kernel


def test_match_is_segment_wise_with_globs():
    assert match("blocks.*.mlp", "blocks.3.mlp")
    assert not match("blocks.*", "blocks.3.mlp")  # `*` never spans a dot
    assert match("", "") and not match("", "up")
    assert match("layer[12]", "layer2")


def test_choose_takes_the_most_specific_pattern_first_on_ties():
    entries = ["*", "up", "u?"]
    matches = {"*": ["up", "down"], "up": ["up"], "u?": ["up"]}
    assert choose(entries, matches) == {"up": "up", "down": "*"}
    assert specificity("up") > specificity("u?") == specificity("*")


def test_normalize_plan_shapes_and_errors():
    fsdp = npx.FSDP()
    assert normalize_plan(None) == {}
    assert normalize_plan(fsdp) == {"": (fsdp,)}
    assert normalize_plan({"up": (fsdp, npx.Remat())}) == {"up": (fsdp, npx.Remat())}
    with pytest.raises(npx.PlanError, match="is not a string"):
        normalize_plan({0: fsdp})
    with pytest.raises(npx.PlanError, match="is a class, not a style"):
        normalize_plan({"up": npx.FSDP})


def test_suggest_names_the_nearest_generalized_path():
    modules = {"": None, "blocks.0.mlp": None, "blocks.1.mlp": None}
    assert "blocks.*.mlp" in suggest("blocks.*.mpl", modules)


def test_aliases_find_a_param_shared_by_two_modules():
    model = models.MLP(din=16, dhidden=16, dout=16, rngs=nnx.Rngs(0))
    model.down.kernel = model.up.kernel  # tied weights
    modules, params = walk(model)
    alias, tied = aliases(model, modules, params)
    assert len(tied) == 1
    (path, (first, owner)), = tied.items()
    assert {path, first} == {"up.kernel", "down.kernel"} and owner == path.split(".")[0]
