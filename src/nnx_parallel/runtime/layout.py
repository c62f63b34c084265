"""Activation layouts at call time: constraints on Auto axes, `reshard` on Explicit.

`with_layout(method, layout, mesh)` wraps a module method so its first input
and its outputs take the `Layout` a style asked for. Under Auto axes these
are sharding constraints; under Explicit axes the sharding is part of each
array's type, so the output layout is passed as `out_sharding=` to layers
that take it, or the call runs inside `auto_axes` and its result gets the
layout. Which of these a call takes is its route's `output` choice
(`runtime/routes.py`). The helpers here (context mesh, manual axes, specs)
are shared with the other call-time modules.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat, _specs
from nnx_parallel.core.layers import known_output_rank
from nnx_parallel.core.layouts import Layout
from nnx_parallel.runtime import trace
from nnx_parallel.runtime.flat import is_array


def context_mesh(mesh: Mesh) -> Any:
    """The mesh to build shardings on here: the trace's abstract mesh where it
    differs from `mesh` (inside shard_map or auto_axes), else `mesh`."""
    context = _compat.abstract_mesh()
    same_types = tuple(context.axis_types) == tuple(mesh.axis_types)
    if context.empty or same_types and not _compat.manual_axes():
        return mesh
    return context


def explicit_here(mesh: Mesh) -> bool:
    """True if any axis that is not manual here is Explicit."""
    context = context_mesh(mesh)
    manual = _compat.manual_axes()
    return any(
        t == jax.sharding.AxisType.Explicit
        for a, t in zip(context.axis_names, context.axis_types)
        if a not in manual
    )


def reshard_here(x: Any, mesh: Mesh, spec: P) -> Any:
    """`x` resharded to `spec` on the mesh of this trace."""
    return _compat.reshard(x, context_mesh(mesh), spec)


def type_spec(x: Any) -> tuple:
    """The spec in `x`'s type, padded to its rank (all None on Auto axes)."""
    return _specs.pad(_compat.spec_of(x), x.ndim)


def full_spec(x, trailing: tuple, mesh: Mesh, out_ndim: int | None = None, out_from=None) -> P:
    """`trailing` padded on the left to the rank of `x` (or `out_ndim`)."""
    ndim = x.ndim if out_ndim is None else out_ndim
    n_lead = max(ndim - len(trailing), 0)
    if explicit_here(mesh):
        spec = type_spec(x)
        source = out_from if out_from is not None and len(out_from) == ndim else range(ndim)
        lead = tuple(
            spec[j] if j is not None and j < x.ndim else None for j in list(source)[:n_lead]
        )
    else:
        lead = (_compat.UNCONSTRAINED,) * n_lead
    return P(*(lead + tuple(trailing)[-ndim:] if ndim else ()))


def drop_manual(spec: P) -> P:
    """Removes axes that are manual at this trace (we are inside shard_map)."""
    manual = _compat.manual_axes()
    return _specs.drop_axes(spec, manual) if manual else spec


def constrain(x, spec: P, mesh: Mesh):
    """Lays `x` out as `spec` here: `reshard` (Explicit) or a constraint (Auto)."""
    spec = drop_manual(spec)
    if all(e is _compat.UNCONSTRAINED for e in spec):
        return x
    here = context_mesh(mesh)
    if explicit_here(mesh):
        return _compat.reshard(x, here, spec)
    return _compat.with_sharding_constraint(x, here, spec)


def out_ndim(module, method, args, kwargs, guess: int) -> int:
    """Rank of the call's output, from an abstract trace with shardings stripped."""
    if known_output_rank(module):
        return guess
    graphdef, state = nnx.split(module)

    def plain(tree):
        return jax.tree.map(
            lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype) if is_array(v) else v, tree
        )

    def call(st, a, kw):
        return method(nnx.merge(graphdef, st), *a, **kw)

    try:
        with _compat.no_mesh(), trace.probe():
            out = jax.eval_shape(call, plain(state), plain(args), plain(kwargs))
    except Exception:  # noqa: BLE001 - fall back to the style's static guess
        return guess
    leaves = [o for o in jax.tree.leaves(out) if hasattr(o, "ndim")]
    return leaves[0].ndim if leaves else guess


def _reshard_to(y, spec: P, mesh: Mesh):
    if not is_array(y) or y.ndim != len(spec) or tuple(_compat.spec_of(y) or ()) == tuple(spec):
        return y
    return reshard_here(y, mesh, spec)


def output_spec(module, method, layout: Layout, mesh: Mesh, args, kwargs) -> P:
    """The full output spec of a call under Explicit axes."""
    x = args[0]
    ndim = out_ndim(module, method, args, kwargs, x.ndim + layout.rank_delta)
    return drop_manual(full_spec(x, layout.output, mesh, ndim, layout.out_from))


def with_layout(method, layout: Layout, mesh: Mesh, output: str, auto_axes_call=None):
    """`method` with its first input and outputs laid out as `layout` says,
    the output as the route's `output` choice (`runtime/routes.py`) says.

    `auto_axes_call` runs a call in `auto_axes` for `output == "resharded"`
    (`regions.auto_axes_call`, passed in: it imports this module)."""

    def call(module, *args, **kwargs):
        if args and is_array(args[0]) and layout.input is not None:
            x = constrain(args[0], full_spec(args[0], layout.input, mesh), mesh)
            args = (x,) + args[1:]
        if output == "caller":
            spec = P(*getattr(kwargs["out_sharding"], "spec", kwargs["out_sharding"]))
            out = method(module, *args, **kwargs)
            fits = lambda y: is_array(y) and y.ndim == len(spec)  # noqa: E731
            return jax.tree.map(lambda y: constrain(y, spec, mesh) if fits(y) else y, out)
        if output == "as-is":
            return method(module, *args, **kwargs)
        if output == "constrained":
            out = method(module, *args, **kwargs)
            fits = lambda y: is_array(y) and y.ndim  # noqa: E731
            lay = lambda y: constrain(y, full_spec(y, layout.output, mesh), mesh)  # noqa: E731
            return jax.tree.map(lambda y: lay(y) if fits(y) else y, out)
        spec = output_spec(module, method, layout, mesh, args, kwargs)
        if output == "out-sharding":
            # Outside `jax.set_mesh` a bare spec means nothing to JAX: name the mesh.
            given = NamedSharding(mesh, spec) if _compat.current_mesh_is_empty() else spec
            out = method(module, *args, **{**kwargs, "out_sharding": given})
            # A bias added after the op (Conv, Linear) can shard it again.
            return jax.tree.map(lambda y: _reshard_to(y, spec, mesh), out)
        return auto_axes_call(module, method, mesh, args, kwargs, out_specs=spec)

    return call
