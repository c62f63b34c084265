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
