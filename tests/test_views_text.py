"""Tests for nnx_parallel.views._text: spec text, byte sizes, tables, plurals, mesh text."""

import jax
from jax.sharding import PartitionSpec as P

from nnx_parallel.views import _text


def test_format_spec_and_entry_text():
    assert _text.format_spec(P("data", None)) == "P('data', None)"
    assert _text.format_spec(P(("data", "model"), "fsdp")) == "P(('data', 'model'), 'fsdp')"
    assert _text.format_spec(None) == "P()"
    assert _text.format_spec(()) == "P()"
    assert _text.entry_text(None) == "None"
    assert _text.entry_text("model") == "'model'"
    assert _text.entry_text(("a",)) == "('a')"  # a tuple entry, one axis: no trailing comma


def test_human_switches_units_at_1024():
    assert _text.human(0) == "0 B"
    assert _text.human(1023) == "1023 B"
    assert _text.human(1024) == "1.0 KiB"
    assert _text.human(1536) == "1.5 KiB"
    assert _text.human(3 * 1024**2) == "3.0 MiB"
    assert _text.human(5 * 1024**4) == "5120.0 GiB"  # GiB is the largest unit
    assert _text.human(-2048) == "-2.0 KiB"


def test_table_pads_columns_and_right_aligns():
    lines = _text.table(["name", "n"], [["a", "1"], ["long", "123"]], right={1})
    assert lines == [
        "name    n",
        "----  ---",
        "a       1",
        "long  123",
    ]
    # Left-aligned trailing cells leave no trailing spaces.
    assert _text.table(["x", "note"], [["abc", ""]], right=set()) == [
        "x    note",
        "---  ----",
        "abc",
    ]


def test_plural_and_mesh_text():
    assert _text.plural(1, "param") == "1 param"
    assert _text.plural(0, "param") == "0 params"
    assert _text.plural(3, "module") == "3 modules"
    assert _text.mesh_text(None) == "no mesh (1 device)"
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    assert _text.mesh_text(mesh) == "mesh {'data': 2, 'model': 4} (8 devices)"
