"""FSDP vs naive annotation on the accelerators at hand: one command, one table.

Run:  python benchmarks/gpu.py           (under 5 minutes; GPU sizes when a GPU is present)
      python benchmarks/gpu.py --tiny    (tiny sizes; what the test runs on CPU)

For each setup, one jitted Adam train step on L x Linear(W, W) + ReLU, over
a 1D mesh of every local device: compiled temp memory and footprint
(arguments + temp + outputs - aliases, per device), all-gather /
reduce-scatter / all-reduce bytes over psi, median step time, and
`device.memory_stats()["peak_bytes_in_use"]` after the steps (where the
backend reports it). Without a GPU it runs on CPU and says so: its times
and peaks are no GPU figures.
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


def _peak(device) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return None if not stats else stats.get("peak_bytes_in_use")


def run(setup: str, depth: int, width: int, batch: int, mesh, steps: int) -> dict:
    model = fm.build(setup, "unrolled", depth, width, mesh)
    x = fm.batch(mesh, width, batch)
    compiled, opt = fm.compile_step(model, mesh, x)
    mem = compiled.memory_analysis()
    ops = bytes_by_kind(collectives(compiled, mesh))
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
    f"{'setup':6} {'temp':>9} {'footprint':>10} {'all-gather':>11} {'red-scat':>9} "
    f"{'all-reduce':>11} {'step ms':>9} {'peak MiB':>9}"
)


def table_row(row: dict, psi: int) -> str:
    """One line of the table: MiB per device, collective bytes over psi, ms, peak."""
    peak = "n/a" if row["peak"] is None else f"{row['peak'] / 2**20:.1f}"
    return (
        f"{row['setup']:6} {row['temp'] / 2**20:9.2f} {row['footprint'] / 2**20:10.2f} "
        f"{row['all-gather'] / psi:11.3f} {row['reduce-scatter'] / psi:9.3f} "
        f"{row['all-reduce'] / psi:11.3f} {row['ms']:9.2f} {peak:>9}"
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
    parser.add_argument("--only", choices=["fsdp", "naive"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
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
    print(HEADER)
    rows = []
    for setup in ("fsdp", "naive"):
        if gpu or args.isolate:
            r = _in_subprocess(setup, sys.argv[1:] if argv is None else list(argv))
        else:
            r = run(setup, depth, width, batch, mesh, args.steps)
        rows.append({"setup": setup, **r})
        print(table_row(rows[-1], psi), flush=True)
    return rows


if __name__ == "__main__":
    main()
