"""initialize / flags in one process: no-ops and every error branch."""

import argparse

import jax
import pytest

from nnx_parallel import (
    ParallelError,
    add_distributed_flags,
    distributed,
    initialize,
    initialize_from_args,
)


def test_single_process_is_a_noop():
    assert initialize() is False
    assert initialize(num_processes=1, local_device_count=jax.local_device_count()) is False
    args = add_distributed_flags(argparse.ArgumentParser()).parse_args([])
    assert (args.coordinator, args.num_processes, args.process_id, args.local_devices) == (
        None,
        1,
        0,
        None,
    )
    assert initialize_from_args(args) is False


def test_argument_errors():
    with pytest.raises(ParallelError, match="num_processes must be >= 1, got 0"):
        initialize(num_processes=0)
    with pytest.raises(ParallelError, match="num_processes=2 needs a coordinator_address"):
        initialize(num_processes=2, process_id=0)
    with pytest.raises(ParallelError, match=r"process_id None is not in \[0, 2\)"):
        initialize("127.0.0.1:1234", 2)
    with pytest.raises(ParallelError, match="local_device_count must be >= 1, got 0"):
        initialize(local_device_count=0)


def test_too_late_errors():
    jax.devices()  # the backend has started (8 devices)
    with pytest.raises(
        ParallelError, match=r"the local device count \(8, asked for 4\) can no longer change"
    ):
        initialize(local_device_count=4)
    with pytest.raises(
        ParallelError, match="the process group can no longer change. Call nnx_parallel.initialize"
    ):
        initialize("127.0.0.1:1234", num_processes=2, process_id=0)


def test_rejoin_error(monkeypatch):
    monkeypatch.setattr(distributed._compat, "distributed_is_initialized", lambda: True)
    with pytest.raises(
        ParallelError, match="already joined a run as process 0 of 1; cannot rejoin as 1 of 2"
    ):
        initialize("127.0.0.1:1234", num_processes=2, process_id=1)
