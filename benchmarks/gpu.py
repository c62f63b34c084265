"""FSDP vs naive annotation on the accelerators at hand: one command, one table.

Run:  python benchmarks/gpu.py           (under 5 minutes; GPU sizes when a GPU is present)
      python benchmarks/gpu.py --tiny    (tiny sizes; what the test runs on CPU)

For each setup (naive annotation, FSDP, FSDP with prefetch=1), one jitted
Adam train step on L x Linear(W, W) + ReLU, over a 1D mesh of every local
device: compiled temp memory and footprint (arguments + temp + outputs -
aliases, per device), all-gather / reduce-scatter / all-reduce bytes over
psi, median step time, MFU (compiled FLOPs per device per second over the
device's peak) and `device.memory_stats()["peak_bytes_in_use"]` after the
steps (where the backend reports it). Without a GPU it runs on CPU and says
so: its times and peaks are no GPU figures.

On a GPU each setup runs in its own process with the XLA flags that decide
FSDP overlap (`nnx_parallel.gpu_overlap_flags`: latency-hiding scheduler,
combine thresholds, pipelined collectives) added to `XLA_FLAGS`, and the
flags are printed; `--no-xla-flags` runs without them for comparison.
MFU uses the dense TF32 peak (JAX's default f32 matmul precision on
Ampere and later GPUs) from the vendor's datasheet for the devices in
`PEAK_TFLOPS`, or `--peak-tflops`.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fsdp_memory as fm  # noqa: E402

from nnx_parallel.views.collectives import bytes_by_kind, collectives  # noqa: E402
from nnx_parallel.xla_flags import gpu_overlap_flags  # noqa: E402

SETUPS = ("naive", "fsdp", "fsdp-p1")
# Dense TF32 TFLOP/s per device, from the vendors' datasheets (SXM parts).
PEAK_TFLOPS = {"NVIDIA H100": 494.7, "NVIDIA H200": 494.7, "NVIDIA A100": 156.0}


def _peak(device) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return None if not stats else stats.get("peak_bytes_in_use")


def run(setup: str, depth: int, width: int, batch: int, mesh, steps: int) -> dict:
    model = fm.build(setup, "unrolled", depth, width, mesh)
    x = fm.batch(mesh, width, batch)
    compiled, opt = fm.compile_step(model, mesh, x)
    mem = compiled.memory_analysis()
    ops = bytes_by_kind(collectives(compiled, mesh))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per device
    times = []
    with jax.set_mesh(mesh):
        jax.block_until_ready(fm.train_step(model, opt, x))  # warm up (and compile the call path)
        for _ in range(steps):
            t0 = time.perf_counter()
            jax.block_until_ready(fm.train_step(model, opt, x))
            times.append(time.perf_counter() - t0)
    footprint = (
        mem.argument_size_in_bytes
        + mem.temp_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
    )
    return {
        "temp": mem.temp_size_in_bytes,
        "footprint": footprint,
        "ms": 1e3 * statistics.median(times),
        "flops": float(cost.get("flops", 0.0)),
        "peak": _peak(jax.local_devices()[0]),
        **ops,
    }


def _in_subprocess(setup: str, argv: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *argv, "--only", setup],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(next(line[4:] for line in out.splitlines() if line.startswith("ROW ")))


HEADER = (
    f"{'setup':7} {'temp':>9} {'footprint':>10} {'all-gather':>11} {'red-scat':>9} "
    f"{'all-reduce':>11} {'step ms':>9} {'MFU':>6} {'peak MiB':>9}"
)


def mfu(row: dict, peak_tflops: float | None) -> float | None:
    """Compiled FLOPs per device per second over the peak, or None without a peak."""
    if not peak_tflops or not row.get("flops") or row["ms"] <= 0:
        return None
    return row["flops"] / (row["ms"] / 1e3) / (peak_tflops * 1e12)


def table_row(row: dict, psi: int, peak_tflops: float | None = None) -> str:
    """One line of the table: MiB per device, collective bytes over psi, ms, MFU, peak."""
    peak = "n/a" if row["peak"] is None else f"{row['peak'] / 2**20:.1f}"
    util = mfu(row, peak_tflops)
    util = "n/a" if util is None else f"{100 * util:.1f}%"
    return (
        f"{row['setup']:7} {row['temp'] / 2**20:9.2f} {row['footprint'] / 2**20:10.2f} "
        f"{row['all-gather'] / psi:11.3f} {row['reduce-scatter'] / psi:9.3f} "
        f"{row['all-reduce'] / psi:11.3f} {row['ms']:9.2f} {util:>6} {peak:>9}"
    )


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU test)")
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--isolate",
        action="store_true",
        help="each setup in a fresh process (the default on a GPU: peak_bytes_in_use is per process)",
    )
    parser.add_argument("--setups", default=",".join(SETUPS), help="comma-separated subset")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    parser.add_argument(
        "--no-xla-flags", action="store_true", help="GPU: run without gpu_overlap_flags"
    )
    parser.add_argument("--only", choices=SETUPS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.setups.split(",")) - set(SETUPS)
    if unknown:
        parser.error(f"--setups: unknown {sorted(unknown)}; choose from {', '.join(SETUPS)}")
    platform = jax.devices()[0].platform
    gpu = platform == "gpu" and not args.tiny
    depth = args.depth or (32 if gpu else 4)
    width = args.width or (8192 if gpu else 64)
    batch = 8 * jax.device_count()
    mesh = jax.make_mesh((jax.device_count(),), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    psi = depth * (width * width + width) * 4
    if args.only is not None:  # the child process of an isolated run: one row, as JSON
        r = run(args.only, depth, width, batch, mesh, args.steps)
        print("ROW " + json.dumps(r))
        return [r]
    if platform != "gpu":
        print(
            f"no GPU found: running on {platform} at tiny sizes; step times and peaks below are "
            "not GPU figures"
        )
    print(
        f"{jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"L={depth} x Linear({width},{width}), "
        f"batch {batch}, f32 Adam; memory per device in MiB, collective bytes / psi"
    )
    kind = jax.devices()[0].device_kind
    peak_tflops = args.peak_tflops or next(
        (v for k, v in PEAK_TFLOPS.items() if kind.startswith(k)), None
    )
    if gpu and not args.no_xla_flags:  # for the child processes only; printed, never hidden
        flags = gpu_overlap_flags(jax.device_count())
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()
        print("XLA_FLAGS += " + " ".join(flags))
    print(HEADER)
    rows = []
    for setup in args.setups.split(","):
        if gpu or args.isolate:
            r = _in_subprocess(setup, sys.argv[1:] if argv is None else list(argv))
        else:
            r = run(setup, depth, width, batch, mesh, args.steps)
        rows.append({"setup": setup, **r})
        print(table_row(rows[-1], psi, peak_tflops), flush=True)
    return rows


if __name__ == "__main__":
    main()
