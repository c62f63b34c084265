"""nnx_parallel.xla_flags: the GPU overlap flags, returned and never set."""

import os

import pytest

import nnx_parallel as npx


def test_flags_scale_the_combine_thresholds_with_the_device_count():
    flags = npx.gpu_overlap_flags(devices=8, combine_bytes=2**30)
    values = dict(f[2:].split("=") for f in flags)
    assert values["xla_gpu_enable_latency_hiding_scheduler"] == "true"
    assert int(values["xla_gpu_all_reduce_combine_threshold_bytes"]) == 2**30
    assert int(values["xla_gpu_all_gather_combine_threshold_bytes"]) == 2**30 // 8
    assert int(values["xla_gpu_reduce_scatter_combine_threshold_bytes"]) == 2**30 // 16
    assert {
        "xla_gpu_enable_pipelined_all_gather",
        "xla_gpu_enable_pipelined_reduce_scatter",
    } <= set(values)


def test_nothing_is_set_behind_the_users_back():
    before = os.environ.get("XLA_FLAGS")
    npx.gpu_overlap_flags(devices=4)
    assert os.environ.get("XLA_FLAGS") == before


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "8"])
def test_bad_counts_are_plan_errors(bad):
    with pytest.raises(npx.PlanError, match="expected a positive int"):
        npx.gpu_overlap_flags(devices=bad)
    with pytest.raises(npx.PlanError, match="combine_bytes"):
        npx.gpu_overlap_flags(devices=8, combine_bytes=bad)
