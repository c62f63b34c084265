"""nnx_parallel.core.checks: construction-time rules for style fields."""

import dataclasses

import pytest

import nnx_parallel as npx
from nnx_parallel.core.checks import RULES, validate


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: npx.FSDP(min_size=-1), r"FSDP\(min_size=-1\): expected an int >= 0"),
        (lambda: npx.FSDP(min_size=True), "expected an int"),
        (lambda: npx.FSDP(axis=""), "mesh axis"),
        (lambda: npx.FSDP(batch_axes="data"), "expected a tuple of strings"),
        (lambda: npx.FSDP(units="blocks"), "expected one of"),
        (lambda: npx.ColumnParallel(shard_bias=1), "shard_bias"),
        (lambda: npx.ColumnParallel(input_spec=3), "per-dim entries"),
        (lambda: npx.SequenceParallel(seq_dim=1), "counted from the end"),
    ],
)
def test_a_bad_field_fails_where_it_is_written(make, match):
    with pytest.raises(npx.PlanError, match=match):
        make()


def test_rules_normalize_lists_to_tuples():
    style = npx.FSDP(axis=["fsdp", "data"], batch_axes=["data"], methods=["__call__"])
    assert style.axis == ("fsdp", "data") and style.batch_axes == ("data",)
    assert style.methods == ("__call__",)
    hash(style)  # still hashable: a frozen style is a dict key in plans


def test_a_field_without_a_rule_is_not_checked():
    @dataclasses.dataclass(frozen=True)
    class Mine:
        axis: str = "model"
        colour: object = None

        def __post_init__(self):
            validate(self)

    assert "colour" not in RULES
    assert Mine(colour=[1, 2]).colour == [1, 2]
    with pytest.raises(npx.PlanError, match=r"Mine\(axis=3\)"):
        Mine(axis=3)
