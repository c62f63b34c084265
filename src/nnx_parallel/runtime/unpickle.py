"""Laying an unpickled hooked module out again, as its metadata says.

`pickle` keeps each array's values but not its placement (jax arrays come
back on the default device), while the Variables keep their `out_sharding`
and `mesh` metadata (the mesh pickles by device ids, see
`_compat.register_mesh_pickling`). A hooked module's `__setstate__` calls
`relayout`: every planned parameter below it goes back to its
`NamedSharding`, and on a guarded root (Explicit axes) every other array is
replicated on the mesh, as `parallelize` left them. A module without hooks
keeps the default placement (Auto axes take it as it is).
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat, _specs
from nnx_parallel.core.layouts import ModuleHooks


def relayout(module: nnx.Module, hooks: ModuleHooks) -> None:
    """Places every array under `module` as `parallelize` had placed it."""
    for _, node in nnx.iter_graph(module):
        if not isinstance(node, nnx.Variable):
            continue
        value = node.get_value()
        if not isinstance(value, jax.Array):
            continue
        meta = _compat.get_metadata(node)
        mesh, spec = meta.get("mesh"), _compat.get_declared_spec(node)
        if _compat.SOURCE_KEY in meta and isinstance(mesh, Mesh) and spec is not None:
            target = NamedSharding(mesh, P(*spec))
        elif hooks.guard and hooks.mesh is not None and not isinstance(node, nnx.Param):
            target = NamedSharding(hooks.mesh, _specs.replicated(value.ndim))
        else:
            continue
        if value.sharding != target:
            _compat.set_value(node, _compat.device_put(value, target))
