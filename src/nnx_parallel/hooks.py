"""Call-time hooks: activation layouts and FSDP gathers around a module's call.

NNX has no hook registry, so a hooked module gets a generated subclass of its
own class (`isinstance(layer, nnx.Linear)` stays true) whose hooked methods
run the steps below around the original method. The hook configuration is a
hashable frozen dataclass stored on the subclass, so `nnx.split`/`merge`,
`nnx.clone` and `nnx.jit` carry it along with the graph definition.

FSDP gathers (in `_fsdp.py`) run the module inside a `shard_map` over the
batch axes and `all_gather` the module's own parameters there. The transpose of that
all-gather is a reduce-scatter, so gradients leave the module already summed
over the batch and sharded: no full all-reduce, on any backend. Annotating
parameters and letting GSPMD propagate instead compiles to an all-gather plus
a full all-reduce of every gradient (2x the traffic) on backends where XLA
does not rewrite it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import warnings
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat

GATHERED_NAME = "nnx_parallel_gathered"


@dataclasses.dataclass(frozen=True)
class Layout:
    """Activation layouts around a call, each aligned to trailing dims.

    `input` lays out the first positional argument before the call, `output`
    every array the call returns. Leading dims stay as they are (Auto axes)
    or keep the input's batch layout (Explicit axes). `rank_delta` is the
    output rank minus the input rank (Embed: +1).
    """

    input: tuple | None = None
    output: tuple | None = None
    rank_delta: int = 0
    force_auto: bool = False
    # Row-style layers: the output is a partial sum over these axes, and these
    # parameters (biases) are added once, after the sum.
    reduce: tuple[str, ...] = ()
    post: tuple[str, ...] = ()
    # For each output dim, the input dim it comes from (None: new), when the
    # layer says (einsums); otherwise leading dims match position by position.
    out_from: tuple[int | None, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Gather:
    """FSDP: all-gather `params` ((name, dim) pairs) over `axes` per call."""

    axes: tuple[str, ...]
    batch_axes: tuple[str, ...]
    params: tuple[tuple[str, int], ...]
    remat: bool = True
    # See FSDP: prefetch depth, and the mixed-precision policy.
    prefetch: int = 0
    param_dtype: Any = None
    reduce_dtype: Any = None


@dataclasses.dataclass(frozen=True)
class ModuleHooks:
    """Everything a module does at call time, merged from all its styles."""

    layout: Layout | None = None
    gather: Gather | None = None
    methods: tuple[str, ...] = ("__call__",)
    mesh: Mesh | None = None

    def merge(self, other: ModuleHooks | None) -> ModuleHooks:
        if other is None:
            return self
        return ModuleHooks(
            layout=other.layout or self.layout,
            gather=other.gather or self.gather,
            methods=tuple(dict.fromkeys(self.methods + other.methods)),
            mesh=other.mesh or self.mesh,
        )


# Installing ---------------------------------------------------------------------

_HOOKS_ATTR = "__nnx_parallel_hooks__"
_BASE_ATTR = "__nnx_parallel_base__"


@functools.cache
def _hooked_class(base: type, hooks: ModuleHooks) -> type:
    namespace = {
        _HOOKS_ATTR: hooks,
        _BASE_ATTR: base,
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
    }
    for name in hooks.methods:
        namespace[name] = _wrap(getattr(base, name), name)
    return type(base.__name__, (base,), namespace)


def base_class(module: Any) -> type:
    """The user's class of a (possibly hooked) module."""
    return getattr(type(module), _BASE_ATTR, type(module))


def get_hooks(module: Any) -> ModuleHooks | None:
    return getattr(type(module), _HOOKS_ATTR, None)


def install(module: nnx.Module, hooks: ModuleHooks) -> None:
    """Swaps `module`'s class for the hooked subclass of its base class."""
    object.__setattr__(module, "__class__", _hooked_class(base_class(module), hooks))


def uninstall(module: nnx.Module) -> None:
    object.__setattr__(module, "__class__", base_class(module))


# Running ----------------------------------------------------------------------------


def _wrap(method, name: str):
    @functools.wraps(method)
    def hooked(self, *args, **kwargs):
        if _probing:
            return method(self, *args, **kwargs)
        hooks: ModuleHooks = getattr(type(self), _HOOKS_ATTR)
        layout = hooks.layout if name == "__call__" else None
        return _run(self, method, hooks, layout, args, kwargs)

    return hooked


def _is_array(x) -> bool:
    return isinstance(x, jax.Array) or hasattr(x, "shape") and hasattr(x, "dtype")


def _full_spec(x, trailing: tuple, mesh: Mesh, out_ndim: int | None = None, out_from=None) -> P:
    """`trailing` padded on the left to the rank of `x` (or `out_ndim`)."""
    ndim = x.ndim if out_ndim is None else out_ndim
    n_lead = max(ndim - len(trailing), 0)
    if _explicit_here(mesh):
        spec = tuple(_compat.spec_of(x) or ())
        spec = spec + (None,) * (x.ndim - len(spec))
        source = out_from if out_from is not None and len(out_from) == ndim else range(ndim)
        lead = tuple(
            spec[j] if j is not None and j < x.ndim else None for j in list(source)[:n_lead]
        )
    else:
        lead = (_compat.UNCONSTRAINED,) * n_lead
    return P(*(lead + tuple(trailing)[-ndim:] if ndim else ()))


def _drop_manual(spec: P) -> P:
    """Removes axes that are manual at this trace (we are inside shard_map)."""
    manual = _compat.manual_axes()
    if not manual:
        return spec
    out = []
    for entry in spec:
        if entry is _compat.UNCONSTRAINED or entry is None:
            out.append(entry)
            continue
        names = (entry,) if isinstance(entry, str) else tuple(entry)
        kept = tuple(n for n in names if n not in manual)
        out.append(kept[0] if len(kept) == 1 else (kept or None))
    return P(*out)


def _constrain(x, spec: P, mesh: Mesh):
    spec = _drop_manual(spec)
    if all(e is _compat.UNCONSTRAINED for e in spec):
        return x
    here = _context_mesh(mesh)
    if _explicit_here(mesh):
        return jax.sharding.reshard(x, NamedSharding(here, spec))
    return jax.lax.with_sharding_constraint(x, NamedSharding(here, spec))


def _run(module, method, hooks: ModuleHooks, layout: Layout | None, args, kwargs):
    mesh = hooks.mesh
    if hooks.gather is None:
        call = method if layout is None else _with_layout(method, layout, mesh)
        return call(module, *args, **kwargs)
    if layout is not None and _fsdp.local_ok(module, hooks, mesh, args, kwargs):
        return _fsdp.local_call(module, method, hooks, mesh, args, kwargs)
    if layout is not None and _explicit_here(mesh) and args and _is_array(args[0]):
        # Explicit axes: run the gather + layout with Auto axes inside and give
        # the result the layout's sharding (JAX cannot yet transpose a gather
        # inside a partly-manual shard_map over Explicit axes).
        x = args[0]
        out_spec = _drop_manual(
            _full_spec(x, layout.output or (), mesh, x.ndim + layout.rank_delta, layout.out_from)
        )
        auto_layout = dataclasses.replace(layout, force_auto=True)
        inner = _with_layout(method, auto_layout, mesh)
        graphdef, state = nnx.split(module)

        def run(state, *a):
            clone = nnx.merge(graphdef, state)
            out = _fsdp.gather_call(clone, inner, hooks.gather, mesh, a, kwargs)
            return out, nnx.state(clone, nnx.Not(nnx.Param))

        out, rest = _compat.auto_axes(run, mesh=mesh, out_sharding=(out_spec, None))(state, *args)
        nnx.update(module, rest)
        return out
    call = method if layout is None else _with_layout(method, layout, mesh)
    return _fsdp.gather_call(module, call, hooks.gather, mesh, args, kwargs)


def _context_mesh(mesh: Mesh):
    """The mesh to build shardings on here: the trace's abstract mesh where it
    differs from `mesh` (inside shard_map or auto_axes), else `mesh`."""
    context = jax.sharding.get_abstract_mesh()
    if context.empty or tuple(context.axis_types) == tuple(mesh.axis_types) and not _compat.manual_axes():
        return mesh
    return context


def _out_ndim(module, method, args, kwargs, guess: int) -> int:
    """Rank of the call's output, from an abstract trace with shardings stripped."""
    if isinstance(module, _KNOWN_RANK):
        return guess
    graphdef, state = nnx.split(module)
    plain = lambda t: jax.tree.map(  # noqa: E731
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype) if _is_array(v) else v, t
    )
    try:
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
            out = jax.eval_shape(
                lambda st, a, kw: method(nnx.merge(graphdef, st), *a, **kw), plain(state), plain(args), plain(kwargs)
            )
    except Exception:  # noqa: BLE001 - fall back to the style's static guess
        return guess
    leaves = [o for o in jax.tree.leaves(out) if hasattr(o, "ndim")]
    return leaves[0].ndim if leaves else guess


def _explicit_here(mesh: Mesh) -> bool:
    context = _context_mesh(mesh)
    manual = _compat.manual_axes()
    return any(
        t == jax.sharding.AxisType.Explicit
        for a, t in zip(context.axis_names, context.axis_types)
        if a not in manual
    )


def _reshard_to(y, spec: P, mesh: Mesh):
    if not _is_array(y) or y.ndim != len(spec) or tuple(_compat.spec_of(y) or ()) == tuple(spec):
        return y
    return jax.sharding.reshard(y, NamedSharding(_context_mesh(mesh), spec))


def _with_layout(method, layout: Layout, mesh: Mesh):
    accepts_out_sharding = "out_sharding" in inspect.signature(method).parameters

    def call(module, *args, **kwargs):
        if args and _is_array(args[0]) and layout.input is not None:
            args = (_constrain(args[0], _full_spec(args[0], layout.input, mesh), mesh),) + args[1:]
        explicit = _explicit_here(mesh) and not layout.force_auto
        requested = kwargs.get("out_sharding") if accepts_out_sharding else None
        if requested is not None:  # the caller's layout for this call wins over the plan's
            spec = P(*getattr(requested, "spec", requested))
            out = method(module, *args, **kwargs)
            fits = lambda y: _is_array(y) and y.ndim == len(spec)  # noqa: E731
            return jax.tree.map(lambda y: _constrain(y, spec, mesh) if fits(y) else y, out)
        if layout.output is None or not (args and _is_array(args[0])):
            return method(module, *args, **kwargs)
        x = args[0]
        if explicit:
            out_ndim = _out_ndim(module, method, args, kwargs, x.ndim + layout.rank_delta)
            out_spec = _drop_manual(_full_spec(x, layout.output, mesh, out_ndim, layout.out_from))
            if accepts_out_sharding and kwargs.get("out_sharding") is None:
                out = method(module, *args, **{**kwargs, "out_sharding": out_spec})
                # A bias added after the op (Conv, Linear) can shard it again.
                return jax.tree.map(lambda y: _reshard_to(y, out_spec, mesh), out)
            # The module's state goes in as an argument: closed-over Explicit
            # arrays would clash with the Auto mesh inside auto_axes.
            graphdef, state = nnx.split(module)

            def run(state, *a):
                inner = nnx.merge(graphdef, state)
                return method(inner, *a, **kwargs), nnx.state(inner, nnx.Not(nnx.Param))

            out, rest = _compat.auto_axes(run, mesh=mesh, out_sharding=(out_spec, None))(state, *args)
            nnx.update(module, rest)
            return out
        out = method(module, *args, **kwargs)
        return jax.tree.map(
            lambda y: _constrain(y, _full_spec(y, layout.output, mesh), mesh) if _is_array(y) and y.ndim else y,
            out,
        )

    return call


# Fallbacks and probes ------------------------------------------------------------------


_warned: set = set()


def _warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, FallbackWarning, stacklevel=4)


class FallbackWarning(UserWarning):
    """A hook fell back to a correct but costlier layout."""


_probing = False


@contextlib.contextmanager
def _probe():
    """Hooks step aside while we trace a call for its output shapes only."""
    global _probing
    saved, _probing = _probing, True
    try:
        yield
    finally:
        _probing = saved


# Layers whose output rank the styles compute statically.
_KNOWN_RANK = (nnx.Linear, nnx.Einsum, nnx.LinearGeneral, nnx.Conv, nnx.Embed)


from nnx_parallel import _fsdp  # noqa: E402  (FSDP builds on the helpers above)
