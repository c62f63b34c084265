"""Which path a hooked call takes: a route is a value, chosen by one pure function.

A `Route` is three orthogonal choices, and its name is derived from them
(`region/params/output`, prefixed by what the call body is for the
expert and context styles):

- `region`, where the call runs: `as-written` (no region of ours),
  `auto-axes` (every mesh axis Auto inside), `shard-map` (a `shard_map`
  manual over the batch axes), `manual` (fully manual: the expert slices,
  FSDP x TP), or `nested` (inside an enclosing module's manual region);
- `params`, how the parameters arrive: `as-is`, `gathered` (all-gathered
  in the region, reduce-scattered in backward), or `constrained` (a
  sharding constraint: GSPMD gathers them);
- `output`, how the output is laid out: `as-is`, `constrained` (a
  sharding constraint or, on Explicit axes, a `reshard`), `out-sharding`
  (passed to a layer that takes `out_sharding=`), `caller` (the caller's
  own `out_sharding=` wins) or `resharded` (leaving an `auto_axes` region).

`route(module, hooks, trace, args=None, ...)` makes the whole decision. With
`args=None` it decides from what is known before any input is seen, which is
what `explain` prints (`dispatch.describe`), together with the fallbacks of
the retry table (`dispatch.RETRIES`); with the call's arguments it is the
route the call takes first. `ROUTES` lists every route; wrappers (`Remat`,
the root's Explicit-axes guard) are recorded apart, as `wrapper:remat` and
`wrapper:guard`.

Example:
  >>> from nnx_parallel.core.layouts import get_hooks
  >>> from nnx_parallel.runtime import trace
  >>> layer = parallelize(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), mesh8, ColumnParallel())
  >>> route(layer, get_hooks(layer), trace.current()).name
  'as-written/as-is/constrained'
"""

from __future__ import annotations

import dataclasses
import inspect
import types

from nnx_parallel.core.layouts import ModuleHooks
from nnx_parallel.runtime import context, fsdp, fsdp_tp
from nnx_parallel.runtime.layout import explicit_here, is_array

REGIONS = ("as-written", "auto-axes", "shard-map", "manual", "nested")
PARAMS = ("as-is", "gathered", "constrained")
OUTPUTS = ("as-is", "constrained", "out-sharding", "caller", "resharded")
BODIES = ("", "experts", "experts-a2a", "context")


@dataclasses.dataclass(frozen=True)
class Route:
    """One way to run a hooked call (see the module docstring)."""

    region: str = "as-written"
    params: str = "as-is"
    output: str = "as-is"
    body: str = ""

    def __post_init__(self):
        for value, allowed in (
            (self.region, REGIONS),
            (self.params, PARAMS),
            (self.output, OUTPUTS),
            (self.body, BODIES),
        ):
            if value not in allowed:
                raise ValueError(f"Route: {value!r} is not one of {allowed}")

    @property
    def name(self) -> str:
        core = f"{self.region}/{self.params}/{self.output}"
        return f"{self.body} {core}" if self.body else core

    def __str__(self) -> str:
        return self.name


AS_WRITTEN = Route()
CALLER = Route(output="caller")
CONSTRAIN = Route(output="constrained")
OUT_SHARDING = Route(output="out-sharding")
AUTO_AXES = Route("auto-axes", output="resharded")
FSDP_SHARD_MAP = Route("shard-map", "gathered")
FSDP_SHARD_MAP_LAYOUT = Route("shard-map", "gathered", "constrained")
FSDP_NESTED = Route("nested", "gathered")
FSDP_NESTED_LAYOUT = Route("nested", "gathered", "constrained")
FSDP_GSPMD = Route(params="constrained")
FSDP_GSPMD_LAYOUT = Route(params="constrained", output="constrained")
FSDP_TP = Route("manual", "gathered")
FSDP_AUTO_AXES = Route("auto-axes", "gathered", "resharded")
FSDP_AUTO_AXES_GSPMD = Route("auto-axes", "constrained", "resharded")
CONTEXT_DECODE = Route(body="context")
CONTEXT_CONSTRAIN = Route(output="constrained", body="context")
CONTEXT_AUTO_AXES = Route("auto-axes", output="resharded", body="context")
EXPERTS_MANUAL = Route("manual", body="experts")
EXPERTS_ALL_TO_ALL = Route("manual", body="experts-a2a")
EXPERTS_AS_WRITTEN = Route(body="experts")
EXPERTS_AUTO_AXES = Route("auto-axes", output="resharded", body="experts")
EXPERTS_AUTO_AXES_GSPMD = Route("auto-axes", "constrained", "resharded", body="experts")

ROUTES = (
    AS_WRITTEN, CALLER, CONSTRAIN, OUT_SHARDING, AUTO_AXES,
    FSDP_SHARD_MAP, FSDP_SHARD_MAP_LAYOUT, FSDP_NESTED, FSDP_NESTED_LAYOUT,
    FSDP_GSPMD, FSDP_GSPMD_LAYOUT, FSDP_TP, FSDP_AUTO_AXES, FSDP_AUTO_AXES_GSPMD,
    CONTEXT_DECODE, CONTEXT_CONSTRAIN, CONTEXT_AUTO_AXES,
    EXPERTS_ALL_TO_ALL, EXPERTS_MANUAL, EXPERTS_AS_WRITTEN, EXPERTS_AUTO_AXES, EXPERTS_AUTO_AXES_GSPMD,
)  # fmt: skip

# Wrappers: not routes; each runs the call, on its own route, inside something.
REMAT = "wrapper:remat"  # the `Remat` style: recomputed in backward (runtime/remat.py)
GUARD = "wrapper:guard"  # the root on Explicit axes (runtime/regions.py)
WRAPPERS = (REMAT, GUARD)


# Where the arguments decide otherwise than `route(..., args=None)`: the
# caller's own `out_sharding=`, no array input, a decoding call, a batch that
# does not split, inputs the fully manual FSDP x TP region cannot take; and
# where the call runs inside an enclosing module's `auto_axes` region, whose
# axes are Auto (an Explicit-axes route turns into its Auto twin there).
_GSPMD = (FSDP_GSPMD, FSDP_GSPMD_LAYOUT)
ALTERNATIVES = types.MappingProxyType(
    {
        CONSTRAIN: (CALLER, AS_WRITTEN),
        OUT_SHARDING: (CALLER, AS_WRITTEN, CONSTRAIN),
        AUTO_AXES: (CALLER, AS_WRITTEN, CONSTRAIN),
        FSDP_SHARD_MAP: (FSDP_GSPMD,),
        FSDP_SHARD_MAP_LAYOUT: (FSDP_GSPMD_LAYOUT,),
        FSDP_AUTO_AXES: (FSDP_NESTED_LAYOUT, FSDP_SHARD_MAP_LAYOUT, *_GSPMD),
        FSDP_TP: (FSDP_AUTO_AXES, FSDP_NESTED_LAYOUT, FSDP_SHARD_MAP_LAYOUT, *_GSPMD),
        CONTEXT_CONSTRAIN: (CONTEXT_DECODE,),
        CONTEXT_AUTO_AXES: (CONTEXT_DECODE, CONTEXT_CONSTRAIN),
    }
)


def route(module, hooks: ModuleHooks, trace, args=None, kwargs=None, name="__call__") -> Route:
    """The route of `module.name(*args, **kwargs)` (see the module docstring).

    Pure: it reads the hooks, the module's state, the mesh's axis types, the
    manual axes of the JAX trace in progress, and `trace` (a
    `runtime.trace.Trace`), and changes none of them.
    """
    kwargs = kwargs or {}
    lay = hooks.layout if name == "__call__" else None
    if trace.probing or hooks.guard_only:
        return AS_WRITTEN
    if name == "__call__" and hooks.context is not None:
        return _context_route(module, hooks, args, kwargs)
    if name == "__call__" and hooks.experts is not None:
        return EXPERTS_MANUAL if hooks.experts.capacity_factor is None else EXPERTS_ALL_TO_ALL
    if hooks.gather is None:
        return AS_WRITTEN if lay is None else layout_route(module, lay, hooks.mesh, args, kwargs)
    return _fsdp_route(module, hooks, lay, args, kwargs)


def _first_array(args) -> bool:
    return bool(args) and is_array(args[0])


def layout_route(module, lay, mesh, args, kwargs) -> Route:
    """The route of a call with an activation layout and no gather."""
    accepts = "out_sharding" in inspect.signature(type(module).__call__).parameters
    if accepts and kwargs.get("out_sharding") is not None:
        return CALLER
    if lay.output is None or args is not None and not _first_array(args):
        return AS_WRITTEN
    if not explicit_here(mesh) or lay.force_auto:
        return CONSTRAIN
    return OUT_SHARDING if accepts else AUTO_AXES


def _fsdp_route(module, hooks: ModuleHooks, lay, args, kwargs) -> Route:
    mesh, gather = hooks.mesh, hooks.gather
    if lay is not None and fsdp_tp.applies(module, hooks, args, kwargs):
        return FSDP_TP
    if lay is not None and explicit_here(mesh) and (args is None or _first_array(args)):
        return FSDP_AUTO_AXES
    laid = lay is not None and lay.output is not None
    if fsdp.nested(gather):
        return FSDP_NESTED_LAYOUT if laid else FSDP_NESTED
    if fsdp.not_per_shard(module, gather, mesh, args, kwargs) is not None:
        return FSDP_GSPMD_LAYOUT if laid else FSDP_GSPMD
    return FSDP_SHARD_MAP_LAYOUT if laid else FSDP_SHARD_MAP


def _context_route(module, hooks: ModuleHooks, args, kwargs) -> Route:
    if args is not None and context.decoding(module, args, hooks.context, kwargs):
        return CONTEXT_DECODE
    return CONTEXT_AUTO_AXES if explicit_here(hooks.mesh) else CONTEXT_CONSTRAIN
