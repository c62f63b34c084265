"""benchmarks/hlo_liveness.py: the peak of a hand-written schedule, computed by hand."""

import importlib.util
import os

ROOT = os.path.join(os.path.dirname(__file__), "..", "benchmarks")

HLO = """HloModule m, is_scheduled=true

ENTRY %main (p: f32[256]) -> f32[256] {
  %p = f32[256]{0} parameter(0)
  %a = f32[1024]{0} fusion(%p), kind=kLoop, calls=%f
  %b = f32[2048]{0} fusion(%a), kind=kLoop, calls=%g
  %bc = f32[2,1024]{1,0} bitcast(%b)
  %c = f32[256]{0} fusion(%a, %bc), kind=kLoop, calls=%h
  ROOT %d = f32[256]{0} add(%c, %p)
}
"""


def _tool():
    spec = importlib.util.spec_from_file_location(
        "hlo_liveness", os.path.join(ROOT, "hlo_liveness.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_peak_counts_what_is_live_together():
    tool = _tool()
    assert tool.nbytes("(f32[2,3]{1,0}, bf16[4]{0})") == 2 * 3 * 4 + 4 * 2
    total, live = tool.peak(HLO)
    # At %c: %a (4 KiB), %b through its bitcast (8 KiB) and %c itself (1 KiB); %p is an argument.
    assert total == 4096 + 8192 + 1024
    assert sorted(name for name, *_ in live) == ["a", "b", "c"]


ASSIGNMENT = """allocation 0: size 64, parameter 0, shape |f32[16]| at ShapeIndex {}:
 value: <1 p @0> (size=64,offset=0): f32[16]{0}
allocation 1: size 12288, preallocated-temp:
 value: <2 act @0> (size=4096,offset=0): f32[1024]{0}
 value: <3 all_gather.1 @0> (size=8192,offset=4096): f32[2048]{0}
 value: <4 grad @0> (size=4096,offset=4096): f32[1024]{0}
 value: <5 out{1} @0> (size=1024,offset=0): f32[256]{0}
"""
LIVE_RANGE = """HloLiveRange (max 5):
  InstructionSequence:
    0:p
  BufferLiveRange:
    p{}:0-5
    act{}:1-4
    all_gather.1{}:2-3
    grad{}:4-5
    out{1}:5-5
"""
OP_NAMES = """  %act = f32[1024]{0} fusion(%p), metadata={op_name="jit(step)/jvp()/mul"}
  %grad = f32[1024]{0} fusion(%act), metadata={op_name="jit(step)/transpose(jvp())/dot"}
"""


def test_xla_peak_sums_the_temp_values_over_xla_live_ranges():
    found = _tool().xla_peak(ASSIGNMENT, LIVE_RANGE, OP_NAMES)
    # At 2-3: act (4 KiB, forward) and the all-gather (8 KiB, counted as backward);
    # the parameter is not temp; at 4: act + grad = 8 KiB only.
    assert (found["bytes"], found["time"]) == (12288, 2)
    assert (found["forward"], found["backward"]) == (4096, 8192)
    assert sorted(v[0] for v in found["live"]) == ["act", "all_gather.1"]
