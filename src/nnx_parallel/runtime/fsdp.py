"""FSDP at call time: gather a module's parameters per call, reduce-scatter in backward.

The routes (`runtime/routes.py`) that gather, and what each runs:

- `shard_call` (`shard-map/gathered/...`): the call inside a `shard_map`
  over the batch axes; its own parameters are `all_gather`ed there, and the
  transpose of that all-gather is a reduce-scatter, so gradients leave the
  module summed over the batch and sharded (`runtime/gather.py`). Which
  inputs and outputs carry the batch: `runtime/batch.py`.
- `nested_call` (`nested/gathered/...`): already inside an enclosing
  module's region, manual over our axes: gather our own params there.
- `gspmd_call` (`as-written/constrained/...`): the call holds state, or its
  batch does not split, or its own code refuses to run per batch shard:
  sharding constraints gather the params, GSPMD all-reduces the gradients
  (a `FallbackWarning` says why).

FSDP together with tensor-parallel layouts: `runtime/fsdp_tp.py`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat, _specs
from nnx_parallel._paths import join, keys
from nnx_parallel.core.layouts import Gather, base_class
from nnx_parallel.runtime import batch, trace
from nnx_parallel.runtime import gather as _gather
from nnx_parallel.runtime.batch import NotPerShard
from nnx_parallel.runtime.flat import Flat, is_node
from nnx_parallel.runtime.layout import context_mesh, explicit_here

__all__ = "NotPerShard"


def base_name(module) -> str:
    """The user's class name of a (possibly hooked) module."""
    return base_class(module).__name__


def nested(gather: Gather) -> bool:
    """True inside an enclosing module's shard_map that is manual over our axes."""
    return set(gather.axes) <= _compat.manual_axes()


def _batch_axes(gather: Gather) -> tuple[str, ...]:
    manual = _compat.manual_axes()
    return tuple(a for a in gather.batch_axes if a not in manual)


def not_per_shard(module, gather: Gather, mesh: Mesh, args=None, kwargs=None) -> str | None:
    """Why the call cannot run per batch shard, as far as is known without
    tracing it (None: it may). Without `args`, from the module alone."""
    rest = nnx.state(module, nnx.Not(nnx.Param))
    passed = args is not None and Flat.of((args, kwargs or {})).nodes
    if passed or any(isinstance(v, nnx.Variable) for _, v in nnx.to_flat_state(rest)):
        return "it holds or is passed state (caches, batch stats, rngs) a shard_map cannot carry"
    if args is None:
        return None
    n_batch = math.prod(mesh.shape[a] for a in _batch_axes(gather))
    first = next(iter(Flat.of((args, kwargs or {})).arrays), None)
    if first is None or first.ndim == 0 or first.shape[0] % n_batch:
        shape = None if first is None else tuple(first.shape)
        return (
            f"its first input (shape {shape}) does not split over the batch axes "
            f"{_batch_axes(gather)} (size {n_batch})"
        )
    return None


def warn_gspmd(module, reason: str) -> None:
    trace.warn_once(
        (base_name(module), reason),
        f"FSDP on {base_name(module)}: {reason}; gathering its parameters with a sharding "
        "constraint instead, which costs a full all-reduce of their gradients.",
        stacklevel=7,
    )


def nested_call(module, call, gather: Gather, args, kwargs):
    """Already inside an enclosing module's shard_map: gather our own params."""
    graphdef, pstate, rest = nnx.split(module, nnx.Param, ...)
    flat = Flat.of((args, kwargs))

    def run(ps, r, arrays):  # only arrays go through the custom_vjp
        a, kw = flat.splice(arrays)
        return call(nnx.merge(graphdef, ps, r), *a, **kw)

    return gathered(run, gather, pstate, rest, flat.arrays)


def shard_call(module, call, gather: Gather, mesh: Mesh, args, kwargs):
    """The call in a shard_map over the batch axes, params all-gathered in it.

    Raises `NotPerShard` where it cannot run per batch shard (the GSPMD
    route is the fallback, `dispatch.RETRIES`)."""
    reason = not_per_shard(module, gather, mesh, args, kwargs)
    if reason is not None:
        raise NotPerShard(reason)
    batch_axes = _batch_axes(gather)
    n_batch = math.prod(mesh.shape[a] for a in batch_axes)
    graphdef, pstate, rest = nnx.split(module, nnx.Param, ...)
    flat = Flat.of((args, kwargs))
    shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), pstate)

    def shapes_of(arrays):
        return jax.eval_shape(lambda ps, a: _run(call, graphdef, flat)(ps, rest, a), shapes, arrays)

    split = batch.split(shapes_of, flat, n_batch)
    try:
        return _shard_map(call, gather, mesh, batch_axes, graphdef, pstate, rest, flat, split)
    except (ValueError, TypeError) as e:
        # The call traced with per-device shapes outside the region (`split`),
        # so what refuses it here is the region: its own code names an axis
        # that is manual per batch shard (a constraint, `reshard`, `out_sharding=`).
        first = str(e).strip().splitlines()[0][:200]
        raise NotPerShard(
            f"its own code refuses to run per batch shard, e.g. its sharding names a batch "
            f"axis, which is manual there ({type(e).__name__}: {first})"
        ) from e


def _run(call, graphdef, flat: Flat):
    def run(params, rest, arrays):
        a, kw = flat.splice(arrays)
        return call(nnx.merge(graphdef, params, rest), *a, **kw)

    return run


def _shard_map(call, gather: Gather, mesh, batch_axes, graphdef, pstate, rest, flat, split):
    manual = set(batch_axes) | set(gather.axes)
    entry = _specs.entry_of(batch_axes)
    param_in = jax.tree.map(lambda s: _specs.keep_axes(s, manual), param_specs(pstate, gather))
    arg_in = [P(entry) if s else P() for s in split.inputs]
    restore, arrays = _explicit_inputs(flat.arrays, split, entry, manual, mesh)
    run = _run(call, graphdef, flat)
    prev = _prefetch_token(gather, math.prod(mesh.shape[a] for a in batch_axes))

    def body(pstate, rest, arrays, prev):
        prev = None if isinstance(prev, tuple) else prev  # () : nothing to wait for
        return gathered(run, gather, pstate, rest, arrays, prev=prev, token=True)

    out_specs = jax.tree.map(lambda d: P() if d < 0 else P(*([None] * d), entry), split.outputs)
    mapped = _compat.shard_map(
        body,
        mesh=context_mesh(mesh),
        in_specs=(param_in, jax.tree.map(lambda _: P(), rest), arg_in, P(entry)),
        out_specs=(out_specs, P(entry)),
        axis_names=manual,
    )
    out, token = mapped(pstate, rest, arrays, prev)
    if gather.prefetch:
        trace.set_last_token(token)
    if restore is not None and restore != entry:
        out = jax.tree.map(
            lambda y, d: _set_dim(y, d, restore[0], mesh) if d >= 0 else y, out, split.outputs
        )
    return out


def _explicit_inputs(arrays, split: batch.Split, entry, manual, mesh):
    """Explicit axes: the inputs laid out for the shard_map, and `(layout,)`
    of the first input's dim 0 to give the outputs back (None: keep theirs)."""
    if not explicit_here(mesh):
        return None, arrays
    lead = tuple(_compat.spec_of(arrays[0]) or (None,))[:1]
    restore = lead if lead and lead[0] != entry else None  # e.g. a replicated input
    laid = [_to_manual(x, entry if s else None, manual, mesh) for x, s in zip(arrays, split.inputs)]
    return restore, laid


def _prefetch_token(gather: Gather, n_batch: int):
    """The previous gathered call's token when prefetching (else an empty tuple)."""
    if not gather.prefetch:
        return ()
    token = trace.last_token()
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
    return _compat.reshard(x, context_mesh(mesh), P(*new))


def _set_dim(y, dim: int, entry, mesh: Mesh):
    spec = _specs.with_dim(_compat.spec_of(y), y.ndim, dim, entry)
    return _compat.reshard(y, context_mesh(mesh), spec)


def gspmd_call(module, call, gather: Gather, mesh: Mesh, args, kwargs):
    """`call(module, ...)` with `gather`'s params gathered by sharding
    constraints (the GSPMD route: no shard_map, the batch stays global)."""
    graphdef, pstate, rest = nnx.split(module, nnx.Param, ...)
    axes, dims = set(gather.axes), dict(gather.params)
    flat = jax.tree_util.tree_flatten_with_path(param_specs(pstate, gather))[0]
    specs = {join(keys(p)): s for p, s in flat}
    here = context_mesh(mesh)  # inside auto_axes: its Auto mesh

    def strip(path, value):
        name = join(keys(path))
        if name not in dims:
            return value
        return _compat.constrain(value, here, _specs.drop_axes(specs[name], axes))

    leaves, treedef = jax.tree_util.tree_flatten_with_path(pstate)
    stripped = jax.tree_util.tree_unflatten(treedef, [strip(p, v) for p, v in leaves])
    inner = nnx.merge(graphdef, stripped, rest)
    out = call(inner, *args, **kwargs)
    nnx.update(module, nnx.state(inner, nnx.Not(nnx.Param)))
    return out


def param_specs(pstate, gather: Gather | None = None):
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

    return jax.tree_util.tree_map_with_path(spec, pstate, is_leaf=is_node)


def laid_out(pstate, specs, mesh: Mesh):
    """Explicit axes: each param value resharded to its spec where its type
    differs (values loaded from elsewhere, e.g. `nnx.update`)."""

    def put(var, spec):
        value = var.get_value()
        if _compat.spec_of(value) == spec:
            return var
        return var.replace(_compat.reshard(value, context_mesh(mesh), spec))

    return jax.tree.map(put, pstate, specs, is_leaf=lambda v: isinstance(v, (nnx.Variable, P)))


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
        # Inside a `Remat` recompute the forward runs again just before its
        # backward: keep the gathered copy for that backward.
        regather=gather.reshard_after_forward and not trace.has("recomputed"),
        prefetch=gather.prefetch,
        param_dtype=gather.param_dtype,
        reduce_dtype=gather.reduce_dtype,
    )
    return [v for _, v in flat], treedef, plan


def gathered(run, gather: Gather, pstate, *operands, prev=None, token=False):
    """`run(gathered pstate, *operands)` through `_gather.gathered_call`;
    with `token`, `(output, token)` for the next call's prefetch."""
    leaves, treedef, plan = _gather_plan(gather, pstate)

    def fn(full, ops):
        return run(jax.tree_util.tree_unflatten(treedef, full), *ops)

    out, tok = _gather.gathered_call(fn, leaves, operands, plan, prev)
    return (out, tok) if token else out
