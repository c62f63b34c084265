"""FSDP together with tensor parallelism: one fully manual region (`manual/gathered/as-is`).

A partly-manual `shard_map` (manual over the batch and FSDP axes, Auto over
'model') makes XLA replicate its operands over the Auto axes before a manual
all-gather, which gathers whole weights. For layers that compute correctly
on their local shards (`layers.local_safe`: Linear, Einsum, Conv, Embed),
the call runs fully manual instead: only the FSDP axis is gathered, and the
tensor-parallel partial results are summed (or sum-scattered) here.
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat, _specs
from nnx_parallel._paths import join, keys
from nnx_parallel.core import layers
from nnx_parallel.core.layouts import Layout, ModuleHooks
from nnx_parallel.runtime.flat import is_array
from nnx_parallel.runtime.fsdp import gathered, laid_out, param_specs
from nnx_parallel.runtime.layout import context_mesh, explicit_here


def applies(module, hooks: ModuleHooks, args=None, kwargs=None) -> bool:
    """True where a module with FSDP + TP hooks can run fully manual (without
    `args`: as far as the module alone tells)."""
    layout, gather = hooks.layout, hooks.gather
    if _compat.manual_axes() or not layers.local_safe(module):
        return False
    tp = set(layout.axes)
    if not tp or tp & set(gather.axes):
        return False
    allowed = tp | set(gather.axes) | set(gather.batch_axes)
    for var in jax.tree.leaves(
        nnx.state(module, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable)
    ):
        if _specs.spec_axes(_compat.get_declared_spec(var) or ()) - allowed:
            return False
    if jax.tree.leaves(nnx.state(module, nnx.Not(nnx.Param))):
        return False
    return args is None or _inputs_fit(args, kwargs or {}, hooks)


def _inputs_fit(args, kwargs, hooks: ModuleHooks) -> bool:
    """One batched array input, divisible over the batch axes; no other arrays."""
    if not args or not is_array(args[0]) or args[0].ndim < 2:
        return False
    if any(is_array(a) for a in jax.tree.leaves((args[1:], kwargs))):
        return False
    n_batch = math.prod(hooks.mesh.shape[a] for a in hooks.gather.batch_axes)
    return args[0].shape[0] % n_batch == 0


def _manual_io_spec(ndim: int, batch_entry, trailing: tuple | None) -> P:
    trailing = tuple(None if e is _compat.UNCONSTRAINED else e for e in (trailing or ()))
    middle = max(ndim - 1 - len(trailing), 0)
    return P(batch_entry, *([None] * middle), *trailing[-(ndim - 1) :] if ndim > 1 else ())


def _scatter_dim(spec: P, axes: set[str]) -> int | None:
    for d, entry in enumerate(spec):
        if set(_specs.axes_of(entry)) & axes:
            return d
    return None


def call(module, method, hooks: ModuleHooks, args, kwargs):
    """The call, fully manual over the batch, FSDP and tensor-parallel axes."""
    layout, gather, mesh = hooks.layout, hooks.gather, hooks.mesh
    entry = _specs.entry_of(gather.batch_axes)
    manual = set(gather.batch_axes) | set(gather.axes) | set(layout.axes)
    x = args[0]
    in_spec = _manual_io_spec(x.ndim, entry, layout.input)
    out_spec = _manual_io_spec(x.ndim + layout.rank_delta, entry, layout.output)
    graphdef, pstate = nnx.split(module, nnx.Param)
    param_in = param_specs(pstate, gather)
    if explicit_here(mesh):
        x = _compat.reshard(x, mesh, in_spec)
        pstate = laid_out(pstate, param_in, mesh)

    def compute(full, x):
        full, post = _without_post(full, layout)
        y = method(nnx.merge(graphdef, full), x, *args[1:], **kwargs)
        return _reduced(y, layout, out_spec, post)

    mapped = _compat.shard_map(
        lambda pstate, x: gathered(compute, gather, pstate, x),
        mesh=context_mesh(mesh),
        in_specs=(param_in, in_spec),
        out_specs=out_spec,
        axis_names=manual,
    )
    return mapped(pstate, x)


def _without_post(full, layout: Layout):
    """The params with those added after the reduction (a row layer's bias)
    zeroed, and those, by name."""
    post = {}
    if not layout.reduce:
        return full, post
    leaves, treedef = jax.tree_util.tree_flatten_with_path(full)
    out = []
    for path, v in leaves:
        name = join(keys(path))
        if name in layout.post:
            post[name] = v
            v = jax.numpy.zeros_like(v)
        out.append(v)
    return jax.tree_util.tree_unflatten(treedef, out), post


def _reduced(y, layout: Layout, out_spec: P, post: dict):
    """The tensor-parallel partial results summed (or sum-scattered where the
    output layout shards a reduced axis), then the post-reduction params added."""
    if not layout.reduce:
        return y
    axes = layout.reduce if len(layout.reduce) > 1 else layout.reduce[0]
    scatter = _scatter_dim(out_spec, set(layout.reduce))
    if scatter is None:
        y = jax.lax.psum(y, axes)
    else:
        y = jax.lax.psum_scatter(y, axes, scatter_dimension=scatter, tiled=True)
    for bias in post.values():
        y = y + bias.astype(y.dtype).reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
    return y
