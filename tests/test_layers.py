"""The layer table (`core/layers.py`): every kind, both directions."""

from __future__ import annotations

import pytest
from flax import nnx

from nnx_parallel.core import layers

R = nnx.Rngs(0)


@pytest.mark.parametrize(
    "module, kind, column, row",
    [
        (nnx.Linear(4, 8, rngs=R), "dense", (1, 1, 0), (0, None, 0)),
        (nnx.Conv(4, 8, (3, 3), rngs=R), "dense", (3, 1, 0), (2, None, 0)),
        (nnx.Embed(10, 4, rngs=R), "embed", (1, 1, 1), (0, None, 1)),
        (nnx.LinearGeneral(4, (2, 8), rngs=R), "general", (1, 2, 1), (0, None, 1)),
        (nnx.Einsum("bd,dhk->bhk", (4, 2, 8), rngs=R), "einsum", (1, 2, 1), (0, None, 1)),
    ],
    ids=["linear", "conv", "embed", "linear-general", "einsum"],
)
def test_tp_dims_per_kind(module, kind, column, row):
    weight = layers.weight_name({n: v.shape for n, v in nnx.state(module, nnx.Param).items()})
    ndim = getattr(module, weight)[...].ndim
    assert layers.layer_kind(module) == kind
    assert layers.tp_dims(module, ndim, column=True) == column
    assert layers.tp_dims(module, ndim, column=False) == row


def test_einsum_column_prefers_a_letter_the_axis_divides():
    fused = nnx.Einsum("btd,cdnh->cbtnh", (2, 16, 8, 4), rngs=R)  # fused k/v: c=2, heads n=8
    assert layers.tp_dims(fused, 4, True, shape=(2, 16, 8, 4), size=8)[0] == 2
    assert layers.tp_dims(fused, 4, True, shape=(2, 16, 8, 4), size=1)[0] == 0


def test_row_input_dim_per_kind():
    assert layers.row_input_dim(nnx.Linear(4, 8, rngs=R), 2, 0) == 1
    assert layers.row_input_dim(nnx.Linear(4, 8, rngs=R), 2, 1) is None
    assert layers.row_input_dim(nnx.Embed(10, 4, rngs=R), 2, 0) is None
    assert layers.row_input_dim(nnx.Einsum("btd,dk->btk", (4, 8), rngs=R), 2, 0) == 1


def test_weight_name_and_sizes():
    assert layers.weight_name({"kernel": (4, 8), "bias": (8,)}) == "kernel"
    assert layers.weight_name({"a": (4, 8), "b": (8,)}) == "a"
    assert layers.weight_name({"a": (4, 8), "b": (8, 2)}) is None
    assert layers.in_out_sizes(nnx.Linear(4, 8, rngs=R), (4, 8)) == (4, 8)
    assert layers.vocab_lookup(nnx.Embed(10, 4, rngs=R), 0)


def test_runtime_facts():
    assert layers.local_safe(nnx.Linear(4, 8, rngs=R)) and not layers.local_safe(
        nnx.Embed(10, 4, rngs=R)
    )
    assert layers.known_output_rank(nnx.Embed(10, 4, rngs=R))
    assert not layers.known_output_rank(nnx.LayerNorm(4, rngs=R))
    bn = nnx.BatchNorm(4, rngs=R)
    assert layers.needs_whole_features(bn, explicit=True)
    assert not layers.needs_whole_features(bn, explicit=False)
    gn = nnx.GroupNorm(8, num_groups=4, rngs=R)  # jnp.repeat of group stats: Explicit refuses
    assert layers.needs_whole_features(gn, explicit=True)
    assert not layers.needs_whole_features(gn, explicit=False)
    assert layers.unstacked_shape(gn, "scale") == (8,)
