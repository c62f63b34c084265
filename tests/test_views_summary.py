"""Tests for nnx_parallel.views.summary: param_entries, summary's sort and mesh handling, explain."""

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import nnx_parallel as npx
from nnx_parallel.views import summary as summary_mod
from nnx_parallel.views.summary import param_entries
from tests import models

MESH = jax.make_mesh((8,), ("model",))


def test_param_entries_of_plain_module_and_bad_input():
    entries, mesh = param_entries(models.MLP(rngs=nnx.Rngs(0)))
    assert mesh is None
    assert list(entries) == ["down.bias", "down.kernel", "up.bias", "up.kernel"]
    kernel = entries["down.kernel"]
    assert (kernel.module_path, kernel.name, kernel.shape) == ("down", "kernel", (64, 16))
    assert kernel.spec == P(None, None) and kernel.source is None
    assert summary_mod._source_text(kernel) == "none" and summary_mod._is_replicated(kernel)
    with pytest.raises(TypeError, match="expected an nnx.Module or a Resolution, got dict"):
        param_entries({"up": 1})


def test_param_entries_and_summary_with_mesh_override():
    abstract = nnx.eval_shape(lambda: models.MLP(rngs=nnx.Rngs(0)))
    res = npx.resolve(abstract, MESH, {"up": npx.ColumnParallel("model")})
    mesh2x4 = jax.make_mesh((2, 4), ("data", "model"))
    entries, mesh = param_entries(res, mesh2x4)
    assert mesh is mesh2x4 and entries["up.kernel"].shard_shape(mesh) == (16, 16)
    lines = npx.summary(res, mesh2x4, sort="path").splitlines()
    assert lines[0] == "mesh {'data': 2, 'model': 4} (8 devices), 4 params"
    assert [line.split()[0] for line in lines[3:7]] == [
        "down.bias",
        "down.kernel",
        "up.bias",
        "up.kernel",
    ]
    assert lines[-2] == (
        "per device: 5,248 B (5.1 KiB) = sharded 1,088 B (2 params) + replicated 4,160 B (2 params)"
    )
    assert lines[-1] == "unsharded: 8,512 B (8.3 KiB); each device holds 61.7%"


def test_summary_without_mesh_flags_nothing_and_rejects_bad_sort():
    model = models.MLP(rngs=nnx.Rngs(0))
    text = npx.summary(model)
    assert text.startswith("no mesh (1 device), 4 params")
    assert "replicated\n" not in text and not text.splitlines()[3].endswith("replicated")
    assert text.splitlines()[3].split()[0] == "down.kernel"  # sort="size": largest first
    assert text.endswith("each device holds 100.0%")
    for bad in ("SIZE", "bytes", ""):
        with pytest.raises(ValueError, match=f"sort={bad!r} is not one of"):
            npx.summary(model, sort=bad)


def test_style_text_names_style_and_axis():
    assert summary_mod._style_text(npx.ColumnParallel("model")) == "ColumnParallel('model')"
    assert summary_mod._style_text(npx.RowParallel("tp")) == "RowParallel('tp')"


def test_explain_truncates_long_match_lists():
    abstract = nnx.eval_shape(lambda: models.GPT(layers=3, rngs=nnx.Rngs(0)))
    plan = {"blocks.*.attn.*": npx.ColumnParallel("model"), "blocks.0.attn.q": npx.RowParallel()}
    lines = npx.explain(abstract, MESH, plan).splitlines()
    assert lines[0] == (
        "plan on mesh {'model': 8} (8 devices): 2 patterns, 0 matched nothing; "
        "50 params, 21 set by the plan"
    )
    assert lines[1] == "'blocks.*.attn.*' -> ColumnParallel('model')"
    assert lines[2] == (
        "  matched 12 modules: blocks.0.attn.k, blocks.0.attn.o, blocks.0.attn.q, "
        "blocks.0.attn.v, blocks.1.attn.k, blocks.1.attn.o, ... (6 more)"
    )
    # The more specific pattern wins blocks.0.attn.q: it is listed under it, not under the glob.
    glob = lines[3 : lines.index("'blocks.0.attn.q' -> RowParallel('model')")]
    assert "    blocks.0.attn.k.kernel  P(None, 'model')" in glob
    assert not any("blocks.0.attn.q." in line for line in glob)
    assert "params no rule touched: 29" in lines
    assert "call-time hooks (15 modules):" in lines
