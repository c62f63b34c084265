"""Two processes x 4 CPU devices over jax.distributed agree with one process x 8.

The workers (tests/mp_worker.py) join through a coordinator on loopback,
train the tiny GPT under FSDP and under tensor parallelism on 2x4 meshes,
each feeding only its own rows of the batch, and save/restore a sharded
checkpoint. This process runs the same code on 8 local devices meanwhile:
the reference.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import mp_worker

# One worker runs this whole file under pytest-xdist: its module fixture starts the processes once.
pytestmark = pytest.mark.xdist_group("multiprocess")

WORKER = Path(__file__).with_name("mp_worker.py")
ROOT = WORKER.parent.parent
PROCESSES, LOCAL_DEVICES = 2, 4
TIMEOUT_S = 240  # per run of both workers; each also exits itself 20 s earlier
TOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict:
    """JAX on CPU, without the parent's 8-device flag (the workers ask for 4)."""
    flags = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags), PYTHONUNBUFFERED="1")


def launch(tmp: Path) -> list[subprocess.Popen]:
    port, procs = free_port(), []
    for i in range(PROCESSES):
        cmd = [
            sys.executable,
            str(WORKER),
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            str(PROCESSES),
            "--process-id",
            str(i),
            "--local-devices",
            str(LOCAL_DEVICES),
            "--out",
            str(tmp / f"result{i}.json"),
            "--ckpt",
            str(tmp / "ckpt"),
            "--timeout",
            str(TIMEOUT_S - 20),
        ]
        with open(tmp / f"worker{i}.log", "w") as log:
            procs.append(
                subprocess.Popen(
                    cmd, cwd=ROOT, env=worker_env(), stdout=log, stderr=subprocess.STDOUT
                )
            )
    return procs


def logs(tmp: Path) -> str:
    tails = []
    for i in range(PROCESSES):
        lines = (tmp / f"worker{i}.log").read_text().splitlines()
        tails.append(
            f"--- worker {i} ---\n" + "\n".join(ln for ln in lines[-40:] if "[Gloo]" not in ln)
        )
    return "\n".join(tails)


_RUNS: dict = {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(results of the two workers, single-process reference, seconds taken).

    Kept for the whole worker process: pytest tears a module fixture down
    whenever the worker runs another module's test in between (xdist may
    interleave them), and the processes need not run twice."""
    if not _RUNS:
        _RUNS["runs"] = _launch_and_wait(tmp_path_factory)
    return _RUNS["runs"]


def _launch_and_wait(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiprocess")
    start = time.perf_counter()
    procs = launch(tmp)
    try:
        reference = mp_worker.run_all()  # meanwhile: the same code, one process, 8 devices
        for p in procs:
            remaining = TIMEOUT_S - (time.perf_counter() - start)
            try:
                p.wait(timeout=max(remaining, 1))
            except subprocess.TimeoutExpired:
                pytest.fail(f"workers still running after {TIMEOUT_S} s\n{logs(tmp)}")
        codes = [p.returncode for p in procs]
        if any(codes):
            pytest.fail(f"workers exited with {codes}\n{logs(tmp)}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = [json.loads((tmp / f"result{i}.json").read_text()) for i in range(PROCESSES)]
    return results, reference, time.perf_counter() - start


def test_really_multiprocess(runs):
    results, reference, _ = runs
    assert reference["process_count"] == 1 and reference["devices"] == 8
    assert [r["process_index"] for r in results] == list(range(PROCESSES))
    for r in results:
        assert (r["process_count"], r["local_devices"], r["devices"]) == (
            PROCESSES,
            LOCAL_DEVICES,
            8,
        )
        for mode in ("fsdp", "tp"):
            assert (
                not r[mode]["kernel_fully_addressable"]
                and r[mode]["kernel_local_shards"] == LOCAL_DEVICES
            )
            assert not r[mode]["batch_fully_addressable"]
        assert r["local_metrics"] == [{"index": 0.5}, [3.0]]
    # Each process fed its own half of the batch.
    assert [r["fsdp"]["batch_local_rows"] for r in results] == [[0, 4], [4, 8]]
    assert [r["tp"]["batch_local_rows"] for r in results] == [[0, 4], [4, 8]]


def test_processes_agree_exactly(runs):
    results, _, _ = runs
    for mode in ("fsdp", "tp"):
        assert results[0][mode]["losses"] == results[1][mode]["losses"]
        assert results[0][mode]["checksums"] == results[1][mode]["checksums"]


@pytest.mark.parametrize("mode", ["fsdp", "tp"])
def test_matches_single_process(runs, mode):
    results, reference, _ = runs
    expected = reference[mode]
    assert results[0][mode]["kernel_spec"] == expected["kernel_spec"]
    assert results[0][mode]["summary"] == results[1][mode]["summary"] == expected["summary"]
    diff = max(abs(a - b) for a, b in zip(results[0][mode]["losses"], expected["losses"]))
    assert len(results[0][mode]["losses"]) == mp_worker.STEPS and diff <= TOL, (
        results[0][mode]["losses"],
        expected,
    )
    assert expected["losses"][-1] < expected["losses"][0]  # it trains
    for path, sums in expected["checksums"].items():
        got = results[0][mode]["checksums"][path]
        for a, b in zip(got, sums):
            assert abs(a - b) <= TOL * max(1.0, abs(b)), f"{mode} {path}: {got} != {sums}"


def test_checkpoint_across_processes(runs):
    """Saved by both processes (TP layout), restored by both as FSDP: bit-exact, on the devices."""
    results, _, _ = runs
    for r in results:
        assert r["tp"]["restored"] == {"all_equal": True, "mu_spec": "P(None, ('fsdp', 'model'))"}


def test_gather_and_render_across_processes(runs):
    """gather all-gathers across processes: each gets the whole model; render shows layouts."""
    results, reference, _ = runs
    for r in results:
        assert r["tp"]["export"]["render_shows_layouts"]
        sums = r["tp"]["export"]["abs_sums"]
        assert sums.keys() == r["tp"]["checksums"].keys()
        for path, (_, abs_sum) in r["tp"]["checksums"].items():
            assert abs(sums[path] - abs_sum) <= TOL * max(1.0, abs_sum), path
    assert results[0]["tp"]["export"] == results[1]["tp"]["export"]
