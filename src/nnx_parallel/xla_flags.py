"""XLA GPU flags that decide whether FSDP's collectives overlap compute.

Nothing here sets anything: `gpu_overlap_flags` returns the flags, and the
user puts them in `XLA_FLAGS` before JAX starts its GPU backend (they are
read once, when the backend is created). They are GPU flags: set them for a
process that runs on GPUs (on TPU the equivalents go in `LIBTPU_INIT_ARGS`).
`benchmarks/gpu.py` sets them for its GPU child processes, and says so.

What each flag does (XLA's `debug_options_flags.cc` holds the defaults; the
same set is what MaxText's and NVIDIA's JAX-Toolbox GPU recipes set):

- `--xla_gpu_enable_latency_hiding_scheduler=true`: schedule async
  collectives early and their consumers late, so an all-gather for the next
  unit runs while this unit computes.
- `--xla_gpu_all_gather_combine_threshold_bytes`,
  `--xla_gpu_reduce_scatter_combine_threshold_bytes`,
  `--xla_gpu_all_reduce_combine_threshold_bytes`: merge collectives that
  are ready together into one launch up to this many bytes. FSDP units
  already group their leaves (one all-gather per unit per dtype); the
  threshold must be at least one unit's bytes or XLA splits them again.
- `--xla_gpu_enable_pipelined_all_gather=true`,
  `--xla_gpu_enable_pipelined_reduce_scatter=true`,
  `--xla_gpu_enable_pipelined_all_reduce=true`: in a scanned layer stack
  (`nnx.scan`), move iteration i+1's all-gather (and iteration i-1's
  reduce-scatter) into iteration i, across the loop boundary.
- `--xla_gpu_enable_while_loop_double_buffering=true`: unroll scanned
  loops by two so the pipelined collectives have somewhere to go.

Example:
  >>> flags = gpu_overlap_flags(devices=8, combine_bytes=2**30)
  >>> flags[0]
  '--xla_gpu_enable_latency_hiding_scheduler=true'
  >>> [f for f in flags if "all_gather_combine" in f]
  ['--xla_gpu_all_gather_combine_threshold_bytes=134217728']
"""

from __future__ import annotations

from nnx_parallel.errors import PlanError


def gpu_overlap_flags(devices: int, combine_bytes: int = 2**30) -> list[str]:
    """The XLA GPU flags for overlapped FSDP collectives, as a list of strings.

    Args:
      devices: The number of devices FSDP shards over (the mesh axis size, or
        all devices for FSDP over every axis). The all-gather threshold is
        `combine_bytes / devices` (each device contributes that share) and
        the reduce-scatter threshold half of it, as NVIDIA's recipes set them.
      combine_bytes: The all-reduce combine threshold, in bytes.

    Returns:
      Flags to join with spaces into `XLA_FLAGS`:
      `os.environ["XLA_FLAGS"] += " " + " ".join(gpu_overlap_flags(8))`,
      before the first JAX call that starts the GPU backend.

    Raises:
      PlanError: `devices` or `combine_bytes` is not a positive int.
    """
    for name, value in (("devices", devices), ("combine_bytes", combine_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlanError(
                f"gpu_overlap_flags({name}={value!r}): expected a positive int. Pass the FSDP "
                "axis size as devices=, and bytes as combine_bytes=."
            )
    return [
        "--xla_gpu_enable_latency_hiding_scheduler=true",
        f"--xla_gpu_all_reduce_combine_threshold_bytes={combine_bytes}",
        f"--xla_gpu_all_gather_combine_threshold_bytes={combine_bytes // devices}",
        f"--xla_gpu_reduce_scatter_combine_threshold_bytes={combine_bytes // (2 * devices)}",
        "--xla_gpu_enable_pipelined_all_gather=true",
        "--xla_gpu_enable_pipelined_reduce_scatter=true",
        "--xla_gpu_enable_pipelined_all_reduce=true",
        "--xla_gpu_enable_while_loop_double_buffering=true",
    ]
