"""Checkpoint policies, device placement, multi-process calls and tracer internals across JAX releases."""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding

# Policy names that are policies themselves, and those that build one from names.
_CHECKPOINT_POLICIES = (
    "everything_saveable",
    "nothing_saveable",
    "dots_saveable",
    "checkpoint_dots",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots_with_no_batch_dims",
)
CHECKPOINT_POLICY_FACTORIES = (
    "save_anything_except_these_names",
    "save_any_names_but_these",
    "save_only_these_names",
    "save_from_both_policies",
    "save_and_offload_only_these_names",
    "offload_dot_with_no_batch_dims",
)


def checkpoint_policies() -> dict[str, Any]:
    """Name -> policy, for the `jax.checkpoint_policies` that take no arguments."""
    ns = jax.checkpoint_policies
    return {name: getattr(ns, name) for name in _CHECKPOINT_POLICIES if hasattr(ns, name)}


def device_put(value: Any, sharding: NamedSharding) -> Any:
    return jax.device_put(value, sharding)


# Processes ------------------------------------------------------------------


def backends_initialized() -> bool:
    """True once any JAX backend has started (device counts are then fixed)."""
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def set_cpu_device_count(count: int) -> None:
    """How many CPU devices this process gets; before the backend starts.

    `jax_num_cpu_devices` wins over `--xla_force_host_platform_device_count`
    in XLA_FLAGS, so a child process can override a parent's flag.
    """
    jax.config.update("jax_num_cpu_devices", count)


def distributed_initialize(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    **kwargs: Any,
) -> None:
    """`jax.distributed.initialize`; CPU collectives default to gloo in JAX >= 0.5."""
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)


def distributed_is_initialized() -> bool:
    return jax.distributed.is_initialized()


def host_copy(x: jax.Array) -> Any:
    """The whole of `x` as a numpy array on this host, from any process.

    An array that spans processes is all-gathered across them: every process
    must call this (a collective), and each gets the whole array.
    """
    import numpy as np

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def process_allgather(x: Any, *, tiled: bool = False) -> Any:
    """`multihost_utils.process_allgather`: every process's `x`, on every process."""
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(x, tiled=tiled)


def fully_addressable(tree: Any) -> bool:
    """Whether this process holds every shard of every array in `tree`."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
    values = [v.get_value() if isinstance(v, nnx.Variable) else v for v in leaves]
    return all(x.is_fully_addressable for x in jax.tree.leaves(values) if isinstance(x, jax.Array))


def symbolic_dim(name: str) -> Any:
    """A symbolic dimension (shape polymorphism) for shape-only traces."""
    from jax import export  # noqa: PLC0415 - not imported by `import jax` on every version

    return export.symbolic_shape(name)[0]


def is_symbolic(dim: Any) -> bool:
    """True for a dimension that is an expression of symbolic dims, not a number."""
    return not isinstance(dim, int)


def trace_state() -> Any:
    """A comparable handle on the current JAX trace (equal within one trace)."""
    import jax.extend.core  # noqa: F401 - not imported by `import jax`

    return jax.extend.core.get_opaque_trace_state(convention="nnx")


# Tracing and graph traversal ------------------------------------------------------


def tracing() -> bool:
    """True while JAX traces a function (`jit`, `grad`, `vmap`, `eval_shape`, ...)."""
    try:
        from jax._src import core as jax_core
    except ImportError:  # pragma: no cover - a JAX without the private module
        return False
    clean = getattr(jax_core, "trace_state_clean", None)
    return clean is not None and not clean()


def is_tracer(value: Any) -> bool:
    """True for a value JAX is tracing (an abstract stand-in, not an array)."""
    return isinstance(value, jax.core.Tracer)


def graph_children(node: Any) -> dict | None:
    """A graph node's children by key (attributes of a Module), or None for a leaf.

    Unlike `nnx.iter_graph`, this does not skip nodes already seen, so a
    caller can find every path to a shared module or Variable.
    """
    from flax.nnx import graphlib

    if isinstance(node, nnx.Variable) or not graphlib.is_node(node):
        return None
    impl = graphlib.get_node_impl(node)
    return None if impl is None else dict(impl.node_dict(node))


def vjp_without(fun, primals: tuple, drop: list) -> tuple[Any, list, Any]:
    """`jax.vjp(fun, *primals)` whose saved residuals leave out the arrays in `drop`.

    Returns `(out, kept, rebuild)`: `kept` is the list of residual arrays to
    save, and `rebuild(kept, values)` gives back the vjp function with
    `values` (new arrays equal to `drop`'s, e.g. re-gathered parameters) in
    the places of the dropped ones. A dropped array is found by identity among
    the leaves of the vjp function, which jax.vjp returns as a pytree whose
    leaves include the primal inputs it saves as they are (jax 0.7-0.10). A
    residual that is only derived from a dropped array (a transpose, a cast)
    is kept; where a jax version keeps no primal as it is, nothing is dropped
    and the result is still exact, only larger.
    """
    out, vjp = jax.vjp(fun, *primals)
    leaves, treedef = jax.tree_util.tree_flatten(vjp)
    where = {id(x): i for i, x in enumerate(drop)}
    slots = tuple(where.get(id(leaf), -1) for leaf in leaves)
    kept = [leaf for leaf, s in zip(leaves, slots) if s < 0]

    def rebuild(kept: list, values: list):
        it = iter(kept)
        filled = [next(it) if s < 0 else values[s] for s in slots]
        return jax.tree_util.tree_unflatten(treedef, filled)

    return out, kept, rebuild


def axis_size(axes: tuple[str, ...]) -> int:
    """The number of devices along manual mesh `axes`, inside a shard_map."""
    if hasattr(jax.lax, "axis_size"):
        return math.prod(jax.lax.axis_size(a) for a in axes)
    return math.prod(int(jax.lax.psum(1, a)) for a in axes)  # older jax: a static psum


# Jaxpr evaluation (the expert route's dead-expert pruning) ----------------------------


def jaxpr_literal(var: Any) -> tuple[bool, Any]:
    """(True, value) for a jaxpr `Literal`, else (False, None)."""
    import jax.extend.core  # noqa: F401 - not imported by `import jax`

    if isinstance(var, jax.extend.core.Literal):
        return True, var.val
    return False, None


def bind_eqn(eqn: Any, invals: list) -> list:
    """Runs one jaxpr equation on `invals` in the current trace, as
    `jax.core.eval_jaxpr` does (jax 0.10: `get_bind_params` returns the params
    only; earlier releases returned `(subfuns, params)`)."""
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = ()
    if isinstance(params, tuple):
        subfuns, params = params
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]
