"""`estimate`: the per-device memory and traffic of one train step, before running it.

The plan is resolved on abstract state (`abstract_parallelize`), the
optimizer is built under `nnx.eval_shape`, and the train step is lowered and
compiled ahead of time on `ShapeDtypeStruct`s that carry the planned
shardings. Nothing is allocated on any device. XLA's `memory_analysis` of
that program gives the footprint, and `communication_report` (the project's
one HLO parser) the collectives.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat, _specs, zero
from nnx_parallel.core.resolve import Resolution
from nnx_parallel.data import batch_spec
from nnx_parallel.errors import MeshAxisError, PlanError, did_you_mean
from nnx_parallel.runtime.sharded_init import abstract_copy, abstract_parallelize
from nnx_parallel.views import _text
from nnx_parallel.views.report import CommunicationReport

LossFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Per-device bytes and wire traffic of one compiled train step.

    Attributes:
      argument_bytes: Inputs: parameters, optimizer state and the batch shard.
      output_bytes: Outputs: the updated parameters and state, the loss.
      temp_bytes: XLA's scratch: activations, gathered weights, gradients.
      alias_bytes: Outputs written over donated inputs (counted once).
      peak_bytes: `argument + output + temp - alias`: what one device needs.
      wire_bytes: Bytes each device sends per step (ring algorithms).
      wire_by_kind: Collective kind -> wire bytes (kinds with traffic only).
      wire_by_axis: `(kind, mesh axes)` -> wire bytes.
      communication: The full `CommunicationReport` of the step.

    Example:
      >>> est = npx.estimate(TinyMLP(rngs=nnx.Rngs(0)), fsdp8, npx.plans.fsdp(min_size=16),
      ...                    jax.ShapeDtypeStruct((8, 16), jax.numpy.float32))
      >>> est.peak_bytes == est.argument_bytes + est.output_bytes + est.temp_bytes - est.alias_bytes
      True
      >>> sorted(est.wire_by_kind)
      ['all-gather', 'all-reduce', 'reduce-scatter']
    """

    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    peak_bytes: int
    wire_bytes: float
    wire_by_kind: dict[str, float]
    wire_by_axis: dict[tuple[str, tuple[str, ...]], float]
    communication: CommunicationReport = dataclasses.field(repr=False)

    def __str__(self) -> str:
        mesh = _text.mesh_text(self.communication.mesh)
        rows = [
            ["arguments", _text.human(self.argument_bytes), "parameters, optimizer state, batch"],
            ["outputs", _text.human(self.output_bytes), "updated state, loss"],
            ["temp", _text.human(self.temp_bytes), "activations, gathered weights, gradients"],
            ["aliased", _text.human(self.alias_bytes), "outputs that reuse donated inputs"],
            ["peak", _text.human(self.peak_bytes), "arguments + outputs + temp - aliased"],
        ]
        lines = [f"one train step on {mesh}, per device:"]
        lines += _text.table(["memory", "bytes", ""], rows, right={1})
        lines.append(f"wire bytes per step: {_text.human(self.wire_bytes)}")
        if self.wire_by_axis:
            traffic = [
                [kind, "+".join(axes) or "?", _text.human(n)]
                for (kind, axes), n in sorted(self.wire_by_axis.items())
            ]
            lines += _text.table(["collective", "axes", "sent/device"], traffic, right={2})
        return "\n".join(lines)

    @classmethod
    def from_compiled(cls, compiled: Any, mesh: Mesh) -> Estimate:
        """Reads a compiled step (`jax.stages.Compiled`)."""
        report = CommunicationReport.from_compiled(compiled, mesh)
        args, out = report.argument_bytes or 0, report.output_bytes or 0
        temp, alias = report.temp_bytes or 0, report.alias_bytes or 0
        by_axis = {k: s.traffic for k, s in report.by_kind_and_axis.items() if s.count}
        by_kind = {k: s.traffic for k, s in report.by_kind.items() if s.count}
        return cls(
            argument_bytes=args,
            output_bytes=out,
            temp_bytes=temp,
            alias_bytes=alias,
            peak_bytes=args + out + temp - alias,
            wire_bytes=report.total.traffic,
            wire_by_kind=by_kind,
            wire_by_axis=by_axis,
            communication=report,
        )


def estimate(
    model: nnx.Module | Callable[[], nnx.Module],
    mesh: Mesh,
    plan: Any,
    batch: Any,
    *,
    loss_fn: LossFn | None = None,
    optimizer: optax.GradientTransformation | None = None,
    batch_axes: tuple[str, ...] | None = None,
) -> Estimate:
    """Predicts one train step's per-device memory and traffic; allocates nothing.

    The step is what a training loop runs: `nnx.value_and_grad(loss_fn)`
    (for `ZeRO(stage=2)` plans, `nnx_parallel.zero.value_and_grad`), then
    `ShardedOptimizer.update`, jitted with the model and optimizer donated.
    It is compiled ahead of time for `mesh` on abstract state with the
    planned shardings, so the figures are XLA's own for that program.

    Args:
      model: The model (concrete or abstract; it is not modified, and an
        earlier `parallelize` is ignored) or a zero-argument factory.
      mesh: The mesh to plan for.
      plan: As for `parallelize`.
      batch: The global batch: an array, a `jax.ShapeDtypeStruct`, or a
        tuple of them (the positional arguments of `loss_fn` after the
        model). Arrays and structs with a `NamedSharding` keep it.
      loss_fn: `loss_fn(model, *batch) -> scalar`; default: the mean square
        of `model(*batch)`.
      optimizer: An optax transform (default `optax.adam(1e-3)`), an
        `nnx.Optimizer`, or a factory `model -> nnx.Optimizer` (built
        abstractly, for its transform).
      batch_axes: Mesh axes that split dim 0 of each batch array without a
        sharding; default `batch_spec(mesh)` ('data', then 'fsdp').

    Returns:
      An `Estimate`; `print(est)` shows the memory and traffic tables.

    Raises:
      PlanError: the plan does not apply (see `resolve`), a batch argument
        is not an array (a list: pass a tuple), a batch array does not split
        over the batch axes, or `optimizer` is none of the above.
      MeshError: `batch_axes` names an axis the mesh lacks.

    Example:
      >>> est = npx.estimate(TinyMLP(rngs=nnx.Rngs(0)), mesh8, Replicated(),
      ...                    jax.ShapeDtypeStruct((8, 16), jax.numpy.float32), batch_axes=())
      >>> est.wire_bytes, est.peak_bytes > 0
      (0.0, True)
    """
    loss_fn = mean_square if loss_fn is None else loss_fn
    optimizer = default_optimizer() if optimizer is None else optimizer
    if isinstance(model, nnx.Module):
        model = abstract_copy(model, fresh=True)
    abstract, resolution = abstract_parallelize(model, mesh, plan)
    optimizer = _transform(optimizer, abstract)
    batch = batch if isinstance(batch, tuple) else (batch,)
    batch = tuple(_abstract_batch(x, mesh, batch_axes) for x in batch)
    with jax.set_mesh(mesh):
        opt = _abstract_optimizer(abstract, optimizer, mesh)
        step = train_step(loss_fn, zero_axis=_zero2_axis(resolution))
        compiled = step.lower(abstract, opt, *batch).compile()
    return Estimate.from_compiled(compiled, mesh)


def train_step(loss_fn: LossFn, *, zero_axis: str | None = None) -> Callable:
    """The jitted step `estimate` compiles: `(model, optimizer, *batch) -> loss`.

    Model and optimizer are donated, so their updated state reuses their
    buffers. `zero_axis`: compute gradients with `zero.value_and_grad` over
    that axis (ZeRO-2).

    Example:
      >>> import optax
      >>> from nnx_parallel.memory import train_step
      >>> mlp = TinyMLP(rngs=nnx.Rngs(0))
      >>> opt = npx.ShardedOptimizer(mlp, optax.sgd(0.1), wrt=nnx.Param)
      >>> float(train_step(lambda m, x: (m(x) ** 2).mean())(mlp, opt, jax.numpy.ones((2, 16)))) > 0
      True
    """
    grad_fn = (
        nnx.value_and_grad(loss_fn)
        if zero_axis is None
        else zero.value_and_grad(loss_fn, axis=zero_axis)
    )

    def step(model, opt, *batch):
        loss, grads = grad_fn(model, *batch)
        opt.update(model, grads)
        return loss

    return nnx.jit(step, donate_argnums=(0, 1))


@functools.cache
def default_optimizer() -> optax.GradientTransformation:
    """`optax.adam(1e-3)`, one instance (so results keyed on it can be reused)."""
    return optax.adam(1e-3)


def mean_square(model, *batch) -> jax.Array:
    """The default loss: the mean square of `model(*batch)`, in float32."""
    return jnp.mean(jnp.square(model(*batch).astype(jnp.float32)))


def _zero2_axis(resolution: Resolution) -> str | None:
    """The axis of a ZeRO-2 plan's gradient shards, or None."""
    for entry in resolution.params.values():
        meta = dict(entry.metadata)
        if meta.get(zero.STAGE_KEY) == 2:
            axes = [e for e in meta.get(zero.OPT_KEY, ()) if isinstance(e, str)]
            if axes:
                return axes[0]
    return None


def _transform(optimizer: Any, model: nnx.Module) -> optax.GradientTransformation:
    """The optax transform of `optimizer`: a transform, an `nnx.Optimizer`, or a factory
    `model -> nnx.Optimizer` (evaluated abstractly, for its `tx`)."""
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    if callable(optimizer) and not isinstance(optimizer, nnx.Pytree):
        optimizer = nnx.eval_shape(optimizer, model)
    tx = getattr(optimizer, "tx", None)
    if not isinstance(tx, optax.GradientTransformation):
        raise PlanError(
            f"estimate(optimizer=...) got {type(optimizer).__name__}: expected an optax "
            "transform (optax.adam(1e-3)), an nnx.Optimizer, or a factory "
            "`lambda m: nnx.Optimizer(m, tx, wrt=nnx.Param)`."
        )
    return tx


def _batch_axes(mesh: Mesh, batch_axes: Any) -> tuple[str, ...]:
    axes = _specs.axes_of(batch_axes)
    for a in axes:
        if a not in mesh.axis_names:
            raise MeshAxisError(
                f"batch_axes={batch_axes!r} names {a!r}, which the mesh {dict(mesh.shape)} does "
                f"not have.{did_you_mean(str(a), mesh.axis_names)} Name mesh axes, or pass "
                "batch_axes=() to replicate the batch."
            )
    return axes


def _abstract_batch(x: Any, mesh: Mesh, batch_axes: tuple[str, ...] | None) -> jax.ShapeDtypeStruct:
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise PlanError(
            f"estimate: a batch argument is a {type(x).__name__}, not an array: batch must be an "
            "array, a jax.ShapeDtypeStruct, or a tuple of them (the loss_fn's arguments after "
            "the model). Pass e.g. batch=(x, y), or tuple(batch) for a list."
        )
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.shape == mesh.shape:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, sharding.spec))
    spec = batch_spec(mesh) if batch_axes is None else _spec(_batch_axes(mesh, batch_axes))
    axes = tuple(a for e in spec for a in _specs.axes_of(e))
    size = math.prod(mesh.shape[a] for a in axes)
    if axes and (not x.shape or x.shape[0] % size):
        raise PlanError(
            f"a batch array of shape {tuple(x.shape)} does not split over the batch axes {axes} "
            f"(size {size}): dim 0 must be a multiple of {size}. Pass a batch of a multiple of "
            f"{size} rows, or batch_axes=() to replicate it."
        )
    spec = spec if axes else P()
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))


def _spec(axes: tuple[str, ...]) -> P:
    if not axes:
        return P()
    return P(axes if len(axes) > 1 else axes[0])


def _abstract_optimizer(model: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh):
    """A `ShardedOptimizer` of `ShapeDtypeStruct`s, laid out as a real one would be:
    each state array as its Variable's `out_sharding` says (the parameter's, or
    ZeRO's `optimizer_sharding`), everything else (step counts) replicated."""
    opt = nnx.eval_shape(lambda m: zero.ShardedOptimizer(m, tx, wrt=nnx.Param), model)
    for _, node in nnx.iter_graph(opt):
        if not isinstance(node, nnx.Variable):
            continue
        value = node.get_value()
        if not hasattr(value, "shape"):
            continue
        spec = _compat.get_declared_spec(node)
        spec = P(*spec) if spec is not None and len(spec) == len(value.shape) else P()
        sds = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=NamedSharding(mesh, spec))
        _compat.set_value(node, sds)
    return opt
