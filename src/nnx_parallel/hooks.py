"""Call-time hooks: activation layouts and FSDP gathers around a module's call.

NNX has no hook registry, so a hooked module gets a generated subclass of its
own class (`isinstance(layer, nnx.Linear)` stays true) whose hooked methods
run the steps below around the original method. The hook configuration is a
hashable frozen dataclass stored on the subclass, so `nnx.split`/`merge`,
`nnx.clone` and `nnx.jit` carry it along with the graph definition.

FSDP gathers run the module inside a `shard_map` over the batch axes and
`all_gather` the module's own parameters there. The transpose of that
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
import math
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
    if layout is not None and _local_ok(module, hooks, mesh, args, kwargs):
        return _local_call(module, method, hooks, mesh, args, kwargs)
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
            out = _gather_call(clone, inner, hooks.gather, mesh, a, kwargs)
            return out, nnx.state(clone, nnx.Not(nnx.Param))

        out, rest = _compat.auto_axes(run, mesh=mesh, out_sharding=(out_spec, None))(state, *args)
        nnx.update(module, rest)
        return out
    call = method if layout is None else _with_layout(method, layout, mesh)
    return _gather_call(module, call, hooks.gather, mesh, args, kwargs)


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


# FSDP ----------------------------------------------------------------------------------


def _gather_param(value, dim: int, axes: tuple[str, ...], remat: bool):
    out = jax.lax.all_gather(value, axes if len(axes) > 1 else axes[0], axis=dim, tiled=True)
    if remat:
        out = _compat.checkpoint_name(out, GATHERED_NAME)
    return out


def _map_state(fn, state):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    return jax.tree_util.tree_unflatten(treedef, [fn(_strip(p), v) for p, v in leaves])


def _strip(path):
    """Key path of a state leaf without the trailing Variable-value entry."""
    keys = [k for k in path if hasattr(k, "key") or hasattr(k, "idx")]
    return tuple(getattr(k, "key", getattr(k, "idx", None)) for k in keys)


_warned: set = set()


def _warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, FallbackWarning, stacklevel=4)


class FallbackWarning(UserWarning):
    """A hook fell back to a correct but costlier layout."""


def _gather_call(module, call, gather: Gather, mesh: Mesh, args, kwargs):
    manual = _compat.manual_axes()
    graphdef, pstate, rest = nnx.split(module, nnx.Param, ...)
    if set(gather.axes) <= manual:
        # Already inside an enclosing module's shard_map: gather our own params.
        inner = nnx.merge(graphdef, _map_state(lambda p, v: _maybe_gather(p, v, gather), pstate), rest)
        return call(inner, *args, **kwargs)
    batch_axes = tuple(a for a in gather.batch_axes if a not in manual)
    n_batch = math.prod(mesh.shape[a] for a in batch_axes)
    reason, split = _batch_split(call, graphdef, pstate, rest, args, kwargs, n_batch)
    if reason is not None:
        reason = reason.replace("the batch axes", f"the batch axes {batch_axes}")
        _warn_once(
            (base_name(module), reason),
            f"FSDP on {base_name(module)}: {reason}; gathering its parameters with a sharding "
            "constraint instead, which costs a full all-reduce of their gradients.",
        )
        return _gspmd_gather_call(module, call, gather, mesh, graphdef, pstate, rest, args, kwargs)
    return _shard_map_call(call, gather, mesh, batch_axes, graphdef, pstate, rest, args, kwargs, split)


# Which inputs and outputs carry the batch ---------------------------------------------

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


def _is_stateful(x) -> bool:
    return isinstance(x, (nnx.Variable, nnx.Pytree))


@dataclasses.dataclass(frozen=True)
class _Split:
    """How a call maps over the batch: inputs split on dim 0 or replicated
    (`inputs`, one flag per leaf of (args, kwargs)), and the batch dim of each
    output leaf (-1: no batch dim, the output is the same on every device)."""

    inputs: tuple[bool, ...]
    outputs: Any


def _batch_split(call, graphdef, pstate, rest, args, kwargs, n_batch):
    """(why the call cannot run per batch shard, or None; a `_Split`).

    The batch size is dim 0 of the first array input; other inputs split on
    dim 0 only if theirs matches (positions (T,), scalar cache indices and
    tables stay whole). Output batch dims come from tracing the call's shapes
    twice, at the full and at the per-device batch: (cache, out) tuples and
    kernels like fused kv ("CBSNH") keep their batch where it is.
    """
    flat, treedef = jax.tree.flatten((args, kwargs), is_leaf=_is_stateful)
    if any(_is_stateful(x) for x in flat) or any(
        isinstance(v, nnx.Variable) for _, v in nnx.to_flat_state(rest)
    ):
        return "it holds or is passed state (caches, batch stats, rngs) a shard_map cannot carry", None
    first = next((x for x in flat if _is_array(x)), None)
    if first is None or first.ndim == 0 or first.shape[0] % n_batch:
        shape = None if first is None else tuple(first.shape)
        return f"its first input (shape {shape}) does not split over the batch axes (size {n_batch})", None
    inputs = tuple(_is_array(x) and x.ndim > 0 and x.shape[0] == first.shape[0] for x in flat)

    def shapes(local: bool):
        def abstract(x, split):
            if not _is_array(x):
                return x
            lead = (x.shape[0] // n_batch,) if split and local else tuple(x.shape[:1])
            return jax.ShapeDtypeStruct(lead + tuple(x.shape[1:]), x.dtype)

        leaves = [abstract(x, s) for x, s in zip(flat, inputs)]
        where = [i for i, x in enumerate(leaves) if _is_array(x)]

        def f(ps, arrays):
            filled = list(leaves)
            for i, a in zip(where, arrays):
                filled[i] = a
            a, kw = jax.tree.unflatten(treedef, filled)
            return call(nnx.merge(graphdef, ps, rest), *a, **kw)

        ps = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), pstate)
        with _probe():
            return jax.eval_shape(f, ps, [leaves[i] for i in where])

    try:
        full, local = shapes(False), shapes(True)
    except Exception as e:  # noqa: BLE001 - the real call below reports real errors
        return f"its call does not trace with a per-device batch ({type(e).__name__}: {e})", None

    def batch_dim(g, l):
        diff = [d for d in range(len(g.shape)) if g.shape[d] != l.shape[d]]
        if not diff:
            return -1
        if len(diff) == 1 and g.shape[diff[0]] == l.shape[diff[0]] * n_batch:
            return diff[0]
        raise ValueError(f"output {g.shape} vs per-device {l.shape}")

    try:
        outputs = jax.tree.map(batch_dim, full, local)
    except ValueError as e:
        return f"its outputs do not split over the batch ({e})", None
    return None, _Split(inputs, outputs)


# FSDP + tensor parallel: one fully manual region -----------------------------------

# Layers whose output rank the styles compute statically.
_KNOWN_RANK = (nnx.Linear, nnx.Einsum, nnx.LinearGeneral, nnx.Conv, nnx.Embed)

# Layers whose call only reads parameter shapes, so they compute correctly on
# local shards: inside a shard_map manual over the tensor-parallel axis too,
# a column-parallel Linear is a plain Linear on its slice of output features.
_LOCAL_SAFE = (nnx.Linear, nnx.Einsum, nnx.LinearGeneral, nnx.Conv)


def _layout_axes(layout: Layout) -> set[str]:
    out = set(layout.reduce)
    for entry in (layout.input or ()) + (layout.output or ()):
        if entry is not None and entry is not _compat.UNCONSTRAINED:
            out |= set((entry,) if isinstance(entry, str) else entry)
    return out


def _local_ok(module, hooks: ModuleHooks, mesh: Mesh, args, kwargs) -> bool:
    """True where a module with FSDP + TP hooks can run fully manual.

    Partly-manual shard_maps make XLA replicate operands over the auto
    (tensor-parallel) axes before a manual all-gather, which gathers whole
    weights; a fully manual region gathers only the FSDP axis.
    """
    layout, gather = hooks.layout, hooks.gather
    if _compat.manual_axes() or not isinstance(module, _LOCAL_SAFE):
        return False
    if not args or not _is_array(args[0]) or args[0].ndim < 2:
        return False
    if any(_is_array(a) for a in jax.tree.leaves((args[1:], kwargs))):
        return False
    tp = _layout_axes(layout)
    if not tp or tp & set(gather.axes):
        return False
    allowed = tp | set(gather.axes) | set(gather.batch_axes)
    for var in jax.tree.leaves(nnx.state(module, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable)):
        spec = _compat.get_declared_spec(var) or ()
        if any(n not in allowed for e in spec for n in ((e,) if isinstance(e, str) else (e or ()))):
            return False
    n_batch = math.prod(mesh.shape[a] for a in gather.batch_axes)
    return args[0].shape[0] % n_batch == 0 and not jax.tree.leaves(nnx.state(module, nnx.Not(nnx.Param)))


def _manual_io_spec(ndim: int, batch_entry, trailing: tuple | None) -> P:
    trailing = tuple(None if e is _compat.UNCONSTRAINED else e for e in (trailing or ()))
    middle = max(ndim - 1 - len(trailing), 0)
    return P(batch_entry, *([None] * middle), *trailing[-(ndim - 1):] if ndim > 1 else ())


def _scatter_dim(spec: P, axes: set[str]) -> int | None:
    for d, entry in enumerate(spec):
        if entry is not None and set((entry,) if isinstance(entry, str) else entry) & axes:
            return d
    return None


def _local_call(module, method, hooks: ModuleHooks, mesh: Mesh, args, kwargs):
    layout, gather = hooks.layout, hooks.gather
    batch_axes = gather.batch_axes
    batch_entry = batch_axes[0] if len(batch_axes) == 1 else batch_axes
    manual = set(batch_axes) | set(gather.axes) | _layout_axes(layout)
    x = args[0]
    in_spec = _manual_io_spec(x.ndim, batch_entry, layout.input)
    out_spec = _manual_io_spec(x.ndim + layout.rank_delta, batch_entry, layout.output)
    graphdef, pstate = nnx.split(module, nnx.Param)
    if _explicit_here(mesh):
        x = jax.sharding.reshard(x, NamedSharding(mesh, in_spec))

    def body(pstate, x):
        gathered = _map_state(lambda p, v: _maybe_gather(p, v, gather), pstate)
        post = {}
        if layout.reduce:
            def zero_post(path, v):
                name = ".".join(str(k) for k in path)
                if name in layout.post:
                    post[name] = v
                    return jax.numpy.zeros_like(v)
                return v
            gathered = _map_state(zero_post, gathered)
        y = method(nnx.merge(graphdef, gathered), x, *args[1:], **kwargs)
        if layout.reduce:
            axes = layout.reduce if len(layout.reduce) > 1 else layout.reduce[0]
            scatter = _scatter_dim(out_spec, set(layout.reduce))
            if scatter is None:
                y = jax.lax.psum(y, axes)
            else:  # the output layout shards a reduced axis: sum and scatter at once
                y = jax.lax.psum_scatter(y, axes, scatter_dimension=scatter, tiled=True)
            for bias in post.values():
                y = y + bias.astype(y.dtype).reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
        return y

    if gather.remat:
        policy = jax.checkpoint_policies.save_anything_except_these_names(GATHERED_NAME)
        body = jax.checkpoint(body, policy=policy)
    param_in = _param_specs(pstate)
    mapped = _compat.shard_map(
        body, mesh=_context_mesh(mesh), in_specs=(param_in, in_spec), out_specs=out_spec, axis_names=manual
    )
    return mapped(pstate, x)


def base_name(module) -> str:
    return base_class(module).__name__


def _manual_spec(spec: P, manual: set[str]) -> P:
    out = []
    for entry in spec:
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept = tuple(n for n in names if n in manual)
        out.append(kept[0] if len(kept) == 1 else (kept or None))
    return P(*out)


def _param_specs(pstate):
    """Each parameter's resolved spec, read from its `out_sharding` metadata.

    Inside `nnx.scan`/`nnx.vmap` over a layer stack a parameter can have
    fewer dims than its metadata (a scan without `transform_metadata` leaves
    the stacked spec): the leading, scanned entries are dropped.
    """

    def spec(var):
        declared = _compat.get_declared_spec(var)
        if declared is None:
            return P()
        return P(*declared[max(len(declared) - var.get_value().ndim, 0):])

    return jax.tree.map(spec, pstate, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _shard_map_call(call, gather: Gather, mesh, batch_axes, graphdef, pstate, rest, args, kwargs, split):
    manual = set(batch_axes) | set(gather.axes)
    batch_entry = batch_axes[0] if len(batch_axes) == 1 else batch_axes
    param_in = jax.tree.map(lambda s: _manual_spec(s, manual), _param_specs(pstate))
    flat, treedef = jax.tree.flatten((args, kwargs), is_leaf=_is_stateful)
    where = [i for i, x in enumerate(flat) if _is_array(x)]
    arrays = [flat[i] for i in where]
    arg_in = [P(batch_entry) if split.inputs[i] else P() for i in where]
    rest_in = jax.tree.map(lambda _: P(), rest)
    restore = _MISSING
    if _explicit_here(mesh):
        lead = tuple(_compat.spec_of(arrays[0]) or (None,))[:1]
        if lead and lead[0] != batch_entry:
            restore = lead[0]  # e.g. a replicated input: give the layout back
        arrays = [_to_manual(x, batch_entry if split.inputs[i] else None, manual, mesh) for i, x in zip(where, arrays)]

    def body(pstate, rest, arrays):
        leaves = list(flat)
        for i, a in zip(where, arrays):
            leaves[i] = a
        a, kw = jax.tree.unflatten(treedef, leaves)
        inner = nnx.merge(graphdef, _map_state(lambda p, v: _maybe_gather(p, v, gather), pstate), rest)
        return call(inner, *a, **kw)

    if gather.remat:
        policy = jax.checkpoint_policies.save_anything_except_these_names(GATHERED_NAME)
        body = jax.checkpoint(body, policy=policy)
    out_specs = jax.tree.map(lambda d: P() if d < 0 else P(*([None] * d), batch_entry), split.outputs)
    mapped = _compat.shard_map(
        body, mesh=_context_mesh(mesh), in_specs=(param_in, rest_in, arg_in), out_specs=out_specs,
        axis_names=manual,
    )
    out = mapped(pstate, rest, arrays)
    if restore is not _MISSING and _explicit_here(mesh) and restore != batch_entry:
        out = jax.tree.map(
            lambda y, d: _set_dim(y, d, restore, mesh) if d >= 0 else y, out, split.outputs
        )
    return out


def _to_manual(x, lead, manual: set[str], mesh: Mesh):
    """`x` laid out for a shard_map manual over `manual`: dim 0 on `lead`
    (None: replicated), no other dim on a manual axis."""
    spec = tuple(_compat.spec_of(x) or ())
    spec = spec + (None,) * (x.ndim - len(spec))
    new = [lead] + [_drop_names(e, manual) for e in spec[1:]]
    if lead is None:
        new[0] = _drop_names(spec[0], manual)
    if tuple(new) == spec:
        return x
    return jax.sharding.reshard(x, NamedSharding(_context_mesh(mesh), P(*new)))


def _drop_names(entry, names: set[str]):
    kept = tuple(n for n in ((entry,) if isinstance(entry, str) else tuple(entry or ())) if n not in names)
    return kept[0] if len(kept) == 1 else (kept or None)


def _set_dim(y, dim: int, entry, mesh: Mesh):
    spec = list(tuple(_compat.spec_of(y) or ()))
    spec += [None] * (y.ndim - len(spec))
    spec[dim] = entry
    return jax.sharding.reshard(y, NamedSharding(_context_mesh(mesh), P(*spec)))


_MISSING = object()


def _maybe_gather(path, value, gather: Gather):
    dims = dict(gather.params)
    name = ".".join(str(k) for k in path)
    dim = dims.get(name)
    # Dims count from the end (see FSDP.hooks), so they hold inside a scan too;
    # a dim the scan sliced away arrives whole already.
    if dim is None or dim < -value.ndim:
        return value
    return _gather_param(value, dim % value.ndim, gather.axes, gather.remat)


def _reshard_batch(x, batch_entry, mesh: Mesh):
    spec = tuple(_compat.spec_of(x) or ())
    spec = spec + (None,) * (x.ndim - len(spec))
    if spec[0] == batch_entry:
        return x
    return jax.sharding.reshard(x, NamedSharding(mesh, P(batch_entry, *spec[1:])))


def _gspmd_gather_call(module, call, gather: Gather, mesh, graphdef, pstate, rest, args, kwargs):
    axes = set(gather.axes)
    specs = _param_specs(pstate)

    def strip(path, value):
        name = ".".join(str(k) for k in path)
        if name not in dict(gather.params):
            return value
        spec = specs_by_name[name]
        kept = []
        for entry in spec:
            names = (entry,) if isinstance(entry, str) else tuple(entry or ())
            left = tuple(n for n in names if n not in axes)
            kept.append(left[0] if len(left) == 1 else (left or None))
        return _compat.constrain(value, mesh, P(*kept))

    specs_by_name = {".".join(str(k) for k in _strip(p)): s for p, s in jax.tree_util.tree_flatten_with_path(specs)[0]}
    inner = nnx.merge(graphdef, _map_state(strip, pstate), rest)
    out = call(inner, *args, **kwargs)
    nnx.update(module, nnx.state(inner, nnx.Not(nnx.Param)))
    return out
