"""Applying a `Resolution` to a model: one transaction, validated, then undone on error.

`parallelize` and `reshard` both mutate the model in place: parameter
values and metadata, the other state's placement, and the class of every
hooked module. Each change is recorded in an `Undo` log first, so a failure
at any point (a device_put, a bad hook, a KeyboardInterrupt) puts the model
back exactly as it was.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from nnx_parallel import _compat, _specs
from nnx_parallel.core.graph import walk
from nnx_parallel.core.resolve import Resolution
from nnx_parallel.runtime import install


class Undo:
    """A log of in-place changes to Variables and module classes, newest last.

    Example:
      >>> layer = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
      >>> undo = Undo()
      >>> undo.save_variable(layer.kernel)
      >>> layer.kernel[...] = jax.numpy.zeros((2, 2))
      >>> undo.rollback()
      >>> bool(layer.kernel[...].any())
      True
    """

    def __init__(self) -> None:
        self._log: list[tuple] = []

    def save_variable(self, var: nnx.Variable) -> None:
        self._log.append(("var", var, var.get_value(), _compat.get_metadata(var)))

    def save_class(self, module: nnx.Module) -> None:
        self._log.append(("cls", module, type(module)))

    def rollback(self) -> None:
        for item in reversed(self._log):
            if item[0] == "var":
                _, var, value, meta = item
                _compat.set_value(var, value)
                _compat.restore_metadata(var, meta)
            else:
                object.__setattr__(item[1], "__class__", item[2])
        self._log.clear()


@contextlib.contextmanager
def transaction():
    """Yields an `Undo`; rolls back everything it logged if the block raises."""
    undo = Undo()
    try:
        yield undo
    except BaseException:
        undo.rollback()
        raise


def apply(model: nnx.Module, resolution: Resolution, undo: Undo | None = None) -> None:
    """Applies a resolution in place; restores the model if anything fails.

    With `undo`, changes are logged there and the caller owns the rollback.
    """
    if undo is None:
        with transaction() as undo:
            return apply(model, resolution, undo)
    mesh = resolution.mesh
    modules, params = walk(model)
    for path, entry in resolution.params.items():
        var = params[path][2]
        undo.save_variable(var)
        _compat.set_value(var, place(var.get_value(), NamedSharding(mesh, entry.spec)))
        _compat.set_sharding_metadata(var, entry.spec, mesh, entry.source)
        if entry.metadata:
            var.set_metadata(**dict(entry.metadata))
    for var in _other_state(model):
        undo.save_variable(var)
        _replicate_variable(var, mesh)
    for module_path, module_hooks in resolution.hooks.items():
        module = modules[module_path]
        undo.save_class(module)
        install.install(module, module_hooks)


def place(value: Any, sharding: NamedSharding) -> Any:
    """`value` laid out as `sharding` (a ShapeDtypeStruct gets the sharding)."""
    if isinstance(value, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)
    return _compat.device_put(value, sharding)


def _other_state(model: nnx.Module) -> list[nnx.Variable]:
    out = []
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable) and not isinstance(node, nnx.Param):
            if hasattr(node.get_value(), "shape"):
                out.append(node)
    return out


def _replicate_variable(var: nnx.Variable, mesh: Mesh) -> None:
    value = var.get_value()
    spec = _specs.replicated(len(value.shape))
    _compat.set_value(var, place(value, NamedSharding(mesh, spec)))
    if _compat.get_declared_spec(var) is not None:
        _compat.set_sharding_metadata(var, spec, mesh, "")
