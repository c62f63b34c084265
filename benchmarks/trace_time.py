"""How often a hooked call is traced, and how long tracing a train step takes, before and after.

Run:  python benchmarks/trace_time.py                 (this tree against BASE, ~4 min)
      python benchmarks/trace_time.py --base 346f959 --rounds 2

The model is the GPT of `examples/train_gpt.py` with 8 blocks (d = 256, 8
heads, vocab 512, sequence 128, batch 32) and its Adam train step, on 8 CPU
devices, under each `--parallel` plan of that example (dp, fsdp, tp, 2d),
on Explicit and on Auto mesh axes. For each, one worker process:

- counts the calls of `nnx.Linear.__call__`'s body while `jax.jit` traces
  the train step once, over the number of Linear layers: how many times
  each hooked call is traced (the real call, plus shape probes);
- times `train_step.lower(...)` (trace and lower, no compile) on a fresh
  `nnx.jit` three times and keeps the median.

The baseline (`--base`, a git revision, checked out into a temporary
worktree) and this tree run in the same invocation, interleaved round by
round, so the ratio compares like with like on this machine. Trace time is
host time: it is the same work on a GPU or TPU host.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
KINDS = ("dp", "fsdp", "tp", "2d")


def worker(axis: str) -> None:
    """Measures every plan on one axis type; prints one JSON line per plan."""
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    sys.path.insert(0, str(ROOT / "examples"))
    import train_gpt as ex

    import nnx_parallel as npx

    calls = [0]
    original = nnx.Linear.__call__

    def counted(self, *a, **kw):
        calls[0] += 1
        return original(self, *a, **kw)

    nnx.Linear.__call__ = counted  # before parallelize: hooked classes wrap it
    kind_of = {"explicit": jax.sharding.AxisType.Explicit, "auto": jax.sharding.AxisType.Auto}
    real_make_mesh = jax.make_mesh

    def make_mesh(shape, names, **kw):
        return real_make_mesh(shape, names, axis_types=(kind_of[axis],) * len(names))

    jax.make_mesh = make_mesh
    for kind in KINDS:
        model = ex.GPT(512, 256, 8, 8, 128, rngs=nnx.Rngs(0))
        mesh, batch_axis, plan, vocab_parallel = ex.setup(kind, model)
        loss_fn = ex.reference_loss
        if vocab_parallel:  # as the example: loss-parallel cross-entropy

            def loss_fn(m, batch, mesh=mesh):
                return npx.cross_entropy(m(batch[:, :-1]), batch[:, 1:], mesh, "model").mean()

        model = npx.parallelize(model, mesh, plan)
        optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
        n_linear = sum(isinstance(m, nnx.Linear) for _, m in nnx.iter_graph(model))
        with jax.set_mesh(mesh):
            rows = jnp.zeros((32, 129), jnp.int32)
            spec = jax.sharding.PartitionSpec(batch_axis)
            batch = jax.device_put(rows, jax.sharding.NamedSharding(mesh, spec))
            times = []
            for i in range(3):
                step = ex.make_train_step(loss_fn)
                calls[0] = 0
                start = time.perf_counter()
                step.lower(model, optimizer, batch)
                times.append(time.perf_counter() - start)
                if i == 0:
                    per_call = calls[0] / n_linear
        print(json.dumps({"kind": kind, "per_call": per_call, "seconds": statistics.median(times)}))
        sys.stdout.flush()


def run(src: pathlib.Path, axis: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run(
        [sys.executable, __file__, "--worker", axis],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=tempfile.gettempdir(),
    ).stdout
    return {r["kind"]: r for r in map(json.loads, out.strip().splitlines())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="346f959", help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", choices=["explicit", "auto"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    with tempfile.TemporaryDirectory() as tmp:
        base = pathlib.Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", str(base), args.base])
        try:
            results = {}
            for _ in range(args.rounds):
                for axis in ("explicit", "auto"):
                    for name, src in (("base", base / "src"), ("this", ROOT / "src")):
                        for kind, r in run(src, axis).items():
                            results.setdefault((axis, kind, name), []).append(r)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)])
    print(f"GPT, 8 blocks, Adam train step; base {args.base} vs this tree; {args.rounds} rounds")
    print(
        f"{'axes':<9}{'plan':<6}{'traces/call base':>17}{'this':>6}"
        f"{'trace s base':>14}{'this':>7}{'this/base':>11}"
    )
    for axis in ("explicit", "auto"):
        for kind in KINDS:
            b, t = results[(axis, kind, "base")], results[(axis, kind, "this")]
            sb = statistics.median(r["seconds"] for r in b)
            st = statistics.median(r["seconds"] for r in t)
            print(
                f"{axis:<9}{kind:<6}{b[0]['per_call']:>17.2f}{t[0]['per_call']:>6.2f}"
                f"{sb:>14.2f}{st:>7.2f}{st / sb:>11.2f}"
            )


if __name__ == "__main__":
    main()
