"""The `auto_axes` region: model code that sharding-in-types refuses runs with Auto axes.

On Explicit axes every array's type carries its sharding, and JAX refuses an
op whose output sharding it cannot infer or whose operands disagree: a
parent reading its child's table with `.at[ids].get(out_sharding=None)`, a
table lookup in a custom `encode` method, or a replicated KV cache taking a
`dynamic_update_slice` from batch-sharded keys. The same code runs on Auto
axes, where GSPMD chooses those layouts. It is the user's code, so nothing
can tell in advance whether it is clean; JAX tells at trace time, with a
`ShardingTypeError`.

`parallelize` on a mesh with an Explicit axis hooks the root module
(`ModuleHooks.guard`, the `wrapper:guard` of `runtime/routes.py`). Its call
is traced as written; where JAX raises a `ShardingTypeError`, the retry of
`runtime/dispatch.py` takes back what the refused trace did and runs the
call again through `auto_axes_call` here, over every mesh axis, with a
`FallbackWarning`. Inside, the hooked modules take their Auto routes. The
same region serves the routes whose `region` is `auto-axes` (a layout, FSDP
or experts on Explicit axes, context-parallel attention); those that know
their output layout pass it as `out_specs`. The
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

import jax
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat
from nnx_parallel.runtime import trace
from nnx_parallel.runtime.flat import Flat
from nnx_parallel.runtime.flat import is_array as _is_array
from nnx_parallel.runtime.layout import explicit_here, type_spec


def active(mesh: Mesh) -> bool:
    """True where the guard may retry: Explicit axes, outside our manual regions."""
    return explicit_here(mesh) and not _compat.manual_axes()


def auto_axes_call(module, call, mesh: Mesh, args, kwargs, out_specs=None):
    """`call(module, *args, **kwargs)` with every mesh axis Auto inside.

    Modules passed in the arguments go in as state and are written back.
    With `out_specs`, the output takes them and each state leaf keeps its
    layout; without, a shape-only trace finds the outputs first, which
    are laid out like the batch, and each state leaf keeps its layout (see
    the module docstring).
    """
    flat = Flat.of((args, kwargs))
    nodes = (module,) + flat.nodes
    graphdef, state = nnx.split(nodes)

    def run(state, arrays):
        inner = nnx.merge(graphdef, state)
        a, kw = flat.splice(arrays, nodes=inner[1:])
        return call(inner[0], *a, **kw), nnx.state(inner, nnx.Not(nnx.Param))

    arrays = flat.arrays
    if out_specs is not None:  # state keeps the layout each array had
        rest = nnx.state(nodes, nnx.Not(nnx.Param))
        specs = (out_specs, jax.tree.map(lambda x: P(*type_spec(x)), rest))
    else:
        before = _specs_by_path(nnx.state(nodes, nnx.Not(nnx.Param)))
        with trace.probe():
            shapes = jax.eval_shape(
                _compat.auto_axes(run, mesh=mesh, out_sharding=P()), state, arrays
            )
        batch = _batch_entry(arrays)
        specs = (
            jax.tree.map(lambda s: _batch_like(s, batch), shapes[0]),
            _state_specs(shapes[1], before, batch),
        )
    out, rest = _compat.auto_axes(run, mesh=mesh, out_sharding=specs)(state, arrays)
    nnx.update(nodes, rest)
    return out


def _batch_entry(arrays) -> tuple[tuple, tuple] | None:
    """(sizes, spec entries) of the first array input's leading dim, and of
    its dim 1 where that is sharded (a sequence, under context parallelism)."""
    for x in arrays:
        if getattr(x, "ndim", 0):
            spec = type_spec(x)
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
    return {path: (x.shape, type_spec(x)) for path, x in flat if _is_array(x)}


def _state_specs(shapes, before: dict, batch):
    """Each state leaf keeps the spec it had before the call; a new one is batch-like."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    specs = []
    for path, s in flat:
        shape, spec = before.get(path, (None, None))
        specs.append(P(*spec) if shape == s.shape else _batch_like(s, batch))
    return jax.tree.unflatten(treedef, specs)
