"""The Explicit-axes guard: model code that sharding-in-types refuses runs in `auto_axes`.

On Explicit axes every array's type carries its sharding, and JAX refuses an
op whose output sharding it cannot infer or whose operands disagree: a
parent reading its child's table with `.at[ids].get(out_sharding=None)`, a
table lookup in a custom `encode` method, or a replicated KV cache taking a
`dynamic_update_slice` from batch-sharded keys. The same code runs on Auto
axes, where GSPMD chooses those layouts. It is the user's code, so nothing
can tell in advance whether it is clean; JAX tells at trace time, with a
`ShardingTypeError`.

`parallelize` on a mesh with an Explicit axis hooks the root module
(`ModuleHooks.guard`). Its call is traced as written; where JAX raises a
`ShardingTypeError`, the module's state is put back and the call is traced
again inside `auto_axes` (`jax.sharding`) over every mesh axis, with a
`FallbackWarning`. Inside, the hooked modules take their Auto routes. The
outputs leave the region laid out like the batch: an output whose leading
dim equals the first input's takes that input's leading sharding (and its
dim-1 sharding where the input's dim 1 is sharded and the sizes match: a
sequence under context parallelism), the others are replicated; the
module's non-Param state (caches, counters) keeps the sharding each array
had before the call. Modules passed in the arguments
(a list of caches as `cache=`) go into the region as state and are written
back the same way.

The cost: GSPMD, not the model's types, lays out the activations inside,
and an output or cache that was replicated comes back replicated (an
all-gather where the update was batch-sharded). Give caches the batch's
layout to stay on the typed path (`tests/test_real_world.py` does).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat
from nnx_parallel.runtime import gather, layout

AUTO_AXES = "guard.auto-axes"


def _is_node(x: Any) -> bool:
    return isinstance(x, (nnx.Module, nnx.Variable))


def active(mesh: Mesh) -> bool:
    """True where the guard may retry: Explicit axes, outside our manual regions."""
    return layout.explicit_here(mesh) and not _compat.manual_axes()


def guarded(module, call, name: str, mesh: Mesh, args, kwargs, record, records):
    """`call(module, *args, **kwargs)`, traced again in `auto_axes` if JAX's
    sharding-in-types refuses it (see the module docstring).

    `records` are the route logs of `dispatch.recording`: what a refused
    trace wrote there is taken back, like the module's state.
    """
    if not active(mesh):
        return call(module, *args, **kwargs)
    nodes = (module,) + _nodes(args, kwargs)
    saved = jax.tree.map(lambda x: x, nnx.state(nodes))  # the values, not the Variables
    token = gather.last_token_state()
    take_back = _marks(records)
    try:
        return call(module, *args, **kwargs)
    except Exception as error:  # noqa: BLE001 - only ShardingTypeError is retried
        if not _compat.is_sharding_type_error(error):
            raise
        nnx.update(nodes, saved)
        gather.restore_last_token_state(token)
        take_back()
        first = str(error).strip().splitlines()[0][:200]
        where = f"{type(module).__name__}.{name}"
        layout.warn_once(
            (where, "guard"),
            f"{where}: JAX's Explicit axes refuse this call's own code ({first}); tracing it "
            "again inside auto_axes, where GSPMD picks the layouts; outputs come "
            "back batch-sharded like the input (or replicated).",
        )
        record(AUTO_AXES)
        try:
            return in_auto_axes(module, call, mesh, args, kwargs, records)
        except Exception as retry:  # noqa: BLE001 - report the original refusal
            error.add_note(f"nnx_parallel: the retry inside auto_axes failed too: {retry!r}")
            raise error from retry


def _marks(records):
    """A function that takes back what the route logs got after this point."""
    lengths = [len(log) for log in records]

    def take_back():
        for log, n in zip(records, lengths):
            del log[n:]

    return take_back


def _nodes(args, kwargs) -> tuple:
    leaves = jax.tree.leaves((args, kwargs), is_leaf=_is_node)
    return tuple(leaf for leaf in leaves if _is_node(leaf))


def in_auto_axes(module, call, mesh: Mesh, args, kwargs, records=()):
    """The call with every mesh axis Auto inside; outputs and state laid out
    as the module docstring says. A shape-only trace (hooks aside, its routes
    taken back from `records`) finds the outputs first."""
    leaves, treedef = jax.tree.flatten((args, kwargs), is_leaf=_is_node)
    node_at = [i for i, leaf in enumerate(leaves) if _is_node(leaf)]
    array_at = [i for i, leaf in enumerate(leaves) if layout.is_array(leaf)]
    nodes = (module,) + tuple(leaves[i] for i in node_at)
    graphdef, state = nnx.split(nodes)
    before = _specs_by_path(nnx.state(nodes, nnx.Not(nnx.Param)))

    def run(state, arrays):
        inner = nnx.merge(graphdef, state)
        new = list(leaves)
        for i, node in zip(node_at, inner[1:]):
            new[i] = node
        for i, array in zip(array_at, arrays):
            new[i] = array
        a, kw = jax.tree.unflatten(treedef, new)
        return call(inner[0], *a, **kw), nnx.state(inner, nnx.Not(nnx.Param))

    arrays = [leaves[i] for i in array_at]
    take_back = _marks(records)
    with layout.probe():
        shapes = jax.eval_shape(_compat.auto_axes(run, mesh=mesh, out_sharding=P()), state, arrays)
    take_back()
    batch = _batch_entry(arrays)
    out_specs = jax.tree.map(lambda s: _batch_like(s, batch), shapes[0])
    state_specs = _state_specs(shapes[1], before, batch)
    out, rest = _compat.auto_axes(run, mesh=mesh, out_sharding=(out_specs, state_specs))(
        state, arrays
    )
    nnx.update(nodes, rest)
    return out


def _batch_entry(arrays) -> tuple[tuple, tuple] | None:
    """(sizes, spec entries) of the first array input's leading dim, and of
    its dim 1 where that is sharded (a sequence, under context parallelism)."""
    for x in arrays:
        if getattr(x, "ndim", 0):
            spec = layout.type_spec(x)
            n = 2 if x.ndim > 1 and spec[1] is not None else 1
            return tuple(x.shape[:n]), tuple(spec[:n])
    return None


def _batch_like(s, batch) -> P:
    if batch is None or not getattr(s, "ndim", 0) or s.shape[0] != batch[0][0]:
        return P()
    n = 2 if len(batch[0]) == 2 and s.ndim > 1 and s.shape[1] == batch[0][1] else 1
    return P(*batch[1][:n])


def _specs_by_path(state) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    return {path: (x.shape, layout.type_spec(x)) for path, x in flat if layout.is_array(x)}


def _state_specs(shapes, before: dict, batch):
    """Each state leaf keeps the spec it had before the call; a new one is batch-like."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    specs = []
    for path, s in flat:
        shape, spec = before.get(path, (None, None))
        specs.append(P(*spec) if shape == s.shape else _batch_like(s, batch))
    return jax.tree.unflatten(treedef, specs)
