"""benchmarks/gpu.py at tiny sizes on the CPU devices, so it cannot rot."""

import importlib.util
import os
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


def test_gpu_benchmark_runs_at_tiny_sizes(capsys):
    sys.path.insert(0, ROOT)
    try:
        spec = importlib.util.spec_from_file_location("gpu_bench", os.path.join(ROOT, "gpu.py"))
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        rows = bench.main(["--tiny", "--depth", "2", "--steps", "1"])
    finally:
        sys.path.remove(ROOT)
    out = capsys.readouterr().out
    assert "no GPU found: running on cpu" in out
    assert [r["setup"] for r in rows] == ["fsdp", "naive"]
    fsdp, naive = rows
    kernels, biases = 2 * 64 * 64 * 4, 2 * 64 * 4
    # FSDP reduce-scatters the kernels and all-reduces only the loss and the
    # biases (in, and their gradients back: vectors travel by all-reduce);
    # naive annotation all-reduces every gradient in full (XLA:CPU).
    assert fsdp["reduce-scatter"] == kernels and fsdp["all-reduce"] == 4 + 2 * biases
    assert naive["all-reduce"] >= kernels + biases
    assert all(r["ms"] > 0 and r["peak"] is None for r in rows)  # CPU: no memory_stats
