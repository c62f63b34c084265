"""nnx_parallel.plans._classify: how the tensor-parallel auto-plan names each projection."""

from flax import nnx

import nnx_parallel as npx
from nnx_parallel.core.graph import walk
from nnx_parallel.plans._classify import (
    _check_pairs,
    _classify,
    _generalize,
    _named,
    _split_embeddings,
)


class Block(nnx.Module):
    def __init__(self, rngs):
        self.q_proj = nnx.Linear(8, 8, rngs=rngs)
        self.o_proj = nnx.Linear(8, 8, rngs=rngs)
        self.mlp = Pair(rngs)
        self.extra = Odd(rngs)


class Pair(nnx.Module):
    def __init__(self, rngs):
        self.fc_a = nnx.Linear(8, 32, rngs=rngs)  # names the planner does not know:
        self.fc_b = nnx.Linear(32, 8, rngs=rngs)  # paired by shape, d -> f -> d


class Odd(nnx.Module):
    def __init__(self, rngs):
        self.odd = nnx.Linear(8, 8, rngs=rngs)  # square and alone: no role


def _weighted(model):
    modules, params = walk(model)
    out = {}
    for _, (owner, name, var) in params.items():
        out.setdefault(owner, {})[name] = var.shape
    return modules, out


def test_names_then_shapes_then_unclassified():
    modules, weighted = _weighted(nnx.eval_shape(lambda: Block(nnx.Rngs(0))))
    unclassified = {}
    roles = _classify(weighted, modules, None, unclassified)
    assert roles["q_proj"][0] == "column" and roles["o_proj"][0] == "row"
    assert roles["mlp.fc_a"] == ("column", "MLP d -> f by shape")
    assert roles["mlp.fc_b"] == ("row", "MLP f -> d by shape")
    assert set(unclassified) == {"extra.odd"} and "add a plan entry" in unclassified["extra.odd"]


def test_a_vocab_sized_output_is_the_head():
    class LM(nnx.Module):
        def __init__(self, rngs):
            self.mix = nnx.Linear(8, 100, rngs=rngs)

    modules, weighted = _weighted(nnx.eval_shape(lambda: LM(nnx.Rngs(0))))
    assert _classify(weighted, modules, 100, {})["mix"] == ("head", "output size 100 = vocab")


def test_named_reads_the_last_segment_case_blind():
    assert _named("blocks.0.attn.Q_PROJ", "column") and _named("blocks.0.mlp.down_proj", "row")
    assert not _named("blocks.0.mlp.down_proj", "column")


def test_split_embeddings_picks_the_largest_non_position_table():
    embeds = {
        "wte": {"embedding": (512, 32)},
        "wpe": {"embedding": (128, 32)},
        "type_emb": {"embedding": (2, 32)},
    }
    assert _split_embeddings(embeds) == ("wte", ["wpe", "type_emb"])
    assert _split_embeddings({"wpe": {"embedding": (8, 4)}}) == (None, ["wpe"])


def test_generalize_merges_layers_that_agree_and_keeps_those_that_do_not():
    col, row = npx.ColumnParallel(), npx.RowParallel()
    plan = _generalize({"b.0.up": col, "b.1.up": col, "b.0.x": col, "b.1.x": row})
    assert plan == {"b.*.up": col, "b.0.x": col, "b.1.x": row}


def test_unpaired_columns_get_a_note():
    notes = []
    _check_pairs({"attn.q": npx.ColumnParallel(), "attn.k": npx.ColumnParallel()}, notes)
    assert len(notes) == 1 and notes[0].startswith("attn: column-parallel layers without")
    notes.clear()
    _check_pairs({"mlp.up": npx.ColumnParallel(), "mlp.down": npx.RowParallel()}, notes)
    assert notes == []
