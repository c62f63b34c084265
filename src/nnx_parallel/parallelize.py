"""The imperative shell: resolve a plan, then shard and hook the model in place."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat, hooks
from nnx_parallel.plan import Resolution, resolve, walk


def parallelize(model: nnx.Module, mesh: Mesh, plan: Any, *, strict: bool = True) -> nnx.Module:
    """Shards an NNX module in place according to a plan.

    Every `nnx.Param` gets `out_sharding` metadata (what `nnx.with_partitioning`
    writes, plus the mesh) and a value laid out with that sharding; modules that
    need call-time layouts or FSDP gathers get hooks. Parameters no rule touches
    and all other state (batch stats, RNG keys, caches) are replicated on the mesh.
    Patterns match one dotted segment per `*`; the most specific pattern wins,
    the first on ties; `""` is the root. Subtree styles (`FSDP`, `Replicated`)
    of the nearest ancestor fill in around tensor-parallel styles. `@sharded`
    declarations apply unless a pattern matches the same module. Everything
    is validated before anything changes: on error the model is untouched.

    Calling it again composes: a second plan may add axes to dims that are
    still unsharded (e.g. FSDP over `'fsdp'` after TP over `'model'`).

    Args:
      model: The module to shard; modified in place.
      mesh: Mesh whose axis names the styles refer to (Auto or Explicit axes).
      plan: A style for the whole model, or a dict pattern -> style (or a
        tuple of styles), e.g. `{"layers.*.mlp.up": ColumnParallel("model")}`.
      strict: If True, a pattern that matches no module raises `PlanError`.

    Returns:
      The same `model`, for chaining.

    Raises:
      PlanError: see `resolve`; also for a non-NNX `model`.
      MeshError: an unknown mesh axis, or `mesh` is not a Mesh.

    Example:
      >>> mlp = TinyMLP(rngs=nnx.Rngs(0))
      >>> _ = parallelize(mlp, mesh8, {"up": ColumnParallel("model"), "down": RowParallel("model")})
      >>> mlp.up.kernel[...].sharding.spec
      P(None, 'model')
      >>> mlp.up.kernel.get_metadata("out_sharding")
      (None, 'model')
    """
    if not isinstance(model, nnx.Module) and callable(model):
        from nnx_parallel.init import sharded_init  # a factory: create it in its shards

        return sharded_init(model, mesh, plan, strict=strict)
    resolution = resolve(model, mesh, plan, strict=strict)
    apply(model, resolution)
    return model


def apply(model: nnx.Module, resolution: Resolution) -> None:
    """Applies a resolution in place; restores the model if anything fails."""
    mesh = resolution.mesh
    modules, params = walk(model)
    undo: list[tuple] = []
    try:
        for path, entry in resolution.params.items():
            var = params[path][2]
            undo.append(("var", var, var.get_value(), _compat.get_metadata(var)))
            _compat.set_value(var, _place(var.get_value(), NamedSharding(mesh, entry.spec)))
            _compat.set_sharding_metadata(var, entry.spec, mesh, entry.source)
            if entry.metadata:
                var.set_metadata(**dict(entry.metadata))
        for var in _other_state(model):
            undo.append(("var", var, var.get_value(), _compat.get_metadata(var)))
            _replicate_variable(var, mesh)
        for module_path, module_hooks in resolution.hooks.items():
            module = modules[module_path]
            undo.append(("cls", module, type(module)))
            hooks.install(module, module_hooks)
    except BaseException:
        for item in reversed(undo):
            if item[0] == "var":
                _, var, value, meta = item
                _compat.set_value(var, value)
                _compat.restore_metadata(var, meta)
            else:
                object.__setattr__(item[1], "__class__", item[2])
        raise


def _place(value: Any, sharding: NamedSharding) -> Any:
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
    spec = P(*([None] * len(value.shape)))
    _compat.set_value(var, _place(value, NamedSharding(mesh, spec)))
    if _compat.get_declared_spec(var) is not None:
        _compat.set_sharding_metadata(var, spec, mesh, "")
