"""Checkpoint faults: orbax threads after a failed save, two managers on one directory.

Issue 24 f and g. Two parts:

**Threads after a failed save.**
Orbax runs the parts of a save in `_SignalingThread`s (non-daemon) that
first wait, up to 300 s, for signals such as "the step directory exists". If
the save fails before it sends them (a directory it cannot create), they
keep waiting, and the interpreter waits for them at exit: a failed save cost
about 305 s at exit. `release` sends the signals that the threads a failed save
started wait for, so they run at once (and fail: their directory is not
there) and end.

This reads orbax internals (`orbax.checkpoint._src.futures.future`, checked
against orbax-checkpoint 0.12.8); where they are missing it does nothing.

**Two writers on one directory.** Opening an orbax manager on a directory
deletes its temporary step directories (left by a crash), which deletes the
save another manager has in flight there; two managers also do not see each
other's steps in flight. `writers` keeps every open `CheckpointManager` per
directory in this process, and `settle` waits for the others' saves before
a manager opens or saves, so nothing in flight is deleted and a step saved
twice is refused by the step check, with our error. Other processes are not
seen: one directory has one writing process.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator

JOIN_SECONDS = 10.0  # released threads return at once; this only bounds a surprise


def _signaling_threads(exclude: set) -> list:
    try:
        from orbax.checkpoint._src.futures import future
    except ImportError:  # another orbax layout: nothing we know how to release
        return []
    cls = getattr(future, "_SignalingThread", None)
    if cls is None:
        return []
    return [t for t in threading.enumerate() if isinstance(t, cls) and t not in exclude]


def release(started: list) -> None:
    """Wakes `started` (orbax signaling threads) and joins them."""
    from orbax.checkpoint._src.futures import future

    for thread in started:
        # Not `thread.cancel()`: a cancelled thread never awaits its coroutine (a
        # RuntimeWarning at exit). Woken, it runs, fails on the missing directory, ends.
        signals = getattr(thread, "_receive_signals", None) or ()
        future.set_signals(signals, operation_id=thread._operation_id)
    for thread in started:
        threading.Thread.join(thread, JOIN_SECONDS)


def started_since(before: set) -> list:
    """The orbax signaling threads alive now that were not in `before`."""
    return [t for t in _signaling_threads(before) if t.is_alive()]


@contextlib.contextmanager
def released_on_error(threads: list) -> Iterator[None]:
    """Runs a save or a wait; if it raises, releases `threads` and those started meanwhile."""
    before = set(threading.enumerate())
    try:
        yield
    except BaseException:
        release([t for t in [*threads, *started_since(before)] if t.is_alive()])
        raise


# Two writers on one directory ---------------------------------------------------

_WRITERS: dict[str, weakref.WeakSet] = {}


def writers(directory: str) -> weakref.WeakSet:
    """The open `CheckpointManager`s writing to `directory` in this process."""
    return _WRITERS.setdefault(directory, weakref.WeakSet())


def settle(manager, directory: str) -> bool:
    """Waits for every other writer's save in flight in `directory`; True if there are others.

    An error of that save is kept for its own manager (raised by its next
    `wait`, `save` or `close`), not raised here.
    """
    others = [m for m in list(writers(directory)) if m is not manager]
    for other in others:
        try:
            other._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - the other manager's error, kept for it
            other._deferred = e
    return bool(others)
