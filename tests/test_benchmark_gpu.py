"""benchmarks/gpu.py at tiny sizes on the CPU devices, so it cannot rot."""

import importlib.util
import os
import sys

import pytest

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
    assert [r["setup"] for r in rows] == ["naive", "fsdp", "fsdp-p1"]
    naive, fsdp, p1 = rows
    assert p1["reduce-scatter"] == fsdp["reduce-scatter"]  # prefetch moves no extra bytes
    kernels, biases = 2 * 64 * 64 * 4, 2 * 64 * 4
    # FSDP reduce-scatters the kernels and all-reduces only the loss and the
    # biases (in, and their gradients back: vectors travel by all-reduce);
    # naive annotation all-reduces every gradient in full (XLA:CPU).
    assert fsdp["reduce-scatter"] == kernels and fsdp["all-reduce"] == 4 + 2 * biases
    assert naive["all-reduce"] >= kernels + biases
    assert all(r["ms"] > 0 and r["peak"] is None for r in rows)  # CPU: no memory_stats
    assert all(r["flops"] > 0 for r in rows)
    assert "MFU" in out and " n/a " in out.splitlines()[-1]  # CPU: no peak to divide by
    assert "XLA_FLAGS +=" not in out  # GPU flags are only set for GPU runs


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", os.path.join(ROOT, "gpu.py"))
    bench = importlib.util.module_from_spec(spec)
    sys.path.insert(0, ROOT)
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(ROOT)
    return bench


def test_table_row_formats_what_a_gpu_reports():
    bench = _bench()
    row = {
        "setup": "fsdp",
        "flops": 494.7e12 * 0.030214,  # the H200 TF32 peak for the whole step: MFU 100%
        "temp": 3 * 2**20,
        "footprint": 49158.27 * 2**20,
        "all-gather": 2048,
        "reduce-scatter": 1024,
        "all-reduce": 0,
        "ms": 30.214,
        "peak": 49158.3 * 2**20,
    }
    line = bench.table_row(row, psi=1024, peak_tflops=494.7)
    assert line.split() == [
        "fsdp",
        "3.00",
        "49158.27",
        "2.000",
        "1.000",
        "0.000",
        "30.21",
        "100.0%",
        "49158.3",
    ]
    assert len(bench.table_row(row, 1024)) == len(bench.HEADER)
    assert bench.table_row(row, 1024).split()[-2] == "n/a"  # no peak given: no MFU
    assert bench.table_row({**row, "peak": None}, 1024).split()[-1] == "n/a"


def test_the_gpu_path_runs_each_setup_in_its_own_process(capsys):
    # What a GPU run does (one child process per setup, rows passed back as JSON),
    # forced here with --isolate at tiny sizes.
    rows = _bench().main(
        ["--tiny", "--depth", "2", "--steps", "1", "--isolate", "--setups", "fsdp,naive"]
    )
    assert [r["setup"] for r in rows] == ["fsdp", "naive"]
    assert rows[0]["reduce-scatter"] == 2 * 64 * 64 * 4  # the same bytes as in-process
    out = capsys.readouterr().out
    assert out.count("\nfsdp ") == 1 and out.count("\nnaive ") == 1


def test_unknown_setups_are_refused():
    with pytest.raises(SystemExit):
        _bench().main(["--tiny", "--setups", "fsdp,zero9"])
