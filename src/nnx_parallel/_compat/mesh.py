"""Meshes, axis types, manual regions and sharding constraints across JAX releases."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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
