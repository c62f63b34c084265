"""nnx_parallel.plans._names: the layer-name tables of the tensor-parallel auto-plan."""

from nnx_parallel.plans._names import (
    COLUMN_NAMES,
    FUSED_QKV_NAMES,
    HEAD_NAMES,
    POSITION_NAMES,
    ROW_NAMES,
)


def test_the_tables_hold_the_names_public_code_uses():
    assert {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "wq"} <= COLUMN_NAMES
    assert {"o_proj", "down_proj", "wo"} <= ROW_NAMES
    assert {"lm_head", "head", "unembed"} <= HEAD_NAMES
    assert "wpe" in POSITION_NAMES and FUSED_QKV_NAMES


def test_no_name_is_both_column_and_row():
    assert not COLUMN_NAMES & ROW_NAMES
    assert all(name == name.lower() for name in COLUMN_NAMES | ROW_NAMES | HEAD_NAMES)
