"""ZeRO-1/2: replicated parameters, sharded optimizer state (and gradients).

Three small pieces, optax-style:

- `ZeRO(stage, axis=...)`: a plan entry. Parameters stay as they are (replicated,
  or as an earlier tensor-parallel entry left them) and get
  `optimizer_sharding` metadata, which `nnx.Optimizer` uses to create its
  state already sharded over `axis`.
- `ShardedOptimizer`: an `nnx.Optimizer` that pins every parameter and state
  array back to its own sharding after each update, so parameters never drift
  to the optimizer's layout (flax issue 5172). Works with any optax transform.
- `value_and_grad(loss_fn)`: ZeRO-2 gradients. Runs the loss inside a
  `shard_map` over `axis` and reduce-scatters each gradient to its optimizer
  shard: the gradient never exists whole and is never all-reduced.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat, _specs
from nnx_parallel.core import checks
from nnx_parallel.core.styles import ModuleContext, largest_free_dim
from nnx_parallel.errors import PlanError

OPT_KEY = "optimizer_sharding"
STAGE_KEY = "nnx_parallel_zero_stage"


@dataclasses.dataclass(frozen=True)
class ZeRO:
    """Shards optimizer state (stage 1) and gradients (stage 2) over `axis`.

    Each parameter of at least `min_size` elements gets an optimizer spec that
    shards its largest dim divisible by the axis size; the parameter itself
    keeps its spec. Use `ShardedOptimizer` for the update and, for stage 2,
    `nnx_parallel.zero.value_and_grad` for the gradients.

    Args:
      stage: 1 (optimizer state) or 2 (also gradients).
      axis: The data-parallel mesh axis.
      min_size: Smaller parameters keep replicated state.

    Example:
      >>> mlp = TinyMLP(rngs=nnx.Rngs(0))
      >>> _ = parallelize(mlp, mesh2x4, ZeRO(stage=1, axis="data", min_size=16))
      >>> mlp.up.kernel[...].sharding.spec, mlp.up.kernel.get_metadata("optimizer_sharding")
      (P(None, None), (None, 'data'))
    """

    stage: int = 2
    _: dataclasses.KW_ONLY
    axis: str = "data"
    min_size: int = 2**10
    subtree = True

    def __post_init__(self):
        checks.validate(self, {"axis": checks.one_axis, "min_size": checks.RULES["min_size"]})
        if self.stage not in (1, 2):
            raise PlanError(
                f"ZeRO(stage={self.stage!r}): stage must be 1 or 2. For stage 3 use FSDP()."
            )

    def param_specs(self, ctx: ModuleContext) -> dict[str, P]:
        ctx.check_axes(self, self.axis)
        return {n: ctx.current.get(n) or _specs.replicated(len(s)) for n, s in ctx.shapes.items()}

    def param_metadata(self, ctx: ModuleContext, specs) -> dict[str, dict[str, Any]]:
        size = ctx.mesh.shape[self.axis]
        out = {}
        for name, shape in ctx.shapes.items():
            spec = list(_specs.pad(specs[name], len(shape)))
            best = largest_free_dim(shape, spec, size)
            if math.prod(shape) >= self.min_size and best is not None:
                spec[best] = self.axis
            out[name] = {OPT_KEY: tuple(spec), STAGE_KEY: self.stage}
        return out

    def hooks(self, ctx, specs):
        return None


def _pin(variables, mesh_of) -> None:
    for var in jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        if not isinstance(var, nnx.Variable):
            continue
        spec, mesh = _compat.get_declared_spec(var), mesh_of(var)
        value = var.get_value()
        if spec is None or mesh is None or not hasattr(value, "ndim"):
            continue
        _compat.set_value(var, _compat.constrain(value, mesh, P(*spec)))


class ShardedOptimizer(nnx.Optimizer):
    """`nnx.Optimizer` whose parameters and state keep their own shardings.

    After each update every parameter is constrained to its `out_sharding`
    and every state array to its own (the `optimizer_sharding` of its
    parameter), so the all-gather of the updated shard back to replicated
    parameters is explicit and parameters never drift.

    Example:
      >>> import optax
      >>> mlp = TinyMLP(rngs=nnx.Rngs(0))
      >>> _ = parallelize(mlp, mesh2x4, ZeRO(stage=1, axis="data", min_size=16))
      >>> opt = ShardedOptimizer(mlp, optax.adam(1e-3), wrt=nnx.Param)
      >>> opt.opt_state[0].mu["up"]["kernel"][...].sharding.spec
      P(None, 'data')
    """

    def update(self, model, grads, /, **kwargs):
        updates = super().update(model, grads, **kwargs)
        mesh_of = lambda v: v.get_metadata().get("mesh")  # noqa: E731
        _pin(nnx.state(model, self.wrt), mesh_of)
        _pin(self.opt_state, mesh_of)
        return updates


def value_and_grad(loss_fn: Callable[..., jax.Array], *, axis: str = "data") -> Callable:
    """ZeRO-2 `nnx.value_and_grad`: gradients come out reduce-scattered.

    `loss_fn(model, *batch)` must return the MEAN loss over its batch; every
    array in `batch` is split over `axis` on dim 0. Parameters whose
    `ZeRO(stage=2)` metadata names an optimizer shard get that shard of the
    mean gradient (one reduce-scatter); other parameters get the whole mean
    gradient (one all-reduce). Non-parameter state is read, not updated.

    Returns:
      A function `(model, *batch) -> (loss, grads)`, `grads` an `nnx.State`
      shaped like `nnx.state(model, nnx.Param)`.

    Example:
      >>> mlp = TinyMLP(rngs=nnx.Rngs(0))
      >>> _ = parallelize(mlp, mesh2x4, ZeRO(stage=2, axis="data", min_size=16))
      >>> loss_fn = lambda m, x: (m(x) ** 2).mean()
      >>> with jax.set_mesh(mesh2x4):
      ...     loss, grads = nnx.jit(value_and_grad(loss_fn))(mlp, jax.numpy.ones((8, 16)))
      >>> grads["up"]["kernel"][...].sharding.spec
      P(None, 'data')
    """

    def run(model, *batch):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        variables = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
        mesh = next(
            (v.get_metadata().get("mesh") for v in variables if v.get_metadata().get("mesh")), None
        )
        if mesh is None or axis not in mesh.axis_names:
            raise PlanError(
                f"zero.value_and_grad(axis={axis!r}): the model's parameters carry no mesh with axis "
                f"{axis!r}. Call parallelize(model, mesh, ZeRO(stage=2, axis={axis!r})) first."
            )
        dims = [scatter_dim(axis)(v) for v in variables]
        leaves, treedef = jax.tree.flatten(params)
        n = mesh.shape[axis]

        def local(params, rest, batch):
            varying = jax.tree.map(lambda p: _compat.pcast_varying(p, axis), params)

            def f(p):
                return loss_fn(nnx.merge(graphdef, p, rest), *batch)

            loss, grads = jax.value_and_grad(f)(varying)
            reduced = [
                jax.lax.psum(g, axis) / n
                if d < 0
                else jax.lax.psum_scatter(g, axis, scatter_dimension=d, tiled=True) / n
                for g, d in zip(jax.tree.leaves(grads), dims)
            ]
            grads = jax.tree.unflatten(jax.tree.structure(grads), reduced)
            return jax.lax.pmean(loss, axis), grads

        grad_specs = jax.tree.unflatten(
            treedef,
            [P(*[axis if i == d else None for i in range(x.ndim)]) for x, d in zip(leaves, dims)],
        )
        batch_specs = jax.tree.map(lambda x: P(axis) if hasattr(x, "ndim") else None, batch)
        mapped = _compat.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(), P(), batch_specs),
            out_specs=(P(), grad_specs),
            axis_names={axis},
        )
        return mapped(params, rest, batch)

    run.zero_loss_fn, run.zero_axis = loss_fn, axis  # accumulate() defers the reduce-scatter
    return run


def scatter_dim(axis: str):
    def dim(var) -> int:
        meta = var.get_metadata()
        spec = meta.get(OPT_KEY)
        if meta.get(STAGE_KEY, 0) < 2 or not spec or axis not in spec:
            return -1
        return tuple(spec).index(axis)

    return dim


def memory_per_device(model, optimizer=None, grads=None) -> dict[str, int]:
    """Bytes per device of parameters, gradients and optimizer state.

    Each array counts its shard size (the first device's shard).
    """

    def size(tree) -> int:
        total = 0
        for x in jax.tree.leaves(tree):
            if hasattr(x, "sharding") and hasattr(x, "shape"):
                shard = x.sharding.shard_shape(x.shape)
                total += math.prod(shard) * x.dtype.itemsize
        return total

    out = {"params": size(nnx.state(model, nnx.Param))}
    if grads is not None:
        out["grads"] = size(grads)
    if optimizer is not None:
        out["optimizer"] = size(optimizer.opt_state)
    return out
