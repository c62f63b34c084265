"""The call-time runtime's state, in one explicit object per trace.

Everything the hooks remember between calls lives in a `Trace`, held by one
`contextvars.ContextVar`: the route logs `recording()` collects, the keys
already warned about, whether a shape-only probe is running, the prefetch
token one gathered call hands the next, and scoped flags (inside a `Remat`
recompute, inside a replaced attention call). Nothing else in `runtime/` is
mutable module state (`tests/test_structure.py` asserts it), so a retry
that must undo a refused trace takes back one thing: `mark()` /
`take_back()` below.

The default trace lives for the process (warnings are once per process, as
before); `fresh()` starts a new one (each test gets its own, see
`conftest.py`).

Example:
  >>> from nnx_parallel.runtime import trace
  >>> with trace.fresh() as t, trace.flagged("recomputed"):
  ...     trace.has("recomputed"), t is trace.current()
  (True, True)
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import warnings
from typing import Any

from nnx_parallel import _compat


class FallbackWarning(UserWarning):
    """A hook fell back to a correct but costlier layout."""


@dataclasses.dataclass
class Trace:
    """What the hooks remember while models are traced.

    Attributes:
      logs: The open `recording()` logs; each gets `(class, method, route)`.
      warned: Keys `warn_once` has warned about.
      probing: Depth of shape-only probes running (hooks step aside).
      token: `(trace state, token)` of the last gathered call (prefetch).
      flags: Scoped markers (`flagged`): names, with repeats for nesting.
    """

    logs: list = dataclasses.field(default_factory=list)
    warned: set = dataclasses.field(default_factory=set)
    probing: int = 0
    token: tuple = (None, None)
    flags: list = dataclasses.field(default_factory=list)


_CURRENT = contextvars.ContextVar("nnx_parallel_trace")


def current() -> Trace:
    """The trace in effect (the process's own, made on first use)."""
    trace = _CURRENT.get(None)
    if trace is None:
        trace = Trace()
        _CURRENT.set(trace)
    return trace


@contextlib.contextmanager
def fresh():
    """A new, empty `Trace` in effect inside."""
    reset = _CURRENT.set(Trace())
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(reset)


@contextlib.contextmanager
def recording():
    """Collects `(class name, method, route)` for every hooked call traced inside.

    Routes are `runtime/routes.py`'s names; wrappers (`wrapper:remat`,
    `wrapper:guard`) and retries (`retry:<route>`, the route a refused trace
    had) are recorded apart, before the route taken inside them.

    Example:
      >>> layer = parallelize(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), mesh8, ColumnParallel())
      >>> with recording() as routes, jax.set_mesh(mesh8):
      ...     _ = jax.jit(lambda x: layer(x))(jax.numpy.ones((2, 16)))
      >>> routes
      [('ParallelLinear', '__call__', 'as-written/as-is/constrained')]
    """
    log: list[tuple[str, str, str]] = []
    logs = current().logs
    logs.append(log)
    try:
        yield log
    finally:
        logs.remove(log)


def record(module, method: str, name: str) -> None:
    """Notes that `module.method` took route (or wrapper) `name`, unless probing."""
    trace = current()
    if trace.probing:
        return
    for log in trace.logs:
        log.append((type(module).__name__, method, name))


@contextlib.contextmanager
def probe():
    """Hooks step aside (and record nothing) while a call is traced for shapes only."""
    trace = current()
    trace.probing += 1
    try:
        yield
    finally:
        trace.probing -= 1


def probing() -> bool:
    return current().probing > 0


@contextlib.contextmanager
def flagged(name: str):
    """`has(name)` is true inside (scoped, nestable)."""
    flags = current().flags
    flags.append(name)
    try:
        yield
    finally:
        flags.pop()


def has(name: str) -> bool:
    return name in current().flags


def warn_once(key: Any, message: str, stacklevel: int = 5) -> None:
    """Warns with a `FallbackWarning` once per trace context for each `key`."""
    warned = current().warned
    if key not in warned:
        warned.add(key)
        warnings.warn(message, FallbackWarning, stacklevel=stacklevel)


# Prefetch: the token of the last gathered call in the current JAX trace ---------------


def last_token() -> Any:
    """The token of the previous gathered call in this JAX trace, or None."""
    state, token = current().token
    return token if state is not None and state == _compat.trace_state() else None


def set_last_token(token: Any) -> None:
    current().token = (_compat.trace_state(), token)


# Take-back: what a refused trace wrote is undone before a retry ------------------------


@dataclasses.dataclass(frozen=True)
class Mark:
    """How far the trace's logs were, and its token, at `mark()`."""

    lengths: tuple
    token: tuple


def mark() -> Mark:
    trace = current()
    return Mark(tuple(len(log) for log in trace.logs), trace.token)


def take_back(at: Mark) -> None:
    """Undoes what the logs and the prefetch token got after `at` (warnings
    already issued stay issued)."""
    trace = current()
    for log, n in zip(trace.logs, at.lengths):
        del log[n:]
    trace.token = at.token
