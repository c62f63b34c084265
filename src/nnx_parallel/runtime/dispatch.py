"""Call-time dispatch: which path a hooked module's call takes, and why.

A hooked method (see `runtime/install.py`) runs `run(...)`, which picks one
route from the table below at trace time, the first whose condition holds. The choice depends on the hooks,
on the axis types of the mesh, on the inputs and on whether an enclosing
module is already manual. Every route has a name; `recording()` lists the
routes a trace took, and each has a test of its own (tests/test_dispatch.py).

- `plain`: probing output shapes, or hooks with nothing to do for this
  method: the method as written.
- `remat` (`Remat` style): not a route but a wrapper: the call, on its
  own route, runs inside a `custom_vjp` that recomputes it in backward
  (`runtime/remat.py`); recorded before the route it wraps.
- `layout.*`: activation layouts only (no FSDP gather); see below.
- `fsdp.tp-manual`: FSDP x TP on a local-safe layer (`layers.local_safe`):
  one fully manual shard_map that gathers only the FSDP axis and sums the
  tensor-parallel partial results itself.
- `fsdp.auto-axes`: FSDP plus a layout on Explicit axes: gather and layout
  run inside `auto_axes`; the output gets the layout.
- `fsdp.nested`: FSDP inside an enclosing module's shard_map that is
  already manual over our axes: all-gather our own params there.
- `fsdp.shard-map`: FSDP whose batch splits over the batch axes: a
  shard_map over them; params all-gathered, gradients reduce-scattered.
- `fsdp.gspmd`: FSDP whose call holds state or whose batch does not split
  (a `FallbackWarning`): sharding constraints, and GSPMD all-reduces the
  gradients.
- `fsdp.own-sharding`: FSDP whose module code names a batch axis that is
  manual inside our shard_map (its own `with_sharding_constraint`,
  `reshard` or `out_sharding=`): JAX refuses it there, so the call is
  traced again on the GSPMD route (`runtime/explicit.py`).
- `guard.auto-axes` (the root on Explicit axes): not a route but a retry:
  where JAX's sharding-in-types refuses the model's own code, the whole
  call, on its own route, is traced again inside `auto_axes`
  (`runtime/guard.py`); recorded before the routes taken inside.

- `expert.local`, `expert.gspmd`, `expert.auto-axes` (`ExpertParallel`): the
  MoE layer's call in a shard_map with per-device expert slices (tokens
  gathered, outputs reduce-scattered), or as written on the sharded stacks
  (with its other hooks), or that inside `auto_axes` where Explicit axes
  refuse the code (`runtime/experts.py`).

The layout routes (`runtime/layout.py`): `layout.caller` (the caller's own
`out_sharding=` wins), `layout.as-written` (no output layout or no array
input), `layout.constrain` (Auto axes: sharding constraints),
`layout.out-sharding` (Explicit: passed to a layer that takes it) and
`layout.auto-axes` (Explicit: the call runs in `auto_axes`).

The context-parallel routes (`runtime/context.py`, the `ContextParallel`
style): `context.constrain` (Auto axes), `context.auto-axes` (Explicit: the
attention call runs in `auto_axes`), `context.decode` (a decoding call runs
as written, warned once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect

import jax
from flax import nnx

from nnx_parallel.core import layers
from nnx_parallel.core.layouts import HOOKS_ATTR, Layout, ModuleHooks
from nnx_parallel.runtime import context, experts, explicit, fsdp, guard, layout, remat

PLAIN = "plain"
REMAT = "remat"  # not a route of its own: wraps the route below in a recompute
FSDP_NESTED = "fsdp.nested"
FSDP_TP_MANUAL = "fsdp.tp-manual"
FSDP_AUTO_AXES = "fsdp.auto-axes"
FSDP_SHARD_MAP = "fsdp.shard-map"
FSDP_GSPMD = "fsdp.gspmd"
FSDP_OWN_SHARDING = "fsdp.own-sharding"
GUARD_AUTO_AXES = guard.AUTO_AXES

ROUTES = (
    PLAIN,
    REMAT,
    FSDP_NESTED,
    FSDP_TP_MANUAL,
    FSDP_AUTO_AXES,
    FSDP_SHARD_MAP,
    FSDP_GSPMD,
    FSDP_OWN_SHARDING,
    GUARD_AUTO_AXES,
    layout.CALLER,
    layout.AS_WRITTEN,
    layout.CONSTRAIN,
    layout.OUT_SHARDING,
    layout.AUTO_AXES,
    *context.ROUTES,
    *experts.ROUTES,
)

_records: list[list[tuple[str, str, str]]] = []


@contextlib.contextmanager
def recording():
    """Collects `(class name, method, route)` for every hooked call traced inside.

    Example:
      >>> layer = parallelize(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), mesh8, ColumnParallel())
      >>> with recording() as routes, jax.set_mesh(mesh8):
      ...     _ = jax.jit(lambda x: layer(x))(jax.numpy.ones((2, 16)))
      >>> routes
      [('ParallelLinear', '__call__', 'layout.constrain')]
    """
    log: list[tuple[str, str, str]] = []
    _records.append(log)
    try:
        yield log
    finally:
        _records.remove(log)


def _note(module, name: str, route: str) -> None:
    for log in _records:
        log.append((type(module).__name__, name, route))


def wrap(method, name: str):
    """`method` of a hooked class: runs through `run` with the class's hooks."""

    @functools.wraps(method)
    def hooked(self, *args, **kwargs):
        if layout.probing():
            _note(self, name, PLAIN)
            return method(self, *args, **kwargs)
        hooks: ModuleHooks = getattr(type(self), HOOKS_ATTR)
        if hooks.guard:
            record = functools.partial(_note, self, name)
            call = functools.partial(_call, method, name, hooks)
            return guard.guarded(self, call, name, hooks.mesh, args, kwargs, record, _records)
        return _call(method, name, hooks, self, *args, **kwargs)

    return hooked


def _call(method, name: str, hooks: ModuleHooks, module, *args, **kwargs):
    """The hooked call on its route, inside a recompute for the `Remat` style."""
    if hooks.guard_only:
        return method(module, *args, **kwargs)  # a root with only the guard
    if hooks.remat is not None and name == "__call__":
        _note(module, name, REMAT)

        def call(m, *a, **kw):
            return run(m, method, name, hooks, a, kw)

        return remat.recompute_call(module, call, hooks.remat, args, kwargs)
    return run(module, method, name, hooks, args, kwargs)


def static_route(module, hooks: ModuleHooks, explicit: bool) -> str:
    """The route a hooked module's `__call__` takes, as far as it is known
    before any input is seen (for `explain`); what depends on the inputs is
    named with the alternatives. The guarded root names its retry.

    Example:
      >>> from nnx_parallel.core.layouts import get_hooks
      >>> layer = parallelize(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), mesh8, ColumnParallel())
      >>> static_route(layer, get_hooks(layer), explicit=False)
      'layout.constrain'
    """
    route = _static_route(module, hooks, explicit)  # `plain` for a root with only the guard
    if hooks.guard:
        return f"{route}; where Explicit types refuse the model's code: {GUARD_AUTO_AXES}"
    return route


def _static_route(module, hooks: ModuleHooks, explicit: bool) -> str:
    lay, gather = hooks.layout, hooks.gather
    if hooks.context is not None:
        return context.AUTO_AXES if explicit else context.CONSTRAIN
    if hooks.experts is not None:
        return f"{experts.LOCAL} (else {experts.GSPMD} where the call uses whole stacks)"
    if gather is None:
        if lay is None or lay.output is None:
            return PLAIN if lay is None else layout.AS_WRITTEN
        if not explicit or lay.force_auto:
            return layout.CONSTRAIN
        accepts = "out_sharding" in inspect.signature(type(module).__call__).parameters
        return layout.OUT_SHARDING if accepts else layout.AUTO_AXES
    if lay is not None and layers.local_safe(module):
        return f"{FSDP_TP_MANUAL} (else {FSDP_AUTO_AXES if explicit else FSDP_SHARD_MAP})"
    if lay is not None and explicit:
        return FSDP_AUTO_AXES
    if jax.tree.leaves(nnx.state(module, nnx.Not(nnx.Param))):
        return f"{FSDP_GSPMD} (it holds state)"
    return f"{FSDP_SHARD_MAP} (else {FSDP_GSPMD} or {FSDP_OWN_SHARDING}, at trace time)"


def choose(module, hooks: ModuleHooks, lay: Layout | None, args, kwargs) -> str:
    """The FSDP route of a call with a gather (see the table above)."""
    mesh = hooks.mesh
    if lay is not None and fsdp.local_ok(module, hooks, mesh, args, kwargs):
        return FSDP_TP_MANUAL
    if lay is not None and layout.explicit_here(mesh) and args and layout.is_array(args[0]):
        return FSDP_AUTO_AXES
    if fsdp.nested(hooks.gather):
        return FSDP_NESTED
    return FSDP_SHARD_MAP  # `fsdp.batch_call` may still fall back to FSDP_GSPMD


def run(module, method, name: str, hooks: ModuleHooks, args, kwargs):
    """Runs one hooked call on its route."""
    mesh = hooks.mesh
    lay = hooks.layout if name == "__call__" else None
    record = functools.partial(_note, module, name)
    if hooks.context is not None and name == "__call__":
        return context.run(module, method, hooks.context, mesh, args, kwargs, record, _records)
    if hooks.experts is not None and name == "__call__":
        return _expert_call(module, method, name, hooks, args, kwargs, record)
    if hooks.gather is None:
        if lay is None:
            record(PLAIN)
            return method(module, *args, **kwargs)
        return layout.with_layout(method, lay, mesh, record)(module, *args, **kwargs)
    route = choose(module, hooks, lay, args, kwargs)
    if route == FSDP_TP_MANUAL:
        record(route)
        return fsdp.local_call(module, method, hooks, mesh, args, kwargs)
    if route == FSDP_AUTO_AXES:
        record(route)
        return _fsdp_in_auto_axes(module, method, hooks, lay, args, kwargs)
    call = method if lay is None else layout.with_layout(method, lay, mesh)
    if route == FSDP_NESTED:
        record(route)
        return fsdp.nested_call(module, call, hooks.gather, args, kwargs)
    return _over_batch(module, call, hooks.gather, mesh, args, kwargs, record)


def _expert_call(module, method, name: str, hooks: ModuleHooks, args, kwargs, record):
    """`ExpertParallel`: the `expert.*` routes (`runtime/experts.py`); the
    module's other hooks (FSDP, layouts) run on the GSPMD route."""
    rest = dataclasses.replace(hooks, experts=None)

    def rest_call(m, a, kw):
        if rest.gather is None and rest.layout is None:
            return method(m, *a, **kw)
        return run(m, method, name, rest, a, kw)

    return experts.call(module, method, hooks, args, kwargs, record, rest_call)


def _over_batch(module, call, gather, mesh, args, kwargs, record=None):
    """The shard_map route, or a GSPMD one (`fsdp.batch_call`, `explicit.call_or_gspmd`)."""
    out, fallback, own = explicit.call_or_gspmd(module, call, gather, mesh, args, kwargs)
    if record is not None:
        record(FSDP_OWN_SHARDING if own else FSDP_GSPMD if fallback else FSDP_SHARD_MAP)
    return out


def _fsdp_in_auto_axes(module, method, hooks: ModuleHooks, lay: Layout, args, kwargs):
    """Explicit axes: run the gather + layout with Auto axes inside and give
    the result the layout's sharding (JAX cannot yet transpose a gather
    inside a partly-manual shard_map over Explicit axes)."""
    mesh = hooks.mesh
    x = args[0]
    full = layout.full_spec(x, lay.output or (), mesh, x.ndim + lay.rank_delta, lay.out_from)
    inner = layout.with_layout(method, dataclasses.replace(lay, force_auto=True), mesh)

    def call(clone, *a, **kw):
        if fsdp.nested(hooks.gather):
            return fsdp.nested_call(clone, inner, hooks.gather, a, kw)
        return _over_batch(clone, inner, hooks.gather, mesh, a, kw)

    return layout.run_in_auto_axes(module, call, layout.drop_manual(full), mesh, args, kwargs)
