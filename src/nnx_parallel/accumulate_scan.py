"""The two paths of `accumulate` (see its module docstring): `global`, a scan at the
GSPMD level, and `per-device`, a scan inside a `shard_map` over the batch axes with
one gradient reduction after it."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat, _specs
from nnx_parallel.accumulate_aux import AuxCodec
from nnx_parallel.core.layouts import get_hooks
from nnx_parallel.zero import scatter_dim

REDUCTIONS = ("mean", "sum")


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _fresh(state):
    """A copy of `state` with new Variable objects, created at the current trace."""
    return jax.tree.map(lambda x: x, state)


def _splitter(batch, k: int):
    """(take(i) -> microbatch i of `batch`), reshaping each array (B, ...) to (B/k, k, ...)."""
    folded = jax.tree.map(
        lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]) if _is_array(x) else x, batch
    )

    def take(i):
        return jax.tree.map(
            lambda x: (
                jax.lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False) if _is_array(x) else x
            ),
            folded,
        )

    return take


def _caller(grad_fn, graphdef, take, kwargs, encode=lambda out, i: out):
    def call(params, rest, i):
        model = nnx.merge(graphdef, _fresh(params), _fresh(rest))
        out = encode(grad_fn(model, *take(i), **kwargs), i)  # named aux leaves in buffers
        return out, nnx.state(model, nnx.Not(nnx.Param))

    return call


def _finish(acc, reduction: str, count: int):
    """Mean over `count` contributions for inexact leaves under "mean"; else the sum."""
    if reduction == "sum":
        return acc
    return jax.tree.map(lambda a: a / count if jnp.issubdtype(a.dtype, jnp.inexact) else a, acc)


def _scan(call, params, rest, init, k: int, pin=lambda acc: acc, regather: bool = False):
    def body(carry, i):
        acc, rest = carry
        # FSDP: tie the (sharded) parameters to the iteration, so XLA cannot hoist
        # their all-gathers out of the loop and keep whole parameters alive through it.
        p = jax.lax.optimization_barrier((params, i))[0] if regather else params
        out, rest = call(p, rest, i)
        return (pin(jax.tree.map(jnp.add, acc, out)), rest), None

    (acc, rest), _ = jax.lax.scan(body, (pin(init), rest), jnp.arange(k))
    return acc, rest


def _resharded(model) -> bool:
    """True if an FSDP module frees its gathered parameters after use (the default)."""
    for _, node in nnx.iter_graph(model):
        hooks = get_hooks(node)
        if hooks is not None and hooks.gather is not None and hooks.gather.reshard_after_forward:
            return True
    return False


# The global path ------------------------------------------------------------------------


def _leaf_specs(out, mesh: Mesh | None, declared: bool) -> list[P | None]:
    """Per value leaf of `out`: the spec to keep its accumulator in, or None.

    Explicit axes: the leaf's own type. Auto axes: a gradient's parameter's
    `out_sharding` if `declared`, else None (left to propagation).
    """
    leaves = jax.tree.leaves(out, is_leaf=lambda x: isinstance(x, nnx.Variable))
    specs = []
    for leaf in leaves:
        sharding = getattr(leaf, "sharding", None)
        if mesh is not None and _compat.is_explicit(mesh) and hasattr(sharding, "spec"):
            specs.append(sharding.spec)
        elif declared and isinstance(leaf, nnx.Variable) and leaf.get_metadata().get("mesh"):
            specs.append(P(*(_compat.get_declared_spec(leaf) or ())))
        else:
            specs.append(None)
    return specs


def _global(grad_fn, model, batch, kwargs, k, reduction, codec=None, *, declared: bool = True):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    codec = codec or AuxCodec(None, k, 0)
    call = _caller(grad_fn, graphdef, _splitter(batch, k), kwargs, codec.encode)
    shapes, _ = jax.eval_shape(call, params, rest, 0)
    mesh = _params_mesh(model)
    specs = _leaf_specs(shapes, mesh, declared)
    treedef = jax.tree.structure(shapes)

    def pin(acc):
        leaves = jax.tree.leaves(acc)
        return jax.tree.unflatten(
            treedef,
            [x if s is None else _compat.constrain(x, mesh, s) for x, s in zip(leaves, specs)],
        )

    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # `pin` lays it out
    acc, rest = _scan(call, params, rest, init, k, pin, regather=_resharded(model))
    nnx.update(model, rest)
    return _finish(acc, reduction, k)


# The per-device path ----------------------------------------------------------------------


def _zeros(s: jax.ShapeDtypeStruct, *, explicit: bool):
    """Zeros of `s`'s shape and dtype; on Explicit axes also of its sharding type."""
    sharding = getattr(s, "sharding", None) if explicit else None
    return jnp.zeros(s.shape, s.dtype, out_sharding=sharding)


def _varying(x, axes: tuple[str, ...]):
    """`x` typed as varying over `axes` inside a shard_map (a no-op where it already is)."""
    missing = tuple(a for a in axes if a not in _compat.varying_axes(x))
    return _compat.pcast_varying(x, missing) if missing else x


def _per_device(grad_fn, model, batch, kwargs, k, reduction, mesh, axes, zero2, codec=None):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    n = math.prod(mesh.shape[a] for a in axes)
    flat, treedef = jax.tree.flatten((batch, kwargs))
    where = [i for i, x in enumerate(flat) if _is_array(x)]
    split = [i < len(jax.tree.leaves(batch)) for i in where]
    entry = axes[0] if len(axes) == 1 else axes
    dims = _zero_dims(params, axes[0]) if zero2 else None
    explicit = _compat.is_explicit(mesh)

    def local(params, rest, arrays):
        leaves = list(flat)
        for i, a in zip(where, arrays):
            leaves[i] = a
        local_batch, local_kwargs = jax.tree.unflatten(treedef, leaves)
        params = jax.tree.map(lambda p: _varying(p, axes), params)
        aux = codec or AuxCodec(None, k, 0)
        encode = lambda out, i: aux.encode(out, i, jax.lax.axis_index(axes))  # noqa: E731
        call = _caller(grad_fn, graphdef, _splitter(local_batch, k), local_kwargs, encode)
        vary = functools.partial(jax.tree.map, lambda x: _varying(x, axes))
        shapes, _ = jax.eval_shape(call, params, rest, 0)
        init = vary(jax.tree.map(functools.partial(_zeros, explicit=explicit), shapes))
        acc, rest = _scan(call, params, rest, init, k, pin=vary)
        return _reduce(acc, axes, dims, reduction, n * k), rest

    out_specs = P() if dims is None else (P(), _scattered_specs(params, dims, entry))
    mapped = _compat.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(), [P(entry) if s else P() for s in split]),
        out_specs=(out_specs, P()),
        axis_names=set(axes),
    )
    arrays = [flat[i] for i in where]
    if explicit:  # shard_map checks Explicit types against in_specs: lay the inputs out
        arrays = [_laid_out(x, entry if s else None, axes, mesh) for x, s in zip(arrays, split)]
    out, rest = mapped(params, rest, arrays)
    nnx.update(model, rest)
    return out


def _scattered_specs(params, dims, entry):
    """Each ZeRO-2 gradient's spec: sharded over `entry` on its scatter dim."""
    values, values_def = jax.tree.flatten(params)
    specs = [
        _specs.with_dim(None, x.ndim, d, entry) if d >= 0 else _specs.replicated(x.ndim)
        for x, d in zip(values, dims)
    ]
    return jax.tree.unflatten(values_def, specs)


def _laid_out(x, lead, axes: tuple[str, ...], mesh: Mesh):
    """`x` with dim 0 on `lead` (None: replicated) and no other dim on `axes`."""
    spec = _specs.pad(_compat.spec_of(x), x.ndim)
    rest = tuple(_specs.drop_axes(spec, axes))
    new = (lead if lead is not None else rest[0],) + rest[1:]
    return x if new == spec else _compat.constrain(x, mesh, P(*new))


def _zero_dims(params, axis: str):
    """Per parameter, in leaf order: the dim ZeRO-2 scatters its gradient over (-1: all-reduce)."""
    dim = scatter_dim(axis)
    return [dim(v) for v in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))]


def _reduce(acc, axes, dims, reduction: str, count: int):
    """The one gradient sync: psum (or ZeRO-2's psum_scatter) of the accumulated sums."""
    name = axes[0] if len(axes) == 1 else axes

    def total(x, d=-1):
        if d < 0:
            return jax.lax.psum(x, name)
        return jax.lax.psum_scatter(x, name, scatter_dimension=d, tiled=True)

    if dims is None:
        summed = jax.tree.map(total, acc)
    else:
        loss, grads = acc
        values, values_def = jax.tree.flatten(grads)
        summed = (
            total(loss),
            jax.tree.unflatten(values_def, [total(x, d) for x, d in zip(values, dims)]),
        )
    return _finish(summed, reduction, count)


def _params_mesh(model) -> Mesh | None:
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        mesh = var.get_metadata().get("mesh")
        if isinstance(mesh, Mesh):
            return mesh
    return None
