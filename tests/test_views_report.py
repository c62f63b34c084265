"""Tests for nnx_parallel.views.report: CommStats, CommunicationReport and communication_report."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import nnx_parallel as npx
from nnx_parallel.views.collectives import Collective
from nnx_parallel.views.report import CommStats, CommunicationReport, _find_mesh
from tests import models

MESH = jax.make_mesh((2, 4), ("data", "model"))
HLO = """
  %ar = f32[16]{0} all-reduce(%x), replica_groups=[2,4]<=[8], to_apply=%add
  %ag = f32[16,8]{1,0} all-gather(%ar), replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %ar2 = f32[32]{0} all-reduce(%x), replica_groups=[2,4]<=[8], to_apply=%add
"""


def test_comm_stats_add_accumulates():
    gather = Collective("all-gather", 512, 4, ("model",), "f32[16,8]")
    permute = Collective("collective-permute", 100, 2, ("data",), "f32[25]")
    stats = CommStats().add(gather).add(permute)
    assert stats == CommStats(count=2, bytes=612, traffic=512 * 3 / 4 + 100)


def test_report_from_hlo_text_groups_by_kind_and_axis():
    report = CommunicationReport.from_compiled(HLO, MESH)
    assert [c.kind for c in report.collectives] == ["all-reduce", "all-gather", "all-reduce"]
    assert report.by_kind["all-reduce"] == CommStats(2, 64 + 128, 2 * (64 + 128) * 3 / 4)
    assert report.by_kind["all-gather"] == CommStats(1, 512, 384.0)
    assert report.by_kind["all-to-all"] == CommStats()  # every kind present, zeros included
    assert report.by_axis == {("model",): CommStats(3, 704, 672.0)}
    assert set(report.by_kind_and_axis) == {("all-reduce", ("model",)), ("all-gather", ("model",))}
    assert report.total == CommStats(3, 704, 672.0)
    assert (report.count(), report.count("all-reduce"), report.count(axes="model")) == (3, 2, 3)
    assert report.count("all-gather", ("model",)) == 1 and report.count(axes="data") == 0
    # HLO text has no memory analysis.
    assert report.argument_bytes is None and report.temp_bytes is None


def test_report_text_table():
    text = str(CommunicationReport.from_compiled(HLO, MESH))
    assert text.splitlines() == [
        "communication on mesh {'data': 2, 'model': 4} (8 devices): 3 collectives",
        "kind        axes   count  bytes  traffic/device",
        "----------  -----  -----  -----  --------------",
        "all-gather  model      1    512             384",
        "all-reduce  model      2    192             288",
        "total                  3    704             672",
    ]
    empty = str(CommunicationReport.from_compiled("", None))
    assert empty.splitlines()[0] == "communication on no mesh (1 device): 0 collectives"


def test_find_mesh_and_compiled_program_takes_no_args():
    mesh8 = jax.make_mesh((8,), ("model",))
    mlp = npx.parallelize(models.MLP(rngs=nnx.Rngs(0)), mesh8, {"up": npx.ColumnParallel("model")})
    assert _find_mesh((mlp,)).shape == {"model": 8}
    assert _find_mesh((jnp.ones(3), {"a": 1})) is None
    with pytest.raises(TypeError, match="a compiled program takes no arguments"):
        npx.communication_report(object(), jnp.ones(3))  # no .lower


def test_communication_report_of_a_jitted_forward():
    mesh8 = jax.make_mesh((8,), ("model",))
    plan = {"up": npx.ColumnParallel("model"), "down": npx.RowParallel("model")}
    mlp = npx.parallelize(models.MLP(rngs=nnx.Rngs(0)), mesh8, plan)
    # No mesh given: found on the model's arrays.
    report = npx.communication_report(nnx.jit(lambda m, x: m(x)), mlp, jnp.ones((4, 16)))
    assert report.mesh is mesh8 or report.mesh.shape == {"model": 8}
    assert report.count("all-reduce", "model") == 1
    assert report.by_kind["all-reduce"].bytes == 4 * 16 * 4
    assert report.argument_bytes is not None and report.argument_bytes > 0
    assert report.routes and all(cls == "ParallelLinear" for cls, _, _ in report.routes)
    text = str(report)
    assert "memory per device: arguments " in text
    assert text.count("routes: ParallelLinear.__call__:") == 1  # repeated routes listed once
