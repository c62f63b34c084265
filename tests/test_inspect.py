"""summary / explain / communication_report / render: the content of each output."""

import re

import jax
import jax.numpy as jnp
import pytest
import treescope
from flax import nnx

import nnx_parallel as npx
from nnx_parallel.views.summary import param_entries
from tests import helpers, models


def mlp_plan():
    return {"up": npx.ColumnParallel("model"), "down": npx.RowParallel("model")}


def rows(text):
    """{path: [cells]} of the summary table (cells split on 2+ spaces)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("---")) + 1
    out = {}
    for line in lines[start:]:
        if line.startswith("per device:"):
            break
        cells = re.split(r"\s{2,}", line.strip())
        out[cells[0]] = cells
    return out


def footer(text):
    line = next(line for line in text.splitlines() if line.startswith("per device:"))
    total, sharded, replicated = (int(n.replace(",", "")) for n in re.findall(r"([\d,]+) B", line))
    return total, sharded, replicated


# summary ----------------------------------------------------------------------------------


def test_summary_of_parallelized_mlp(mesh8):
    model = npx.parallelize(models.MLP(rngs=nnx.Rngs(0)), mesh8, mlp_plan())
    text = npx.summary(model)
    table = rows(text)
    assert table["up.kernel"] == [
        "up.kernel",
        "(16, 64)",
        "float32",
        "P(None, 'model')",
        "(16, 8)",
        "512",
        "up",
    ]
    assert table["down.kernel"][3:7] == ["P('model', None)", "(8, 16)", "512", "down"]
    assert table["up.bias"][3:6] == ["P('model')", "(8,)", "32"]
    # RowParallel keeps the bias whole: flagged as replicated, and only it.
    assert table["down.bias"][3:] == ["P(None)", "(16,)", "64", "down", "replicated"]
    assert [p for p, cells in table.items() if cells[-1] == "replicated"] == ["down.bias"]
    assert footer(text) == (512 + 512 + 32 + 64, 512 + 512 + 32, 64)
    assert "unsharded: 8,512 B" in text


def test_summary_totals_equal_sum_of_bytes_per_device(mesh2x4):
    abstract = nnx.eval_shape(lambda: models.GPT(rngs=nnx.Rngs(0)))
    res = npx.resolve(abstract, mesh2x4, helpers.tp_plans()["gpt"])
    text = npx.summary(res)
    table = rows(text)
    assert len(table) == len(res.params) and text.startswith(
        "mesh {'data': 2, 'model': 4} (8 devices), 35 params"
    )
    for path, entry in res.params.items():
        assert table[path][4] == str(entry.shard_shape(mesh2x4))
        assert int(table[path][5].replace(",", "")) == entry.bytes_per_device(mesh2x4)
    assert table["blocks.0.mlp.up.kernel"][3:7] == [
        "P(None, 'model')",
        "(32, 32)",
        "4,096",
        "blocks.*.mlp.up",
    ]
    total, sharded, replicated = footer(text)
    assert total == sum(e.bytes_per_device(mesh2x4) for e in res.params.values())
    assert replicated == sum(
        e.bytes_per_device(mesh2x4)
        for e in res.params.values()
        if e.spec == jax.P(*[None] * len(e.shape))
    )
    assert sharded + replicated == total
    # Sorted by size: bytes per device never increase down the table.
    sizes = [int(cells[5].replace(",", "")) for cells in table.values()]
    assert sizes == sorted(sizes, reverse=True)


def test_summary_of_resolution_matches_summary_of_parallelized_model(mesh2x4):
    """Before allocation (abstract + resolve) and after parallelize: same table."""
    abstract = nnx.eval_shape(lambda: models.GPT(rngs=nnx.Rngs(0)))
    before = npx.summary(npx.resolve(abstract, mesh2x4, helpers.tp_plans()["gpt"]))
    model = npx.parallelize(models.GPT(rngs=nnx.Rngs(0)), mesh2x4, helpers.tp_plans()["gpt"])
    assert npx.summary(model) == before


def test_summary_sort_orders_and_untouched_model():
    model = models.MLP(rngs=nnx.Rngs(0))
    text = npx.summary(model, sort="path")
    assert text.splitlines()[0] == "no mesh (1 device), 4 params"
    assert list(rows(text)) == ["down.bias", "down.kernel", "up.bias", "up.kernel"]
    assert all(cells[-1] == "none" for cells in rows(text).values())  # no flag on 1 device
    assert list(rows(npx.summary(model, sort="none"))) == list(param_entries(model)[0])
    with pytest.raises(ValueError, match="sort='bytes' is not one of"):
        npx.summary(model, sort="bytes")
    with pytest.raises(TypeError, match="expected an nnx.Module or a Resolution, got dict"):
        npx.summary({"a": 1})


def test_summary_names_decorator_and_root_sources(fsdp8):
    @npx.sharded(jax.P(None, "fsdp"))
    class Declared(nnx.Linear):
        pass

    layer = npx.parallelize(Declared(16, 32, rngs=nnx.Rngs(0)), fsdp8, {})
    assert rows(npx.summary(layer))["kernel"][3:7] == [
        "P(None, 'fsdp')",
        "(16, 4)",
        "256",
        "@sharded",
    ]
    res = npx.resolve(
        nnx.eval_shape(lambda: models.MLP(rngs=nnx.Rngs(0))), fsdp8, npx.FSDP(min_size=64)
    )
    table = rows(npx.summary(res))
    assert table["up.kernel"][3:] == ["P(None, 'fsdp')", "(16, 8)", "512", "'' (root)"]
    # The same plan applied to an abstract model: layouts read back from metadata.
    abstract = nnx.eval_shape(lambda: models.MLP(rngs=nnx.Rngs(0)))
    npx.parallelize(abstract, fsdp8, npx.FSDP(min_size=64))
    table = rows(npx.summary(abstract))
    assert table["up.kernel"][3:] == ["P(None, 'fsdp')", "(16, 8)", "512", "'' (root)"]
    # FSDP's root rule left the small bias replicated: the root is its source.
    assert table["down.bias"][3:] == ["P(None)", "(16,)", "64", "'' (root)", "replicated"]
    assert npx.resolve(abstract, fsdp8, npx.FSDP(min_size=64)).untouched == ()


def test_summary_and_explain_of_a_root_plan_and_own_metadata(fsdp8):
    text = npx.explain(models.MLP(rngs=nnx.Rngs(0)), fsdp8, npx.FSDP(min_size=64))
    assert text.splitlines()[0].endswith(
        "1 pattern, 0 matched nothing; 4 params, 4 set by the plan"
    )
    assert "params no rule touched" not in text
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "fsdp"))
    with jax.set_mesh(fsdp8):
        layer = nnx.Linear(16, 32, kernel_init=init, rngs=nnx.Rngs(0))
    table = rows(npx.summary(layer, fsdp8))
    assert table["kernel"][3:] == ["P(None, 'fsdp')", "(16, 4)", "256", "own metadata"]
    assert table["bias"][6] == "none"


def test_explain_names_fsdp_gather_hooks(fsdp8):
    text = npx.explain(models.MLP(rngs=nnx.Rngs(0)), fsdp8, {"up": npx.FSDP(min_size=64)})
    assert text.splitlines()[0].endswith(
        "1 pattern, 0 matched nothing; 4 params, 2 set by the plan"
    )
    assert "'up' -> FSDP('fsdp')" in text
    fsdp = "gather  route shard-map/gathered/as-is (else as-written/constrained/as-is)"
    if fsdp8.axis_types[0] == jax.sharding.AxisType.Explicit:  # the root is guarded
        assert text.endswith(
            f"call-time hooks (2 modules):\n  up      {fsdp}\n  <root>  guard  route "
            "wrapper:guard: as-written/as-is/as-is, else in auto-axes/as-is/resharded"
        )
    else:
        assert text.endswith(f"call-time hooks (1 module):\n  up  {fsdp}")
    assert (
        "params no rule touched: 2\n  down.bias    (16,)     P(None)\n  down.kernel  (64, 16)  P(None, None)"
        in text
    )


# explain ----------------------------------------------------------------------------------


def test_explain_lists_matches_unmatched_and_untouched(mesh8):
    model = models.GPT(rngs=nnx.Rngs(0))
    before = jax.tree.map(lambda x: x.sharding, nnx.state(model))
    plan = {
        "blocks.*.mlp.up": npx.ColumnParallel(),
        "blocks.*.mlp.down": npx.RowParallel(),
        "blocks.*.atn.q": npx.ColumnParallel(),
    }
    text = npx.explain(model, mesh8, plan)
    lines = text.splitlines()
    assert (
        lines[0]
        == "plan on mesh {'model': 8} (8 devices): 3 patterns, 1 matched nothing; 35 params, 8 set by the plan"
    )
    i = lines.index("'blocks.*.mlp.up' -> ColumnParallel('model')")
    assert lines[i + 1] == "  matched 2 modules: blocks.0.mlp.up, blocks.1.mlp.up"
    assert "    blocks.1.mlp.up.kernel  P(None, 'model')" in lines
    j = lines.index("patterns that matched nothing:")
    assert lines[j + 1] == "  'blocks.*.atn.q' Did you mean 'blocks.*.attn.q'?"
    k = lines.index("params no rule touched: 27")
    untouched = [line.split()[0] for line in lines[k + 1 : k + 28]]
    assert (
        len(untouched) == 27
        and "embed.embedding" in untouched
        and "blocks.0.attn.o.kernel" in untouched
    )
    assert not any(".mlp." in p for p in untouched)
    # Explicit axes: the replicated nnx.Embed tables get a lookup layout too (issue 14).
    explicit = mesh8.axis_types[0] == jax.sharding.AxisType.Explicit
    route = "as-written/as-is/constrained (else as-written/as-is/caller, as-written/as-is/as-is)"
    if explicit:
        route = (
            "as-written/as-is/out-sharding (else as-written/as-is/caller, "
            "as-written/as-is/as-is, as-written/as-is/constrained)"
        )
    paths = [f"blocks.{i}.mlp.{n}" for i in (0, 1) for n in ("down", "up")]
    paths += ["embed", "pos"] if explicit else []
    hooked = [f"  {p.ljust(17)}  layout  route {route}" for p in paths]
    if explicit:  # the root is guarded (runtime/regions.py)
        guard = "route wrapper:guard: as-written/as-is/as-is, else in auto-axes/as-is/resharded"
        hooked.append(f"  {'<root>'.ljust(17)}  guard  {guard}")
    assert lines[-len(hooked) - 1 :] == [f"call-time hooks ({len(hooked)} modules):"] + hooked
    # explain resolves only: the model is untouched.
    assert jax.tree.map(lambda x: x.sharding, nnx.state(model)) == before
    assert "nnx_parallel_source" not in model.blocks[0].mlp.up.kernel.get_metadata()


def test_explain_reports_a_pattern_that_lost_to_a_more_specific_one(mesh8):
    model = models.MLP(rngs=nnx.Rngs(0))
    text = npx.explain(model, mesh8, {"*": npx.ColumnParallel(), "down": npx.RowParallel()})
    lines = text.splitlines()
    i = lines.index("'*' -> ColumnParallel('model')")
    assert lines[i + 1] == "  matched 2 modules: down, up"
    assert lines[i + 2 : i + 4] == ["    up.bias    P('model')", "    up.kernel  P(None, 'model')"]
    assert "params no rule touched" not in text


# communication_report ---------------------------------------------------------------------


def test_report_column_row_forward_has_one_all_reduce_over_model(mesh8):
    model = npx.parallelize(models.MLP(rngs=nnx.Rngs(0)), mesh8, mlp_plan())
    x = jnp.ones((4, 16))
    report = npx.communication_report(nnx.jit(lambda m, x: m(x)), model, x, mesh=mesh8)
    assert report.count() == 1
    assert report.count("all-reduce", "model") == 1
    assert report.by_kind["all-reduce"] == npx.report.CommStats(1, 4 * 16 * 4, 2 * 256 * 7 / 8)
    assert all(
        report.by_kind[k].count == 0
        for k in ("all-gather", "reduce-scatter", "all-to-all", "collective-permute")
    )
    assert report.by_axis == {("model",): report.by_kind["all-reduce"]}
    assert report.argument_bytes >= 4 * (16 * 8 + 8 + 8 * 16 + 16) + 4 * 16 * 4  # params shards + x
    assert report.output_bytes >= 4 * 16 * 4 and report.temp_bytes >= 0
    text = str(report)
    assert re.search(r"^all-reduce\s+model\s+1\s+256\s+448$", text, re.M), text
    assert "memory per device: arguments " in text


def test_report_train_step_on_2x4_splits_axes(mesh2x4):
    model = npx.parallelize(models.MLP(rngs=nnx.Rngs(0)), mesh2x4, mlp_plan())
    _, xs = helpers.batch_for("mlp", mesh2x4)
    with jax.set_mesh(mesh2x4):
        opt = nnx.Optimizer(model, __import__("optax").sgd(1e-2), wrt=nnx.Param)
    report = npx.communication_report(helpers.make_step(), model, opt, xs, mesh=mesh2x4)
    assert set(report.by_axis) == {("data",), ("model",)}
    assert report.count("all-reduce", "model") == 1 and report.count("all-reduce", "data") >= 1
    assert report.total.bytes == sum(c.size for c in report.collectives)


def test_report_for_jax_jit_infers_mesh_from_arguments():
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    x = jax.device_put(jnp.ones((8, 8)), jax.NamedSharding(mesh, jax.P(None, "model")))
    report = npx.communication_report(jax.jit(lambda x: x.sum()), x)
    assert report.mesh is mesh
    assert [(c.kind, c.axes, c.size) for c in report.collectives] == [("all-reduce", ("model",), 4)]
    compiled = jax.jit(lambda x: x.sum()).lower(x).compile()
    assert npx.communication_report(compiled, mesh=mesh).by_kind == report.by_kind
    with pytest.raises(TypeError, match="compiled program takes no arguments"):
        npx.communication_report(compiled, x)


# treescope --------------------------------------------------------------------------------


def test_treescope_text_shows_each_params_layout(mesh8):
    model = npx.parallelize(models.MLP(rngs=nnx.Rngs(0)), mesh8, mlp_plan())
    with treescope.active_renderer.set_scoped(npx.treescope_renderer()):
        text = treescope.render_to_text(model)
    assert "# P(None, 'model') · shard (16, 8) · 512 B/device of 4,096 B · from 'up'" in text
    assert "# P('model') · shard (8,) · 32 B/device of 256 B · from 'up'" in text
    assert text.count("B/device") == 2  # down is collapsed in text mode; render it alone
    with treescope.active_renderer.set_scoped(npx.treescope_renderer()):
        text = treescope.render_to_text(model.down)
    assert "# P('model', None) · shard (8, 16) · 512 B/device of 4,096 B · from 'down'" in text
    assert "# replicated · shard (16,) · 64 B/device of 64 B · from 'down'" in text
    # The default renderer is unchanged outside the scope.
    assert "B/device" not in treescope.render_to_text(model)


def test_render_html_has_layouts_and_device_grid(mesh8):
    model = npx.parallelize(models.MLP(rngs=nnx.Rngs(0)), mesh8, mlp_plan())
    html = npx.render(model, compressed=False)
    assert "shard (16, 8) · 512 B/device of 4,096 B" in html
    assert "Sharded across 8 CPU devices" in html  # treescope's device-layout view
    plain = npx.render(models.MLP(rngs=nnx.Rngs(0)), compressed=False, arrays=False)
    assert "B/device" not in plain and "Sharded across" not in plain  # nothing sharded: no notes
    assert npx.render(model).startswith("<")
