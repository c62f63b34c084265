"""Starting the same program on many processes: `jax.distributed` plus shared flags.

Every process runs the same script with its own `--process-id`; process 0
also hosts the coordinator. After `initialize`, `jax.devices()` lists every
process's devices, `jax.local_devices()` this process's, and a mesh from
`make_mesh` spans all of them. A single-process run needs none of this:
`initialize` is then a no-op, so scripts can call it unconditionally.
"""

from __future__ import annotations

import argparse

import jax

from nnx_parallel import _compat
from nnx_parallel.errors import ParallelError

_STARTED_TOO_LATE = (
    "JAX has already started its backend in this process, so {what} can no longer change. "
    "Call nnx_parallel.initialize(...) first thing, before any JAX computation, e.g.\n"
    "    import nnx_parallel as npx\n"
    "    npx.initialize('10.0.0.1:1234', num_processes=2, process_id=i)  # before jax.devices(), jnp.*\n"
)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_count: int | None = None,
    timeout_s: int = 300,
) -> bool:
    """Joins this process to a multi-process JAX run (`jax.distributed.initialize`).

    A no-op, apart from `local_device_count`, when `num_processes` is None
    or 1. On CPU, collectives between processes use gloo.

    Args:
      coordinator_address: `host:port` of process 0, reachable from all.
      num_processes: How many processes take part.
      process_id: This process's index, in `[0, num_processes)`.
      local_device_count: CPU devices this process should have (simulated
        devices for testing, like `--xla_force_host_platform_device_count`,
        which it overrides). Must be set before JAX starts its backend.
      timeout_s: Seconds to wait for every process to join.

    Returns:
      True if this call started a multi-process run.

    Raises:
      ParallelError: missing or inconsistent arguments, or JAX already
        started (its device count or process group can no longer change).

    Example:
      >>> initialize()  # one process: nothing to do
      False
      >>> initialize("127.0.0.1:1234", num_processes=2, process_id=2)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      nnx_parallel.errors.ParallelError: initialize: process_id 2 is not in [0, 2). Give each...
    """
    _check_args(coordinator_address, num_processes, process_id)
    if local_device_count is not None:
        _set_local_device_count(local_device_count)
    if num_processes in (None, 1):
        return False
    if _compat.distributed_is_initialized():
        if jax.process_count() == num_processes and jax.process_index() == process_id:
            return False
        raise ParallelError(
            f"initialize: this process already joined a run as process {jax.process_index()} of "
            f"{jax.process_count()}; cannot rejoin as {process_id} of {num_processes}. "
            "Call initialize once per process."
        )
    if _compat.backends_initialized():
        raise ParallelError("initialize: " + _STARTED_TOO_LATE.format(what="the process group"))
    _compat.distributed_initialize(
        coordinator_address, num_processes, process_id, initialization_timeout=timeout_s
    )
    return True


def add_distributed_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds `--coordinator`, `--num-processes`, `--process-id`, `--local-devices`.

    Defaults describe a single process, so scripts run unchanged without them.

    Args:
      parser: The script's parser.

    Returns:
      The same parser.

    Example:
      >>> import argparse
      >>> p = add_distributed_flags(argparse.ArgumentParser())
      >>> p.parse_args(["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "1"])
      Namespace(coordinator='127.0.0.1:1234', num_processes=2, process_id=1, local_devices=None)
    """
    group = parser.add_argument_group("multi-process (jax.distributed)")
    group.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="address of process 0's coordinator (multi-process runs)",
    )
    group.add_argument("--num-processes", type=int, default=1, help="processes in the run")
    group.add_argument("--process-id", type=int, default=0, help="this process's index")
    group.add_argument(
        "--local-devices",
        type=int,
        default=None,
        help="simulated CPU devices per process (testing on one machine)",
    )
    return parser


def initialize_from_args(args: argparse.Namespace) -> bool:
    """`initialize` with the flags of `add_distributed_flags`.

    Args:
      args: Parsed arguments.

    Returns:
      True if a multi-process run was started.

    Example:
      >>> import argparse
      >>> initialize_from_args(add_distributed_flags(argparse.ArgumentParser()).parse_args([]))
      False
    """
    return initialize(
        args.coordinator, args.num_processes, args.process_id, local_device_count=args.local_devices
    )


def _check_args(coordinator_address, num_processes, process_id) -> None:
    if num_processes is not None and num_processes < 1:
        raise ParallelError(f"initialize: num_processes must be >= 1, got {num_processes}.")
    if num_processes in (None, 1):
        return
    if not coordinator_address:
        raise ParallelError(
            f"initialize: num_processes={num_processes} needs a coordinator_address ('host:port' of "
            "process 0, e.g. '127.0.0.1:12345' on one machine) that every process can reach."
        )
    if process_id is None or not 0 <= process_id < num_processes:
        raise ParallelError(
            f"initialize: process_id {process_id} is not in [0, {num_processes}). Give each process "
            f"a distinct id 0..{num_processes - 1}; process 0 hosts the coordinator."
        )


def _set_local_device_count(count: int) -> None:
    if count < 1:
        raise ParallelError(f"initialize: local_device_count must be >= 1, got {count}.")
    if _compat.backends_initialized():
        if jax.local_device_count() == count:
            return
        what = f"the local device count ({jax.local_device_count()}, asked for {count})"
        raise ParallelError("initialize: " + _STARTED_TOO_LATE.format(what=what))
    _compat.set_cpu_device_count(count)
