"""Expert parallelism at call time: tokens move to the experts, weights stay put.

A module styled `ExpertParallel` holds its stacked experts sharded over the
expert axis: each device owns E / ep of them. Its call takes one of these
routes (`runtime/routes.py`; `runtime/dispatch.py` runs them):

- `experts manual/as-is/as-is`: a `shard_map` manual over the batch axes (which include
  the expert axis). Inside, each stack is the device's own slice, wrapped in
  a `LocalStack` that maps a global expert id to it: `w[i]` is the owned
  slice where this device owns expert i and zeros elsewhere. The tokens are
  all-gathered over the expert axis, every device runs the call on them, and
  the outputs are reduce-scattered back over the expert axis: each device
  contributes only its own experts' terms. No weight moves; per layer and
  step 4 * T * D * bytes * (ep-1)/ep move (all-gather + reduce-scatter, and
  their transposes in backward). This is the route for code that indexes
  experts one at a time (a Python loop over experts).
  Assumption: the call's output is a sum of per-expert terms, each zero for
  an expert whose weights are all zero (true for gated/affine experts whose
  last op is a per-expert matmul plus bias). Code with an expert-free term
  in the same output (a shared expert added inside the layer) must keep it
  in a separate module.
  Each device then computes only the experts it owns: the call is traced
  once and pruned per device (`runtime/pruning.py`); where it cannot be
  (a collective inside the call) every expert runs, zeros where not owned,
  at ep times the FLOPs.
- `experts as-written/as-is/as-is`: the call uses whole stacks (`einsum`, `ragged_dot`): a
  `LocalStack` refuses to become an array, and the call runs as written on
  the sharded stacks (inside any FSDP hook it also has). GSPMD keeps the
  stacks put and gathers tokens over the expert axis.
- `experts auto-axes/...`: either of the above, where JAX's Explicit sharding
  types refuse the call's own code (`ragged_dot` of replicated tokens,
  `argsort` along a sharded dim): the call runs inside `auto_axes`, its
  output laid out like its first input.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat, _specs
from nnx_parallel.core.layouts import ModuleHooks
from nnx_parallel.runtime import layout, pruning


class NotLocal(Exception):
    """The call cannot run with per-device expert slices; the reason."""


class LocalStack:
    """One device's slice of a stack of experts, indexed by global expert id.

    Inside the `experts manual` shard_map a stacked param's value is a
    `LocalStack`: `w[i]` (or `w[i, ...]`) is expert i's weights where this
    device owns expert i and zeros elsewhere, so gradients reach only owned
    experts. `w[...]` returns the stack itself. Any use of the whole stack
    (an einsum, `ragged_dot`, arithmetic) raises `NotLocal`: that code runs
    on the GSPMD route instead.
    """

    def __init__(self, local, num_experts: int, axis: str, name: str):
        self.local, self.num_experts, self.axis, self.name = local, num_experts, axis, name
        self.shape = (num_experts, *local.shape[1:])
        self.dtype, self.ndim = local.dtype, local.ndim

    def __getitem__(self, key):
        if key is Ellipsis:
            return self
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) and key else (key, ())
        if isinstance(first, bool) or not isinstance(first, (int, np.integer)):
            raise NotLocal(f"{self.name} is indexed with {key!r}, not an expert number")
        row = self._row(int(first) % self.num_experts)
        return row[rest] if rest else row

    def _row(self, i: int):
        """Expert `i`'s weights: this device's slice where it owns `i`, else zeros."""
        n = self.local.shape[0]
        j = i - jax.lax.axis_index(self.axis) * n
        row = jax.lax.dynamic_index_in_dim(self.local, jnp.clip(j, 0, n - 1), 0, keepdims=False)
        return jnp.where((j >= 0) & (j < n), row, jnp.zeros_like(row))

    def __jax_array__(self):
        raise NotLocal(f"{self.name} is used as a whole stack")

    def __array__(self, *a, **kw):
        raise NotLocal(f"{self.name} is used as a whole stack")

    def __getattr__(self, attr):
        raise NotLocal(f"{self.__dict__.get('name', 'a stack')}.{attr} is read")


class RowStack(LocalStack):
    """A stack given as one value per expert: `w[i]` is `rows[i]` (pruning's
    trace, where each expert's weights are an input of their own)."""

    def __init__(self, rows, num_experts: int, name: str):
        self.rows, self.num_experts, self.name = rows, num_experts, name
        self.shape = (num_experts, *rows[0].shape)
        self.dtype, self.ndim = rows[0].dtype, rows[0].ndim + 1

    def _row(self, i: int):
        return self.rows[i]


def local_call(module, method, hooks: ModuleHooks, args, kwargs):
    """The `experts manual/as-is/as-is` route: per-device expert slices in a
    shard_map. Raises `NotLocal` where the call cannot run that way: a
    `LocalStack` used as a whole stack, or JAX refusing one as an operand
    (`ragged_dot` and other primitives check for `__jax_array__` without
    calling it, and raise a `TypeError` or `ValueError`)."""
    try:
        return _local_call(module, method, hooks, args, kwargs)
    except (TypeError, ValueError) as e:
        raise NotLocal(f"{type(e).__name__}: {e}") from e


def constrained(call, mesh):
    """`call` with each of the module's params constrained to its own spec
    first (inside `auto_axes`, so its gradient comes back sharded as the
    param is, not replicated)."""

    def inner(m, *a, **kw):
        here = layout.context_mesh(mesh)
        for _, var in nnx.to_flat_state(nnx.state(m, nnx.Param)):
            value = var.get_value()
            var.set_value(_compat.with_sharding_constraint(value, here, _param_spec(var)))
        return call(m, *a, **kw)

    return inner


def output_spec(args) -> P:
    """Leaving `auto_axes`: the output laid out like the first input's batch dim."""
    x = next(a for a in args if layout.is_array(a))
    return layout.drop_manual(P(*layout.type_spec(x)[:1]))


def _param_spec(var) -> P:
    # A stack's params may carry no `out_sharding` (an untagged `nnx.vmap`
    # stack, core/stacks.py): then the value's own type says the layout.
    declared = _compat.get_declared_spec(var) or tuple(_compat.spec_of(var.get_value()) or ())
    ndim = var.get_value().ndim
    return P(*_specs.pad(declared[max(len(declared) - ndim, 0) :], ndim))


def stack_spec(path, var, dims: dict, axis: str):
    """A param's spec, an expert stack's with `axis` on its expert dim: a stack
    whose variable carries no layout (inside `nnx.scan` over an untagged
    stack) still enters as this device's experts, never whole."""
    spec = _param_spec(var)
    name = str(path[-1].key) if len(path) == 1 else None
    if name in dims:
        ndim = var.get_value().ndim
        spec = _specs.with_dim(spec, ndim, ndim + dims[name], axis)
    return spec


def _manual_axes(hooks: ModuleHooks) -> tuple[str, ...]:
    ex, gather, mesh = hooks.experts, hooks.gather, hooks.mesh
    manual = {ex.axis} | set(ex.batch_axes)
    if gather is not None:
        manual |= set(gather.axes) | set(gather.batch_axes)
    return tuple(a for a in mesh.axis_names if a in manual)


def _plan(module, hooks: ModuleHooks, args, kwargs):
    """What the local route needs, or `NotLocal` with the reason it cannot run."""
    ex, mesh = hooks.experts, hooks.mesh
    manual = _manual_axes(hooks)
    if set(manual) & _compat.manual_axes():
        raise NotLocal("already inside a shard_map over these axes")
    graphdef, pstate, rest = nnx.split(module, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise NotLocal("it holds state a shard_map cannot carry")
    for name, dim in ex.params:
        if getattr(module, name).get_value().ndim + dim != 0:
            raise NotLocal(f"{name}'s expert dim is not its first at call time")
    flat, treedef = jax.tree.flatten((args, kwargs))
    where = [i for i, x in enumerate(flat) if layout.is_array(x)]
    if not where or not flat[where[0]].ndim:
        raise NotLocal("no batched array input")
    batch_axes = tuple(a for a in manual if a in ex.batch_axes)
    n_batch = math.prod(mesh.shape[a] for a in batch_axes)
    b = flat[where[0]].shape[0]
    split = ex.axis in batch_axes and b % n_batch == 0
    entry = _specs.entry_of(batch_axes)
    batched = [split and flat[i].ndim > 0 and flat[i].shape[0] == b for i in where]
    return graphdef, pstate, flat, treedef, where, batched, entry if split else None, manual


def _local_call(module, method, hooks: ModuleHooks, args, kwargs):
    ex, mesh = hooks.experts, hooks.mesh
    graphdef, pstate, flat, treedef, where, batched, entry, manual = _plan(
        module, hooks, args, kwargs
    )
    dims = dict(ex.params)
    specs = jax.tree_util.tree_map_with_path(
        lambda path, var: stack_spec(path, var, dims, ex.axis),
        pstate,
        is_leaf=lambda v: isinstance(v, nnx.Variable),
    )
    param_in = jax.tree.map(lambda s: _specs.keep_axes(s, manual), specs)
    arrays = [flat[i] for i in where]
    arg_in = [P(entry) if bat else P() for bat in batched]
    if layout.explicit_here(mesh):
        arrays = [_to_manual(x, s, manual, mesh) for x, s in zip(arrays, arg_in)]

    def body(pstate, arrays):
        pstate = _gather_params(pstate, specs, dims, ex.axis, manual)
        leaves = list(flat)
        for i, a, bat in zip(where, arrays, batched):
            leaves[i] = jax.lax.all_gather(a, ex.axis, axis=0, tiled=True) if bat else a
        a, kw = jax.tree.unflatten(treedef, leaves)
        call = functools.partial(_own_experts, graphdef, method, dims, ex)
        out = _pruned(call, ex, pstate, a, kw)
        if out is None:  # the dense fallback: every expert, zeros where not owned
            out = call(pstate, a, kw, LocalStack)
        return jax.tree.map(lambda y: _combine(y, ex.axis, entry is not None), out)

    mapped = _compat.shard_map(
        body,
        mesh=layout.context_mesh(mesh),
        in_specs=(param_in, arg_in),
        out_specs=P(entry) if entry is not None else P(),
        axis_names=set(manual),
    )
    return mapped(pstate, arrays)


def _own_experts(graphdef, method, dims, ex, pstate, a, kw, stack):
    """The call with each expert stack's value a `stack(local, E, axis, name)`."""
    inner = nnx.merge(graphdef, pstate)
    for name in dims:
        var = getattr(inner, name)
        var.set_value(stack(var.get_value(), ex.num_experts, ex.axis, name))
    return method(inner, *a, **kw)


def _pruned(call, ex, pstate, a, kw):
    """The call with each device computing only its own experts (see
    `runtime/pruning.py`), or None where the call cannot be pruned."""
    names, num = [n for n, _ in ex.params], ex.num_experts
    stacks = {n: pstate[n].get_value() for n in names}
    flat, tree = jax.tree.flatten((pstate, a, kw))
    where = [i for i, x in enumerate(flat) if layout.is_array(x)]
    out_tree = []

    def traced(rows, arrays):
        leaves = list(flat)
        for i, x in zip(where, arrays):
            leaves[i] = x
        pst, a2, kw2 = jax.tree.unflatten(tree, leaves)
        by_name = {n: rows[k * num : (k + 1) * num] for k, n in enumerate(names)}
        out = call(pst, a2, kw2, lambda local, e, axis, name: RowStack(by_name[name], e, name))
        leaves_out, treedef = jax.tree.flatten(out)
        out_tree.append(treedef)
        return leaves_out

    rows = [stacks[n][0] for n in names for _ in range(num)]
    arrays = [flat[i] for i in where]
    try:
        closed = jax.make_jaxpr(traced)(rows, arrays)
    except (NotLocal, TypeError, ValueError):
        return None  # the dense fallback below meets the same code, and says why
    if pruning.has_collective(closed.jaxpr):
        return None
    per = next(iter(stacks.values())).shape[0]

    def owned_rows(r, operands):
        return {
            k * num + r * per + j: operands[0][n][j]
            for k, n in enumerate(names)
            for j in range(per)
        }

    dead = [v.aval for v in closed.jaxpr.invars[: len(rows)]]
    outs = pruning.per_device(closed, owned_rows, len(rows), ex.axis, (stacks, arrays), dead)
    return jax.tree.unflatten(out_tree[0], outs)


def _gather_params(pstate, specs, dims, axis: str, manual):
    """The module's own params whole over the manual axes, but expert stacks
    over `axis` on their expert dim (the all-gather of a composed `FSDP`).
    Submodules' params are left to their own hooks (FSDP's nested route)."""

    def gather(path, var, spec):
        value = var.get_value()
        if len(path) != 1:
            return var
        name = str(path[-1].key)
        for d, entry in enumerate(spec):
            keep = axis if name in dims and d == value.ndim + dims[name] else None
            axes = tuple(a for a in _specs.axes_of(entry) if a in manual and a != keep)
            if axes:
                value = jax.lax.all_gather(value, axes, axis=d, tiled=True)
        return var.replace(value)

    return jax.tree_util.tree_map_with_path(
        gather, pstate, specs, is_leaf=lambda v: isinstance(v, nnx.Variable)
    )


def _combine(y, axis: str, scatter: bool):
    """One output of the local call: the sum of every device's experts' terms."""
    if not layout.is_array(y) or axis not in _compat.varying_axes(y):
        raise NotLocal("an output does not come from the experts")
    if scatter:
        if y.ndim == 0 or y.shape[0] % jax.lax.axis_size(axis):
            raise NotLocal("an output has no batch dim to scatter")
        return jax.lax.psum_scatter(y, axis, scatter_dimension=0, tiled=True)
    return jax.lax.psum(y, axis)


def _to_manual(x, spec: P, manual, mesh):
    """Explicit axes: `x` laid out as `spec` on dim 0, no other dim manual."""
    have = _specs.pad(_compat.spec_of(x), x.ndim)
    want = (spec[0] if len(spec) else None,) + tuple(_specs.drop_entry(e, manual) for e in have[1:])
    if x.ndim == 0 or tuple(want) == have:
        return x
    return _compat.reshard(x, layout.context_mesh(mesh), P(*want))
