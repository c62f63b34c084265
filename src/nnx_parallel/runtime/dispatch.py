"""Call-time dispatch: one decision, one executor, one retry table.

A hooked method (see `runtime/install.py`) runs `wrap`'s body:

1. the wrappers, recorded apart from routes: the root's Explicit-axes guard
   (`wrapper:guard`, only recorded when it retries) and `Remat`
   (`wrapper:remat`, `runtime/remat.py`);
2. the decision: `routes.route(module, hooks, trace, args, kwargs)`;
3. `execute`, which runs that route and nothing else;
4. where the route fails in a way `RETRIES` names (matched on error types,
   never on message text), one take-back (the state of the module and of
   modules passed in the arguments, the route records, the prefetch token)
   and the fallback route, recorded in its place.

`describe` is what `explain` prints: the route `route(..., args=None)`
chooses and every route the arguments or a retry can turn it into, so the
routes a trace records (`trace.recording()`) are always among those it
lists (`tests/test_routes.py` checks this on every model of the suite).
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable

from flax import nnx

from nnx_parallel import _compat
from nnx_parallel.core.layouts import HOOKS_ATTR, ModuleHooks
from nnx_parallel.runtime import (
    context,
    experts,
    experts_a2a,
    fsdp,
    fsdp_tp,
    layout,
    regions,
    remat,
    trace,
)
from nnx_parallel.runtime import routes as R
from nnx_parallel.runtime.batch import NotPerShard
from nnx_parallel.runtime.experts import NotLocal
from nnx_parallel.runtime.flat import Flat
from nnx_parallel.runtime.trace import recording

__all__ = ("RETRIES", "Retry", "describe", "execute", "possible", "recording", "wrap")


def _sharding_types(error: BaseException, hooks: ModuleHooks) -> bool:
    """JAX's sharding-in-types refusal, on Explicit axes outside our manual regions."""
    return _compat.is_sharding_type_error(error) and regions.active(hooks.mesh)


def _is(kind: type) -> Callable[[BaseException, ModuleHooks], bool]:
    return lambda error, hooks: isinstance(error, kind)


@dataclasses.dataclass(frozen=True)
class Retry:
    """Where `source` fails with an error `matches` accepts, run `target`."""

    source: str
    matches: Callable[[BaseException, ModuleHooks], bool]
    target: str
    why: str


RETRIES = (
    Retry(R.FSDP_SHARD_MAP.name, _is(NotPerShard), R.FSDP_GSPMD.name, "not per batch shard"),
    Retry(
        R.FSDP_SHARD_MAP_LAYOUT.name,
        _is(NotPerShard),
        R.FSDP_GSPMD_LAYOUT.name,
        "not per batch shard",
    ),
    Retry(
        R.FSDP_AUTO_AXES.name, _is(NotPerShard), R.FSDP_AUTO_AXES_GSPMD.name, "not per batch shard"
    ),
    Retry(R.EXPERTS_ALL_TO_ALL.name, _sharding_types, R.EXPERTS_AUTO_AXES.name, "Explicit types"),
    Retry(R.EXPERTS_ALL_TO_ALL.name, _is(NotLocal), R.EXPERTS_MANUAL.name, "no top-k to route by"),
    Retry(R.EXPERTS_MANUAL.name, _sharding_types, R.EXPERTS_AUTO_AXES.name, "Explicit types"),
    Retry(R.EXPERTS_MANUAL.name, _is(NotLocal), R.EXPERTS_AS_WRITTEN.name, "whole stacks"),
    Retry(
        R.EXPERTS_AS_WRITTEN.name, _sharding_types, R.EXPERTS_AUTO_AXES_GSPMD.name, "Explicit types"
    ),
    Retry(R.GUARD, _sharding_types, R.AUTO_AXES.name, "Explicit types"),
)

_BY_NAME = types.MappingProxyType({r.name: r for r in R.ROUTES})


def retries(source: str) -> tuple[Retry, ...]:
    return tuple(r for r in RETRIES if r.source == source)


# Describing ------------------------------------------------------------------------


def possible(module, hooks: ModuleHooks, name: str = "__call__") -> tuple[str, ...]:
    """Every route (and wrapper) a call of `module.name` can record, the
    first the one chosen before any input is seen."""
    first = R.route(module, hooks, trace.Trace(), name=name)
    seen = [R.REMAT] if hooks.remat is not None and name == "__call__" else []
    todo = [first.name]
    while todo:
        current = todo.pop(0)
        if current in seen:
            continue
        seen.append(current)
        todo += [r.target for r in retries(current)]
        todo += [r.name for r in R.ALTERNATIVES.get(_BY_NAME[current], ())]
        if current in (R.EXPERTS_AS_WRITTEN.name, R.EXPERTS_AUTO_AXES_GSPMD.name):
            rest = dataclasses.replace(hooks, experts=None, remat=None)
            if rest.gather is not None or rest.layout is not None:
                todo += list(possible(module, rest, name))
        if current == R.EXPERTS_AUTO_AXES.name:
            todo.append(first.name)
    if hooks.guard:
        seen.append(R.GUARD)
    return tuple(seen)


def describe(module, hooks: ModuleHooks, name: str = "__call__") -> str:
    """The route `explain` prints for `module.name`, then what else it can take.

    Example:
      >>> from nnx_parallel.core.layouts import get_hooks
      >>> layer = parallelize(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), mesh8, ColumnParallel())
      >>> describe(layer, get_hooks(layer))
      'as-written/as-is/constrained (else as-written/as-is/caller, as-written/as-is/as-is)'
    """
    names = [n for n in possible(module, hooks, name) if n != R.REMAT]
    if hooks.guard_only:
        return f"{R.GUARD}: {R.AS_WRITTEN.name}, else in {R.AUTO_AXES.name}"
    text = names[0] + (f" (else {', '.join(names[1:])})" if len(names) > 1 else "")
    return f"{R.REMAT}: {text}" if R.REMAT in possible(module, hooks, name) else text


# Running ---------------------------------------------------------------------------


def wrap(method, name: str):
    """`method` of a hooked class: runs through the hooks on its route."""

    @functools.wraps(method)
    def hooked(self, *args, **kwargs):
        hooks: ModuleHooks = getattr(type(self), HOOKS_ATTR)
        if hooks.guard and not trace.probing() and regions.active(hooks.mesh):
            return _guarded(self, method, name, hooks, args, kwargs)
        return _remat(self, method, name, hooks, args, kwargs)

    return hooked


def _remat(module, method, name: str, hooks: ModuleHooks, args, kwargs):
    """The call on its route, inside a recompute for the `Remat` style."""
    if hooks.guard_only:
        return method(module, *args, **kwargs)  # a root with only the guard
    if hooks.remat is None or name != "__call__" or trace.probing():
        return _run(module, method, name, hooks, args, kwargs)
    trace.record(module, name, R.REMAT)

    def call(m, *a, **kw):
        return _run(m, method, name, hooks, a, kw)

    return remat.recompute_call(module, call, hooks.remat, args, kwargs)


def _run(module, method, name: str, hooks: ModuleHooks, args, kwargs, first=None):
    """The call on its route; on an error `RETRIES` names, taken back and run
    on the fallback route."""
    r = first or R.route(module, hooks, trace.current(), args, kwargs, name)
    while True:
        fallbacks = retries(r.name)
        undo = _undo(module, args, kwargs) if fallbacks else None
        trace.record(module, name, r.name)
        try:
            return execute(r, module, method, name, hooks, args, kwargs)
        except Exception as error:  # noqa: BLE001 - only what RETRIES names is retried
            retry = _taken_back(error, r.name, module, name, hooks, undo)
            if retry is None:
                raise
            r = _BY_NAME[retry.target]


def _undo(module, args, kwargs):
    """A function that puts back what a refused trace changed: the variables
    of `module` and of modules in the arguments (only those it rewrote, so a
    module closed over by `jax.jit` is left alone), the records, the token."""
    nodes = (module,) + Flat.of((args, kwargs)).nodes
    saved = [
        (var, var.get_value()) for _, var in nnx.iter_graph(nodes) if isinstance(var, nnx.Variable)
    ]
    at = trace.mark()

    def undo():
        for var, value in saved:
            if var.get_value() is not value:
                var.set_value(value)
        trace.take_back(at)

    return undo


def _taken_back(error, source: str, module, name: str, hooks: ModuleHooks, undo):
    """The retry of `source` that `error` matches, after the take-back and its
    warning; None where no retry matches (the caller re-raises)."""
    retry = next((f for f in retries(source) if f.matches(error, hooks)), None)
    if retry is not None:
        undo()
        _warn(module, name, retry, error)
    return retry


def _warn(module, name: str, retry: Retry, error: BaseException) -> None:
    if isinstance(error, NotPerShard):
        fsdp.warn_gspmd(module, str(error))
    elif retry.source == R.EXPERTS_ALL_TO_ALL.name and isinstance(error, NotLocal):
        where = f"{fsdp.base_name(module)}.{name}"
        trace.warn_once(
            (where, "all-to-all"),
            f"ExpertParallel(capacity_factor=...) on {where}: no all-to-all dispatch ({error}); "
            "the tokens are gathered over the expert axis instead (exact, ep/(k x capacity) "
            "times the bytes).",
            stacklevel=6,
        )
    elif retry.source == R.GUARD:
        first = str(error).strip().splitlines()[0][:200]
        where = f"{type(module).__name__}.{name}"
        trace.warn_once(
            (where, "guard"),
            f"{where}: JAX's Explicit axes refuse this call's own code ({first}); tracing it "
            "again inside auto_axes, where GSPMD picks the layouts; outputs come "
            "back batch-sharded like the input (or replicated).",
            stacklevel=6,
        )


def _guarded(module, method, name: str, hooks: ModuleHooks, args, kwargs):
    """The root on Explicit axes: the call as written; where JAX's sharding
    types refuse the model's own code, again inside `auto_axes` (`regions`)."""
    undo = _undo(module, args, kwargs)
    try:
        return _remat(module, method, name, hooks, args, kwargs)
    except Exception as error:  # noqa: BLE001 - only what RETRIES names is retried
        if _taken_back(error, R.GUARD, module, name, hooks, undo) is None:
            raise
        trace.record(module, name, R.GUARD)
        call = functools.partial(_remat, method=method, name=name, hooks=hooks)
        try:
            return regions.auto_axes_call(
                module, lambda m, *a, **kw: call(m, args=a, kwargs=kw), hooks.mesh, args, kwargs
            )
        except Exception as again:  # noqa: BLE001 - report the original refusal
            error.add_note(f"nnx_parallel: the retry inside auto_axes failed too: {again!r}")
            raise error from again


def execute(r: R.Route, module, method, name: str, hooks: ModuleHooks, args, kwargs):
    """Runs `module.method(*args, **kwargs)` on route `r`."""
    lay = hooks.layout if name == "__call__" else None
    mesh = hooks.mesh
    if r.body == "context":
        if r == R.CONTEXT_DECODE:
            context.warn_decoding(module, hooks.context)
            return method(module, *args, **kwargs)
        auto = r.region == "auto-axes"
        return context.call(module, method, hooks.context, mesh, args, kwargs, auto_axes=auto)
    if r.body in ("experts", "experts-a2a"):
        return _experts(r, module, method, name, hooks, args, kwargs)
    if r.params == "as-is":  # activation layouts only
        if lay is None:
            return method(module, *args, **kwargs)
        laid = layout.with_layout(method, lay, mesh, r.output, regions.auto_axes_call)
        return laid(module, *args, **kwargs)
    return _fsdp(r, module, method, hooks, lay, args, kwargs)


def _laid_out_inside(method, lay, mesh):
    """`method` with its layout, whose output choice is made inside the region."""
    if lay is None:
        return method

    def call(m, *a, **kw):
        output = R.layout_route(m, lay, mesh, a, kw).output
        return layout.with_layout(method, lay, mesh, output, regions.auto_axes_call)(m, *a, **kw)

    return call


def _fsdp(r: R.Route, module, method, hooks: ModuleHooks, lay, args, kwargs):
    mesh, gather = hooks.mesh, hooks.gather
    if r == R.FSDP_TP:
        return fsdp_tp.call(module, method, hooks, args, kwargs)
    if r.region == "auto-axes":
        # Explicit axes: the gather and the layout run with Auto axes inside
        # and the result gets the layout's sharding (JAX cannot yet transpose a
        # gather inside a partly-manual shard_map over Explicit axes).
        x = args[0]
        full = layout.full_spec(x, lay.output or (), mesh, x.ndim + lay.rank_delta, lay.out_from)
        inner = _laid_out_inside(method, dataclasses.replace(lay, force_auto=True), mesh)
        inside = R.FSDP_NESTED if fsdp.nested(gather) else R.FSDP_SHARD_MAP
        inside = R.FSDP_GSPMD if r.params == "constrained" else inside

        def call(clone, *a, **kw):
            return _fsdp(inside, clone, inner, hooks, None, a, kw)

        out_specs = layout.drop_manual(full)
        return regions.auto_axes_call(module, call, mesh, args, kwargs, out_specs=out_specs)
    call = _laid_out_inside(method, lay if r.output == "constrained" else None, mesh)
    if r.region == "nested":
        return fsdp.nested_call(module, call, gather, args, kwargs)
    if r.region == "shard-map":
        return fsdp.shard_call(module, call, gather, mesh, args, kwargs)
    reason = fsdp.not_per_shard(module, gather, mesh, args, kwargs)
    if reason is not None:
        fsdp.warn_gspmd(module, reason)
    return fsdp.gspmd_call(module, call, gather, mesh, args, kwargs)


def _experts(r: R.Route, module, method, name: str, hooks: ModuleHooks, args, kwargs):
    rest = dataclasses.replace(hooks, experts=None, remat=None, guard=False)

    def as_written(m, *a, **kw):  # the module's other hooks (FSDP, layouts)
        if rest.gather is None and rest.layout is None:
            return method(m, *a, **kw)
        return _run(m, method, name, rest, a, kw)

    if r == R.EXPERTS_ALL_TO_ALL:
        return experts_a2a.dispatch_call(module, method, hooks, args, kwargs)
    if r == R.EXPERTS_MANUAL:
        return experts.local_call(module, method, hooks, args, kwargs)
    if r == R.EXPERTS_AS_WRITTEN:
        return as_written(module, *args, **kwargs)

    def manual(m, *a, **kw):
        first = R.route(m, hooks, trace.current(), a, kw, name)
        return _run(m, method, name, hooks, a, kw, first=first)

    inner = manual if r == R.EXPERTS_AUTO_AXES else as_written
    spec = experts.output_spec(args)
    call = experts.constrained(inner, hooks.mesh)
    return regions.auto_axes_call(module, call, hooks.mesh, args, kwargs, out_specs=spec)
