"""Every version-sensitive JAX / Flax access, in one place.

Flax renamed the sharding metadata key across releases (`sharding`,
`sharding_names`, `out_sharding`) and deprecated `Variable.value`; JAX moved
`shard_map`, added `AxisType` and `reshard`. Nothing else in the package
touches these APIs directly, so a new release means editing this file only.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# The metadata key `nnx.with_partitioning` writes, newest first.
_SHARDING_KEYS = ("out_sharding", "sharding_names", "sharding")
SHARDING_KEY = "out_sharding"
# Our own marker: which plan pattern (or decorator) set a Variable's spec.
SOURCE_KEY = "nnx_parallel_source"

UNCONSTRAINED = P.UNCONSTRAINED


# Variables ----------------------------------------------------------------


def get_value(var: nnx.Variable) -> Any:
    return var.get_value()


def set_value(var: nnx.Variable, value: Any) -> None:
    var.set_value(value)


def get_metadata(var: nnx.Variable) -> dict[str, Any]:
    return dict(var.get_metadata())


def get_declared_spec(var: nnx.Variable, *, raw: bool = False) -> tuple | None:
    """The spec a Variable's own metadata declares (any key Flax ever used).

    Names are mapped through the Variable's `sharding_rules` metadata, as
    Flax does, unless `raw`.
    """
    meta = get_metadata(var)
    for key in _SHARDING_KEYS:
        value = meta.get(key)
        if value:
            rules = dict(meta.get("sharding_rules") or ()) if not raw else {}
            return tuple(rules.get(e, e) if isinstance(e, str) else e for e in value)
    return None


def set_sharding_metadata(var: nnx.Variable, spec: P, mesh: Mesh, source: str | None) -> None:
    """Writes what `nnx.with_partitioning(init, spec, mesh)` would have written.

    A name the old metadata had on a dim the new spec leaves unsharded, and
    that is no mesh axis (the `nnx.PARTITION_NAME` that `nnx.vmap`/`nnx.scan`
    add for a layer stack), stays, mapped to None through `sharding_rules`:
    `nnx.scan(transform_metadata=...)` checks it is still there.
    """
    entries = list(spec)
    old = get_declared_spec(var, raw=True) or ()
    rules = dict(get_metadata(var).get("sharding_rules") or ())
    if len(old) == len(entries):
        for d, (a, b) in enumerate(zip(old, entries)):
            if b is None and isinstance(a, str) and a not in mesh.axis_names:
                entries[d] = a
                rules[a] = None
    extra = {"sharding_rules": tuple(rules.items())} if rules else {}
    var.set_metadata(**{SHARDING_KEY: tuple(entries), "mesh": mesh, SOURCE_KEY: source, **extra})


def restore_metadata(var: nnx.Variable, metadata: dict[str, Any]) -> None:
    """Puts a Variable's metadata back exactly as `get_metadata` returned it."""
    current = get_metadata(var)
    for key in current:
        if key not in metadata:
            var.del_metadata(key)
    var.set_metadata(**metadata)


# Meshes -------------------------------------------------------------------


def _rebuild_mesh(ids: Any, axis_names: tuple, axis_types: tuple) -> Mesh:
    import numpy as np

    by_id = {d.id: d for d in jax.devices()}
    missing = sorted(set(np.ravel(ids).tolist()) - set(by_id))
    if missing:
        raise ValueError(
            f"nnx_parallel: cannot unpickle a mesh over devices {missing}: this process has "
            f"devices {sorted(by_id)}. Unpickle where the same devices exist, or pickle "
            "npx.gather(model) (host arrays) and parallelize again."
        )
    devices = np.vectorize(by_id.__getitem__, otypes=[object])(np.asarray(ids))
    return Mesh(devices, axis_names, axis_types=axis_types)


def _reduce_mesh(mesh: Mesh) -> tuple:
    """A Mesh pickles as its device ids (jax Devices themselves do not pickle)."""
    import numpy as np

    ids = np.vectorize(lambda d: d.id, otypes=[np.int64])(mesh.devices)
    return _rebuild_mesh, (ids, tuple(mesh.axis_names), tuple(mesh.axis_types))


def register_mesh_pickling() -> None:
    """Makes `jax.sharding.Mesh` picklable (by device ids), as our metadata holds one.

    The same devices must exist where it is unpickled. Registered with
    `copyreg`, which only `pickle` (and `copy`) consult.
    """
    import copyreg

    copyreg.pickle(Mesh, _reduce_mesh)


def axis_type(mesh: Mesh, axis: str) -> Any:
    types = getattr(mesh, "axis_types", None)
    if types is None:
        return AxisType.Auto
    return dict(zip(mesh.axis_names, types))[axis]


def is_explicit(mesh: Mesh, axes=None) -> bool:
    """True if any of `axes` (default: all of them) is an Explicit mesh axis."""
    axes = mesh.axis_names if axes is None else axes
    return any(axis_type(mesh, a) == AxisType.Explicit for a in axes)


def make_mesh(shape, names, *, explicit: bool, devices=None) -> Mesh:
    kind = AxisType.Explicit if explicit else AxisType.Auto
    kwargs = {} if devices is None else {"devices": devices}
    return jax.make_mesh(tuple(shape), tuple(names), axis_types=(kind,) * len(names), **kwargs)


def abstract_mesh() -> Any:
    """The abstract mesh of the current trace (`jax.set_mesh`, shard_map, auto_axes)."""
    return jax.sharding.get_abstract_mesh()


def no_mesh() -> Any:
    """A context in which no mesh is set: shapes trace with shardings ignored."""
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ()))


def manual_axes() -> frozenset[str]:
    """Mesh axes that are manual (inside `shard_map`) at the current trace."""
    mesh = abstract_mesh()
    return frozenset(getattr(mesh, "manual_axes", ()) or ())


def varying_axes(x: Any) -> frozenset[str]:
    """Mesh axes an array inside `shard_map` varies over (its type's varying set)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)  # `aval.mat.varying` in jax 0.10; earlier: `aval.vma`
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def current_mesh_is_empty() -> bool:
    return abstract_mesh().empty


def spec_of(x: Any) -> P | None:
    """The PartitionSpec in an array's type (Explicit axes only), else None."""
    try:
        sharding = jax.typeof(x).sharding
    except Exception:  # noqa: BLE001 - non-array leaves have no type sharding
        return None
    spec = getattr(sharding, "spec", None)
    return spec


# Sharding ops ---------------------------------------------------------------


def merge_leading(x: Any, count: int) -> Any:
    """`x` with its first `count` dims merged into one. On Explicit axes the merged
    dim keeps the axes those dims were sharded over (valid while only the first
    dim of size > 1 among them is sharded, as for a batch-sharded value)."""
    shape = (math.prod(x.shape[:count]), *x.shape[count:])
    spec = spec_of(x)
    if spec is None or not any(spec[:count]):
        return jnp.reshape(x, shape)
    axes = tuple(a for e in spec[:count] for a in (e if isinstance(e, tuple) else (e,)) if a)
    merged = P(axes[0] if len(axes) == 1 else axes, *spec[count:])
    return jnp.reshape(x, shape, out_sharding=NamedSharding(jax.typeof(x).sharding.mesh, merged))


def shard_map(f, *, mesh: Mesh, in_specs, out_specs, axis_names):
    return jax.shard_map(
        f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=set(axis_names)
    )


def reshard(x: Any, mesh: Any, spec: P) -> Any:
    """`jax.sharding.reshard`: changes the sharding in `x`'s type (Explicit axes)."""
    return jax.sharding.reshard(x, NamedSharding(mesh, spec))


def with_sharding_constraint(x: Any, mesh: Any, spec: P) -> Any:
    """A GSPMD sharding constraint (Auto axes)."""
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def constrain(x: jax.Array, mesh: Mesh, spec: P) -> jax.Array:
    """Lays `x` out as `spec`: `reshard` on Explicit axes, a constraint on Auto."""
    if is_explicit(mesh):
        return reshard(x, mesh, spec)
    return with_sharding_constraint(x, mesh, spec)


def pcast_varying(x: Any, axes: Any) -> Any:
    """`x` typed as varying over `axes` inside a shard_map (`jax.lax.pcast`; no
    data moves). An empty `axes` returns `x` as it is."""
    return jax.lax.pcast(x, axes, to="varying") if axes else x


def is_sharding_type_error(error: BaseException) -> bool:
    """True for JAX's sharding-in-types refusal (`ShardingTypeError`, private in
    jax 0.10: `jax._src.core`), matched by class name so a move does not break it."""
    return any(c.__name__ == "ShardingTypeError" for c in type(error).__mro__)


def auto_axes(f, *, mesh: Mesh, out_sharding):
    return jax.sharding.auto_axes(f, axes=tuple(mesh.axis_names), out_sharding=out_sharding)


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
