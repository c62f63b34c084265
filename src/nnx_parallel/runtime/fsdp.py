"""FSDP at call time: gather a module's parameters per call, reduce-scatter in backward.

`gather_call` runs the module inside a `shard_map` over the batch axes and
`all_gather`s its own parameters there; the transpose of that all-gather is a
reduce-scatter, so gradients leave the module summed over the batch and
sharded. Calls that cannot run per batch shard (state, indivisible batch)
fall back to a GSPMD gather with a `FallbackWarning`. With tensor-parallel
layouts too, `local_call` runs supported layers fully manual, so only the
FSDP axis is gathered.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat, _specs
from nnx_parallel._paths import join, keys
from nnx_parallel.core import layers
from nnx_parallel.core.layouts import Gather, Layout, ModuleHooks, base_class
from nnx_parallel.runtime import gather as _gather
from nnx_parallel.runtime import remat as _remat
from nnx_parallel.runtime.layout import context_mesh as _context_mesh
from nnx_parallel.runtime.layout import explicit_here as _explicit_here
from nnx_parallel.runtime.layout import is_array as _is_array
from nnx_parallel.runtime.layout import probe as _probe
from nnx_parallel.runtime.layout import warn_once as _warn_once


def _map_state(fn, state):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    return jax.tree_util.tree_unflatten(treedef, [fn(keys(p), v) for p, v in leaves])


def nested(gather: Gather) -> bool:
    """True inside an enclosing module's shard_map that is manual over our axes."""
    return set(gather.axes) <= _compat.manual_axes()


def nested_call(module, call, gather: Gather, args, kwargs):
    """Already inside an enclosing module's shard_map: gather our own params."""
    graphdef, pstate, rest = nnx.split(module, nnx.Param, ...)
    flat, treedef = jax.tree.flatten((args, kwargs), is_leaf=_is_stateful)
    where = [i for i, x in enumerate(flat) if _is_array(x)]

    def run(ps, r, arrays):  # only arrays go through the custom_vjp
        leaves = list(flat)
        for i, a in zip(where, arrays):
            leaves[i] = a
        a, kw = jax.tree.unflatten(treedef, leaves)
        return call(nnx.merge(graphdef, ps, r), *a, **kw)

    return _gathered(run, gather, pstate, rest, [flat[i] for i in where])


@dataclasses.dataclass(frozen=True)
class Called:
    """A call's output, and whether it fell back to the GSPMD gather."""

    out: Any
    fallback: bool


def gather_call(module, call, gather: Gather, mesh: Mesh, args, kwargs):
    """`call(module, ...)` with `gather`'s params all-gathered for the call."""
    if nested(gather):
        return nested_call(module, call, gather, args, kwargs)
    return batch_call(module, call, gather, mesh, args, kwargs).out


def batch_call(module, call, gather: Gather, mesh: Mesh, args, kwargs) -> Called:
    """The call in a shard_map over the batch axes, or (state, indivisible
    batch) with GSPMD gathers and a `FallbackWarning`."""
    manual = _compat.manual_axes()
    graphdef, pstate, rest = nnx.split(module, nnx.Param, ...)
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
        out = _gspmd_gather_call(module, call, gather, mesh, graphdef, pstate, rest, args, kwargs)
        return Called(out, True)
    out = _shard_map_call(
        call, gather, mesh, batch_axes, graphdef, pstate, rest, args, kwargs, split
    )
    return Called(out, False)


# Which inputs and outputs carry the batch ---------------------------------------------


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
        return (
            "it holds or is passed state (caches, batch stats, rngs) a shard_map cannot carry",
            None,
        )
    first = next((x for x in flat if _is_array(x)), None)
    if first is None or first.ndim == 0 or first.shape[0] % n_batch:
        shape = None if first is None else tuple(first.shape)
        return (
            f"its first input (shape {shape}) does not split over the batch axes (size {n_batch})",
            None,
        )
    inputs = tuple(_is_array(x) and x.ndim > 0 and x.shape[0] == first.shape[0] for x in flat)

    def shapes(local: bool):
        return _output_shapes(call, graphdef, pstate, rest, flat, treedef, inputs, local, n_batch)

    try:
        full, local = shapes(False), shapes(True)
    except Exception as e:  # noqa: BLE001 - the real call below reports real errors
        return f"its call does not trace with a per-device batch ({type(e).__name__}: {e})", None

    try:
        outputs = jax.tree.map(lambda g, d: _batch_dim(g, d, n_batch), full, local)
    except ValueError as e:
        return f"its outputs do not split over the batch ({e})", None
    return None, _Split(inputs, outputs)


def _output_shapes(call, graphdef, pstate, rest, flat, treedef, inputs, local: bool, n_batch):
    """The call's output shapes, at the full batch or (`local`) the per-device one."""

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


def _batch_dim(full, per_device, n_batch: int) -> int:
    """The dim that holds the batch in an output (-1: none); ValueError if unclear."""
    diff = [d for d in range(len(full.shape)) if full.shape[d] != per_device.shape[d]]
    if not diff:
        return -1
    if len(diff) == 1 and full.shape[diff[0]] == per_device.shape[diff[0]] * n_batch:
        return diff[0]
    raise ValueError(f"output {full.shape} vs per-device {per_device.shape}")


# FSDP + tensor parallel: one fully manual region -----------------------------------


def _layout_axes(layout: Layout) -> set[str]:
    return set(layout.reduce) | _specs.spec_axes((layout.input or ()) + (layout.output or ()))


def local_ok(module, hooks: ModuleHooks, mesh: Mesh, args, kwargs) -> bool:
    """True where a module with FSDP + TP hooks can run fully manual.

    Partly-manual shard_maps make XLA replicate operands over the auto
    (tensor-parallel) axes before a manual all-gather, which gathers whole
    weights; a fully manual region gathers only the FSDP axis.
    """
    layout, gather = hooks.layout, hooks.gather
    if _compat.manual_axes() or not layers.local_safe(module):
        return False
    if not args or not _is_array(args[0]) or args[0].ndim < 2:
        return False
    if any(_is_array(a) for a in jax.tree.leaves((args[1:], kwargs))):
        return False
    tp = _layout_axes(layout)
    if not tp or tp & set(gather.axes):
        return False
    allowed = tp | set(gather.axes) | set(gather.batch_axes)
    for var in jax.tree.leaves(
        nnx.state(module, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable)
    ):
        if _specs.spec_axes(_compat.get_declared_spec(var) or ()) - allowed:
            return False
    n_batch = math.prod(mesh.shape[a] for a in gather.batch_axes)
    return args[0].shape[0] % n_batch == 0 and not jax.tree.leaves(
        nnx.state(module, nnx.Not(nnx.Param))
    )


def _manual_io_spec(ndim: int, batch_entry, trailing: tuple | None) -> P:
    trailing = tuple(None if e is _compat.UNCONSTRAINED else e for e in (trailing or ()))
    middle = max(ndim - 1 - len(trailing), 0)
    return P(batch_entry, *([None] * middle), *trailing[-(ndim - 1) :] if ndim > 1 else ())


def _scatter_dim(spec: P, axes: set[str]) -> int | None:
    for d, entry in enumerate(spec):
        if set(_specs.axes_of(entry)) & axes:
            return d
    return None


def local_call(module, method, hooks: ModuleHooks, mesh: Mesh, args, kwargs):
    layout, gather = hooks.layout, hooks.gather
    batch_axes = gather.batch_axes
    batch_entry = batch_axes[0] if len(batch_axes) == 1 else batch_axes
    manual = set(batch_axes) | set(gather.axes) | _layout_axes(layout)
    x = args[0]
    in_spec = _manual_io_spec(x.ndim, batch_entry, layout.input)
    out_spec = _manual_io_spec(x.ndim + layout.rank_delta, batch_entry, layout.output)
    graphdef, pstate = nnx.split(module, nnx.Param)
    param_in = _param_specs(pstate, gather)
    if _explicit_here(mesh):
        x = _compat.reshard(x, mesh, in_spec)
        pstate = _laid_out(pstate, param_in, mesh)

    def body(pstate, x):
        return _gathered(compute, gather, pstate, x)

    def compute(gathered, x):
        post = {}
        if layout.reduce:

            def zero_post(path, v):
                name = join(path)
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

    mapped = _compat.shard_map(
        body,
        mesh=_context_mesh(mesh),
        in_specs=(param_in, in_spec),
        out_specs=out_spec,
        axis_names=manual,
    )
    return mapped(pstate, x)


def _laid_out(pstate, specs, mesh: Mesh):
    """Explicit axes: each param value resharded to its spec where its type
    differs (values loaded from elsewhere, e.g. `nnx.update`)."""

    def put(var, spec):
        value = var.get_value()
        if _compat.spec_of(value) == spec:
            return var
        return var.replace(_compat.reshard(value, _context_mesh(mesh), spec))

    return jax.tree.map(
        put, pstate, specs, is_leaf=lambda v: isinstance(v, (nnx.Variable, P))
    )


def base_name(module) -> str:
    """The user's class name of a (possibly hooked) module."""
    return base_class(module).__name__


def _param_specs(pstate, gather: Gather | None = None):
    """Each parameter's resolved spec, read from its `out_sharding` metadata.

    Inside `nnx.scan`/`nnx.vmap` over a layer stack a parameter can have
    fewer dims than its metadata (a scan without `transform_metadata` leaves
    the stacked spec): the leading, scanned entries are dropped. A parameter
    without metadata (FSDP leaves none on untagged stacks, see
    `FSDP.param_metadata`) is sharded where `gather` says.
    """
    dims = dict(gather.params) if gather is not None else {}
    axes = None if gather is None else _specs.entry_of(gather.axes)

    full = dict(gather.specs) if gather is not None else {}

    def spec(path, var):
        declared = _compat.get_declared_spec(var)
        ndim = var.get_value().ndim
        if declared is None:
            declared = full.get(join(keys(path)))  # metadata replaced by nnx.update
        if declared is None:
            dim = dims.get(join(keys(path)))
            if dim is None or dim < -ndim:
                return P()
            return P(*[axes if d == dim % ndim else None for d in range(ndim)])
        return P(*declared[max(len(declared) - ndim, 0) :])

    return jax.tree_util.tree_map_with_path(
        spec, pstate, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def _shard_map_call(
    call, gather: Gather, mesh, batch_axes, graphdef, pstate, rest, args, kwargs, split
):
    manual = set(batch_axes) | set(gather.axes)
    batch_entry = batch_axes[0] if len(batch_axes) == 1 else batch_axes
    param_in = jax.tree.map(lambda s: _specs.keep_axes(s, manual), _param_specs(pstate, gather))
    flat, treedef = jax.tree.flatten((args, kwargs), is_leaf=_is_stateful)
    where = [i for i, x in enumerate(flat) if _is_array(x)]
    arrays = [flat[i] for i in where]
    arg_in = [P(batch_entry) if split.inputs[i] else P() for i in where]
    rest_in = jax.tree.map(lambda _: P(), rest)
    restore, arrays = _explicit_inputs(arrays, where, split, batch_entry, manual, mesh)

    def run(params, rest, arrays):
        leaves = list(flat)
        for i, a in zip(where, arrays):
            leaves[i] = a
        a, kw = jax.tree.unflatten(treedef, leaves)
        return call(nnx.merge(graphdef, params, rest), *a, **kw)

    prev = _prefetch_token(gather, math.prod(mesh.shape[a] for a in batch_axes))

    def body(pstate, rest, arrays, prev):
        prev = None if isinstance(prev, tuple) else prev  # () : nothing to wait for
        return _gathered(run, gather, pstate, rest, arrays, prev=prev, token=True)

    out_specs = jax.tree.map(
        lambda d: P() if d < 0 else P(*([None] * d), batch_entry), split.outputs
    )
    mapped = _compat.shard_map(
        body,
        mesh=_context_mesh(mesh),
        in_specs=(param_in, rest_in, arg_in, P(batch_entry)),
        out_specs=(out_specs, P(batch_entry)),
        axis_names=manual,
    )
    out, token = mapped(pstate, rest, arrays, prev)
    if gather.prefetch:
        _gather.set_last_token(token)
    if restore is not _MISSING and _explicit_here(mesh) and restore != batch_entry:
        out = jax.tree.map(
            lambda y, d: _set_dim(y, d, restore, mesh) if d >= 0 else y, out, split.outputs
        )
    return out


def _explicit_inputs(arrays, where, split, batch_entry, manual, mesh):
    """Explicit axes: the inputs laid out for the shard_map, and the layout of
    the first input's dim 0 to give the outputs back (`_MISSING`: keep theirs)."""
    if not _explicit_here(mesh):
        return _MISSING, arrays
    restore = _MISSING
    lead = tuple(_compat.spec_of(arrays[0]) or (None,))[:1]
    if lead and lead[0] != batch_entry:
        restore = lead[0]  # e.g. a replicated input: give the layout back
    laid_out = [
        _to_manual(x, batch_entry if split.inputs[i] else None, manual, mesh)
        for i, x in zip(where, arrays)
    ]
    return restore, laid_out


def _prefetch_token(gather: Gather, n_batch: int):
    """The previous gathered call's token when prefetching (else an empty tuple)."""
    if not gather.prefetch:
        return ()
    token = _gather.last_token()
    if token is None or token.shape != (n_batch,):
        return ()
    return token


def _to_manual(x, lead, manual: set[str], mesh: Mesh):
    """`x` laid out for a shard_map manual over `manual`: dim 0 on `lead`
    (None: replicated), no other dim on a manual axis."""
    spec = _specs.pad(_compat.spec_of(x), x.ndim)
    new = [lead] + [_specs.drop_entry(e, manual) for e in spec[1:]]
    if lead is None:
        new[0] = _specs.drop_entry(spec[0], manual)
    if tuple(new) == spec:
        return x
    return _compat.reshard(x, _context_mesh(mesh), P(*new))


def _set_dim(y, dim: int, entry, mesh: Mesh):
    spec = _specs.with_dim(_compat.spec_of(y), y.ndim, dim, entry)
    return _compat.reshard(y, _context_mesh(mesh), spec)


_MISSING = object()


def gspmd_call(module, call, gather: Gather, mesh: Mesh, args, kwargs):
    """`call(module, ...)` with `gather`'s params gathered by sharding
    constraints (the GSPMD route: no shard_map, the batch stays global)."""
    graphdef, pstate, rest = nnx.split(module, nnx.Param, ...)
    return _gspmd_gather_call(module, call, gather, mesh, graphdef, pstate, rest, args, kwargs)


def _gspmd_gather_call(module, call, gather: Gather, mesh, graphdef, pstate, rest, args, kwargs):
    axes = set(gather.axes)
    specs = _param_specs(pstate, gather)

    def strip(path, value):
        name = join(path)
        if name not in dict(gather.params):
            return value
        spec = _specs.drop_axes(specs_by_name[name], axes)
        return _compat.constrain(value, _context_mesh(mesh), spec)  # auto_axes: its Auto mesh

    flat = jax.tree_util.tree_flatten_with_path(specs)[0]
    specs_by_name = {join(keys(p)): s for p, s in flat}
    inner = nnx.merge(graphdef, _map_state(strip, pstate), rest)
    out = call(inner, *args, **kwargs)
    nnx.update(module, nnx.state(inner, nnx.Not(nnx.Param)))
    return out


def _gather_plan(gather: Gather, pstate) -> tuple[list, Any, _gather.GatherPlan]:
    """The leaves of `pstate`, its treedef, and how `gathered_call` treats each."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(pstate)
    dims = dict(gather.params)
    out = []
    for path, value in flat:
        dim = dims.get(join(keys(path)))
        # Dims count from the end (see FSDP.hooks), so they hold inside a scan too;
        # a dim the scan sliced away arrives whole already.
        out.append(None if dim is None or dim < -value.ndim else dim % value.ndim)
    manual = _compat.manual_axes()
    plan = _gather.GatherPlan(
        dims=tuple(out),
        axes=gather.axes,
        batch_axes=tuple(a for a in dict.fromkeys(gather.batch_axes + gather.axes) if a in manual),
        keep=not gather.remat or _remat.recomputed(),
        prefetch=gather.prefetch,
        param_dtype=gather.param_dtype,
        reduce_dtype=gather.reduce_dtype,
    )
    return [v for _, v in flat], treedef, plan


def _gathered(run, gather: Gather, pstate, *operands, prev=None, token=False):
    """`run(gathered pstate, *operands)` through `_gather.gathered_call`;
    with `token`, `(output, token)` for the next call's prefetch."""
    leaves, treedef, plan = _gather_plan(gather, pstate)

    def fn(full, ops):
        return run(jax.tree_util.tree_unflatten(treedef, full), *ops)

    out, tok = _gather.gathered_call(fn, leaves, operands, plan, prev)
    return (out, tok) if token else out
