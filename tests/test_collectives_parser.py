"""The HLO collective parser on hand-written snippets (no compilation needed)."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType

from nnx_parallel.views.collectives import _groups, bytes_by_kind, collectives, count_collectives

MESH8 = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,))
MESH2X4 = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def one(text, mesh=MESH2X4):
    ops = collectives(text, mesh)
    assert len(ops) == 1, ops
    return ops[0]


def test_sync_ops_kinds_sizes_and_groups():
    text = """
HloModule m
%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(%a, %b)
}
ENTRY %main (p: f32[4,8]) -> f32[4,8] {
  %p = f32[4,8]{1,0} parameter(0)
  %ar = f32[4,8]{1,0} all-reduce(%p), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, use_global_device_ids=true, to_apply=%add
  %ag = f32[16,8]{1,0} all-gather(%ar), channel_id=2, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, use_global_device_ids=true
  %rs = f32[1,8]{1,0} reduce-scatter(%ar), channel_id=3, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, to_apply=%add
  %a2a = f32[4,8]{1,0} all-to-all(%p), channel_id=4, replica_groups={{0,4},{1,5},{2,6},{3,7}}, dimensions={0}
  %cp = f32[4,8]{1,0} collective-permute(%p), channel_id=5, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  %fusion.all-reduce = f32[4,8]{1,0} fusion(%p), kind=kLoop, calls=%add
  ROOT %t = f32[4,8]{1,0} add(%cp, %a2a)
}
"""
    ops = collectives(text, MESH2X4)
    assert [(c.kind, c.size, c.group, c.axes) for c in ops] == [
        ("all-reduce", 4 * 8 * 4, 4, ("model",)),
        ("all-gather", 16 * 8 * 4, 4, ("model",)),  # the gathered result
        ("reduce-scatter", 1 * 8 * 4 * 4, 4, ("model",)),  # the full input
        ("all-to-all", 4 * 8 * 4, 2, ("data",)),
        ("collective-permute", 4 * 8 * 4, 2, ("model",)),
    ]
    assert count_collectives(text) == {
        "all-reduce": 1,
        "all-gather": 1,
        "reduce-scatter": 1,
        "all-to-all": 1,
        "collective-permute": 1,
    }


def test_traffic_follows_ring_formulas():
    ar, ag = collectives(
        "%a = f32[8]{0} all-reduce(%x), replica_groups={{0,1,2,3}}, to_apply=%add\n"
        "%b = f32[8]{0} all-gather(%x), replica_groups={{0,1,2,3}}, dimensions={0}\n"
    )
    assert ar.traffic == 2 * 32 * 3 / 4
    assert ag.traffic == 32 * 3 / 4


def test_async_start_done_pairs_count_once_with_the_done_shape():
    text = """
  %ags = (f32[2,4]{1,0}, f32[8,4]{1,0}) all-gather-start(%p), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}
  %agd = f32[8,4]{1,0} all-gather-done(%ags)
  %ars = f32[16]{0} all-reduce-start(%q), channel_id=2, replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add
  %ard = f32[16]{0} all-reduce-done(f32[16]{0} %ars)
  %cps = (f32[4]{0}, f32[4]{0}, u32[], u32[]) collective-permute-start(%r), channel_id=3, source_target_pairs={{0,4},{4,0}}
  %cpd = f32[4]{0} collective-permute-done((f32[4]{0}, f32[4]{0}, u32[], u32[]) %cps)
"""
    ops = collectives(text, MESH2X4)
    assert [(c.kind, c.size, c.group, c.axes) for c in ops] == [
        ("all-gather", 8 * 4 * 4, 4, ("model",)),
        ("all-reduce", 16 * 4, 2, ("data",)),
        ("collective-permute", 4 * 4, 2, ("data",)),
    ]
    assert sum(count_collectives(text).values()) == 3


def test_variadic_all_reduce_sums_its_tuple_shape():
    op = one(
        "ROOT %ar = (f32[4]{0}, bf16[8,2]{1,0}, s32[]) all-reduce(%a, %b, %c), replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add"
    )
    assert op.size == 4 * 4 + 8 * 2 * 2 + 4
    assert op.group == 8 and op.axes == ("data", "model")
    assert bytes_by_kind([op])["all-reduce"] == op.size


@pytest.mark.parametrize(
    "attr, groups",
    [
        ("replica_groups=[2,4]<=[8]", [[0, 1, 2, 3], [4, 5, 6, 7]]),
        ("replica_groups=[4,2]<=[2,4]T(1,0)", [[0, 4], [1, 5], [2, 6], [3, 7]]),
        ("replica_groups=[1,8]<=[8]", [list(range(8))]),
        ("replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0'}", [list(range(8))]),
        ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}", [[0, 4], [1, 5], [2, 6], [3, 7]]),
        ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}", [[0, 1, 2, 3], [4, 5, 6, 7]]),
        # XLA:CPU today, for a sum over 'model' on a 2x4 mesh: devices in mesh order.
        (
            "replica_groups=mesh['axis_0'=1,'axis_1'=4,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_1'}",
            [[0, 1, 2, 3], [4, 5, 6, 7]],
        ),
        (
            "replica_groups=mesh['axis_0'=1,'axis_1'=4,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_2'}",
            [[0, 4], [1, 5], [2, 6], [3, 7]],
        ),
        (
            "replica_groups=mesh['a'=4,'b'=2], device_ids=(0,4,1,5,2,6,3,7) {'b'}",
            [[0, 4], [1, 5], [2, 6], [3, 7]],
        ),
        ("replica_groups={{0,2},{1,3}}", [[0, 2], [1, 3]]),
        ("replica_groups={}", [list(range(8))]),
    ],
)
def test_replica_group_formats(attr, groups):
    assert _groups(", " + attr + ", to_apply=%add", 8) == groups


@pytest.mark.parametrize(
    "attr, mesh, group, axes",
    [
        ("replica_groups=[2,4]<=[8]", MESH2X4, 4, ("model",)),
        ("replica_groups=[4,2]<=[2,4]T(1,0)", MESH2X4, 2, ("data",)),
        ("replica_groups=[1,8]<=[8]", MESH2X4, 8, ("data", "model")),
        ("replica_groups={{0,4},{1,5},{2,6},{3,7}}", MESH2X4, 2, ("data",)),
        ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}", MESH2X4, 2, ("data",)),
        ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}", MESH2X4, 4, ("model",)),
        (
            "replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0','axis_1'}",
            MESH2X4,
            8,
            ("data", "model"),
        ),
        ("replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0'}", MESH8, 8, ("model",)),
        (
            "replica_groups=mesh['axis_0'=1,'axis_1'=4,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_1'}",
            MESH2X4,
            4,
            ("model",),
        ),
        (
            "replica_groups=mesh['axis_0'=1,'axis_1'=4,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_2'}",
            MESH2X4,
            2,
            ("data",),
        ),
    ],
)
def test_axis_mapping(attr, mesh, group, axes):
    op = one(f"%ar = f32[8]{{0}} all-reduce(%x), channel_id=1, {attr}, to_apply=%add", mesh)
    assert (op.group, op.axes) == (group, axes)


def test_no_mesh_leaves_axes_empty():
    assert (
        one("%ar = f32[8]{0} all-reduce(%x), replica_groups=[2,4]<=[8], to_apply=%add", None).axes
        == ()
    )


@pytest.mark.parametrize(
    "spec, fn, axes, group, size",
    [
        # Sharded rows: the 8 column sums (2 per device) are summed over 'data'.
        (("data", "model"), lambda x: x.sum(0), ("data",), 2, 2 * 4),
        # Sharded columns, full sum: one scalar all-reduce over 'model'.
        ((None, "model"), lambda x: x.sum(), ("model",), 4, 4),
    ],
)
def test_real_compiled_programs_on_2x4(spec, fn, axes, group, size):
    """What XLA:CPU prints today (mesh-style groups, device_ids) maps back to mesh axes."""
    f = jax.jit(fn, in_shardings=jax.NamedSharding(MESH2X4, jax.P(*spec)))
    ops = collectives(f.lower(jnp.ones((8, 8))).compile(), MESH2X4)
    assert [(c.kind, c.axes, c.group, c.size) for c in ops] == [("all-reduce", axes, group, size)]
