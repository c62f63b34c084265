"""The imperative shell: resolve a plan, then shard and hook the model in place."""

from __future__ import annotations

from typing import Any

from flax import nnx
from jax.sharding import Mesh

from nnx_parallel import _compat
from nnx_parallel.core.resolve import resolve
from nnx_parallel.errors import PlanError
from nnx_parallel.runtime.apply import apply
from nnx_parallel.runtime.sharded_init import sharded_init


def parallelize(model: nnx.Module, mesh: Mesh, plan: Any, *, strict: bool = True) -> nnx.Module:
    """Shards an NNX module in place according to a plan.

    Every `nnx.Param` gets `out_sharding` metadata (what `nnx.with_partitioning`
    writes, plus the mesh) and a value laid out with that sharding; modules that
    need call-time layouts or FSDP gathers get hooks. Parameters no rule touches
    and all other state (batch stats, RNG keys, caches) are replicated on the mesh.
    Patterns match one dotted segment per `*`; the most specific pattern wins,
    the first on ties; `""` is the root. Subtree styles (`FSDP`, `Replicated`)
    of the nearest ancestor fill in around tensor-parallel styles. `@sharded`
    declarations apply unless a pattern matches the same module. A module
    reachable at several paths (shared) matches at any of them. Everything
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
      PlanError: see `resolve`; also for a non-NNX `model`, or a call while
        JAX traces (inside `nnx.jit`, `nnx.grad`, ...).
      MeshError: an unknown mesh axis, or `mesh` is not a Mesh.

    Example:
      >>> mlp = TinyMLP(rngs=nnx.Rngs(0))
      >>> _ = parallelize(mlp, mesh8, {"up": ColumnParallel("model"), "down": RowParallel("model")})
      >>> mlp.up.kernel[...].sharding.spec
      P(None, 'model')
      >>> mlp.up.kernel.get_metadata("out_sharding")
      (None, 'model')
    """
    refuse_under_trace(model, "parallelize")
    if not isinstance(model, nnx.Module) and callable(model):
        return sharded_init(model, mesh, plan, strict=strict)  # a factory: create it sharded
    resolution = resolve(model, mesh, plan, strict=strict)
    apply(model, resolution)
    return model


def refuse_under_trace(model: Any, what: str) -> None:
    """Raises `PlanError` if JAX is tracing or `model` holds traced values.

    In-place sharding cannot happen inside a trace: `device_put` and the
    class swap would act on the transform's copy of the model (Flax then
    finds the graph changed) or on tracers. Nothing has changed yet when
    this raises.
    """
    traced = _compat.tracing()
    if not traced and isinstance(model, nnx.Module):
        traced = any(
            isinstance(node, nnx.Variable) and _compat.is_tracer(node.get_value())
            for _, node in nnx.iter_graph(model)
        )
    if traced:
        raise PlanError(
            f"{what} was called while JAX is tracing (inside nnx.jit, nnx.grad, jax.vmap or "
            f"similar): it changes the model in place and places arrays on devices, which a "
            f"trace cannot do. Call {what}(model, mesh, plan) outside jit/grad, before the "
            "training step; the jitted step then reads the sharded model."
        )
