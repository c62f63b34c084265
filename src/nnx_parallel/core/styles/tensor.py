"""Tensor-parallel and explicit-spec styles: ColumnParallel, RowParallel, Shard, Replicated."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from jax.sharding import PartitionSpec as P

from nnx_parallel import _specs
from nnx_parallel._specs import AxisNames
from nnx_parallel.core import checks, layers
from nnx_parallel.core.layouts import Layout, ModuleHooks
from nnx_parallel.core.styles.base import ModuleContext
from nnx_parallel.errors import PlanError, did_you_mean


def _find_weight(style, ctx: ModuleContext) -> str:
    if style.param is not None:
        if style.param not in ctx.shapes:
            raise ctx.fail(
                style,
                None,
                f"it has no parameter {style.param!r} (it has {sorted(ctx.shapes)})",
                f"Pass param= one of {sorted(ctx.shapes)}.{did_you_mean(style.param, ctx.shapes)}",
            )
        return style.param
    found = layers.weight_name(ctx.shapes)
    if found is not None:
        return found
    kind = type(ctx.module).__name__
    raise ctx.fail(
        style,
        None,
        f"a {kind} with parameters {sorted(ctx.shapes) or 'none'} has no single weight matrix",
        "Point the pattern at the layer that owns the weight, or pass "
        f"param='<name>' (and dim=) to {type(style).__name__}.",
    )


def _trailing(pos_from_end: int | None, axis: AxisNames | None) -> tuple | None:
    if pos_from_end is None:
        return None
    out = [None] * pos_from_end
    out[0] = axis
    return tuple(out)


class _TensorParallel:
    """Shared mechanics of ColumnParallel and RowParallel."""

    subtree = False
    _column: bool

    def __post_init__(self) -> None:
        checks.validate(self)

    def _weight_dim(self, ctx: ModuleContext, weight: str) -> int:
        ndim = len(ctx.shapes[weight])
        if self.dim is not None:
            if not -ndim <= self.dim < ndim:
                raise ctx.fail(
                    self,
                    weight,
                    f"dim={self.dim} is out of range for shape {ctx.shapes[weight]}",
                    f"Pass a dim in [{-ndim}, {ndim - 1}].",
                )
            return self.dim % ndim
        return self._dims(ctx, weight)[0]

    def _dims(self, ctx: ModuleContext, weight: str) -> tuple[int, int | None, int]:
        shape = ctx.shapes[weight]
        return layers.tp_dims(
            ctx.module, len(shape), self._column, shape, _specs.size(ctx.mesh, self.axis)
        )

    def param_specs(self, ctx: ModuleContext) -> dict[str, P]:
        ctx.check_axes(self, self.axis)
        weight = _find_weight(self, ctx)
        w_shape = ctx.shapes[weight]
        dim = self._weight_dim(ctx, weight)
        specs = {weight: _specs.with_dim(ctx.current.get(weight), len(w_shape), dim, self.axis)}
        for name, shape in ctx.shapes.items():
            if name == weight:
                continue
            bias_dim = dim - (len(w_shape) - len(shape))
            shard = (
                self._column
                and self.shard_bias
                and 0 <= bias_dim < len(shape)
                and shape[bias_dim] == w_shape[dim]
            )
            specs[name] = (
                _specs.with_dim(ctx.current.get(name), len(shape), bias_dim, self.axis)
                if shard
                else (ctx.current.get(name) or _specs.replicated(len(shape)))
            )
        return specs

    def _default_layout(self, ctx: ModuleContext, weight: str, dim: int) -> Layout:
        raise NotImplementedError

    def hooks(self, ctx: ModuleContext, specs: Mapping[str, P]) -> ModuleHooks | None:
        weight = _find_weight(self, ctx)
        dim = self._weight_dim(ctx, weight)
        layout = self._default_layout(ctx, weight, dim)
        parts = layers.einsum_parts(ctx.module)
        if parts is not None:
            x_sub, _, out_sub = parts
            out_from = tuple(x_sub.index(c) if c in x_sub else None for c in out_sub)
            layout = dataclasses.replace(layout, out_from=out_from)
        if self.input_spec is not None:
            layout = dataclasses.replace(layout, input=tuple(self.input_spec))
        if self.output_spec is not None:
            layout = dataclasses.replace(layout, output=tuple(self.output_spec))
        if layout.input is None and layout.output is None:
            return None
        return ModuleHooks(layout=layout)


@dataclasses.dataclass(frozen=True)
class ColumnParallel(_TensorParallel):
    """Shards a layer's output features over `axis` (Megatron's column split).

    The weight's output-feature dim is sharded, so is the bias; the output
    activation stays sharded on its feature dim, ready for a `RowParallel`
    layer. Forward needs no communication.

    Args:
      axis: Mesh axis (or tuple of axes; a list becomes a tuple) to shard over.
      param: Name of the weight; default: `kernel`, `embedding`, `weight`,
        `w`, or the module's only matrix.
      dim: Weight dim to shard; default: the output-feature dim (last for
        `Linear`/`Conv`/`Embed`, the first output dim for `LinearGeneral`,
        the first kernel letter only in the output for `Einsum`).
      shard_bias: Also shard the matching bias dim.
      input_spec: Layout to put the input in, aligned to trailing dims.
      output_spec: Layout of the output, aligned to trailing dims; default:
        the feature dim sharded over `axis`.

    Every field is checked when the style is built (see `core/checks.py`):
    a bad value raises `PlanError` there, naming the field.

    Example:
      >>> layer = nnx.Linear(16, 32, rngs=nnx.Rngs(0))
      >>> _ = parallelize(layer, mesh8, ColumnParallel("model"))
      >>> layer.kernel[...].sharding.spec, layer.bias[...].sharding.spec
      (P(None, 'model'), P('model',))
    """

    axis: AxisNames = "model"
    _: dataclasses.KW_ONLY
    param: str | None = None
    dim: int | None = None
    shard_bias: bool = True
    input_spec: tuple | None = None
    output_spec: tuple | None = None
    _column = True

    def _default_layout(self, ctx, weight, dim):
        default_dim, out_pos, delta = self._dims(ctx, weight)
        parts = layers.einsum_parts(ctx.module)
        if dim != default_dim:
            if layers.vocab_lookup(ctx.module, dim):
                # Vocab-parallel lookup: features come out whole (and Explicit
                # axes need that said, as the lookup's out_sharding).
                return Layout(output=(None,), rank_delta=delta)
            out_pos = None  # a custom dim: we cannot know where it lands, unless an einsum says
            if (
                parts is not None
                and len(parts[1]) == len(ctx.shapes[weight])
                and parts[1][dim] in parts[2]
            ):
                out_pos = len(parts[2]) - parts[2].index(parts[1][dim])
        return Layout(output=_trailing(out_pos, self.axis), rank_delta=delta)


@dataclasses.dataclass(frozen=True)
class RowParallel(_TensorParallel):
    """Shards a layer's input features over `axis` (Megatron's row split).

    The weight's input-feature dim is sharded; the layer expects its input
    sharded on the feature dim (as a `ColumnParallel` layer leaves it) and its
    output is summed over `axis`: one all-reduce in forward. Biases stay
    replicated so they are added once.

    Args:
      axis: Mesh axis (or tuple of axes; a list becomes a tuple) to shard over.
      param: Name of the weight (see `ColumnParallel`).
      dim: Weight dim to shard; default: the input-feature dim.
      input_spec: Layout of the input, aligned to trailing dims; default:
        the feature dim sharded over `axis`.
      output_spec: Layout of the output, aligned to trailing dims; default:
        replicated feature dim.

    Example:
      >>> layer = nnx.Linear(32, 16, rngs=nnx.Rngs(0))
      >>> _ = parallelize(layer, mesh8, RowParallel("model"))
      >>> layer.kernel[...].sharding.spec
      P('model', None)
    """

    axis: AxisNames = "model"
    _: dataclasses.KW_ONLY
    param: str | None = None
    dim: int | None = None
    input_spec: tuple | None = None
    output_spec: tuple | None = None
    shard_bias = False
    _column = False

    def _default_layout(self, ctx, weight, dim):
        ndim = len(ctx.shapes[weight])
        _, _, delta = layers.tp_dims(ctx.module, ndim, False)
        in_pos = layers.row_input_dim(ctx.module, ndim, dim)
        axes = _specs.axes_of(self.axis)
        post = tuple(n for n in ctx.shapes if n != weight)
        return Layout(
            input=_trailing(in_pos, self.axis),
            output=(None,),
            rank_delta=delta,
            reduce=axes,
            post=post,
        )


# Explicit specs -------------------------------------------------------------


@dataclasses.dataclass(frozen=True, init=False)
class Shard:
    """Gives each named parameter of a module an explicit spec.

    Args:
      **param_specs: Parameter name -> PartitionSpec (full rank).
      input_spec: Layout to put the first input in, aligned to trailing dims.
      output_spec: Layout of the output, aligned to trailing dims.

    Example:
      >>> layer = nnx.Linear(16, 32, rngs=nnx.Rngs(0))
      >>> _ = parallelize(layer, mesh2x4, Shard(kernel=P("data", "model")))
      >>> layer.kernel[...].sharding.spec
      P('data', 'model')
    """

    specs: tuple[tuple[str, P], ...]
    input_spec: tuple | None
    output_spec: tuple | None
    subtree = False

    def __init__(self, *, input_spec=None, output_spec=None, **param_specs: P):
        for name, spec in param_specs.items():
            if not isinstance(spec, P):
                raise PlanError(
                    f"Shard({name}={spec!r}): expected a PartitionSpec. Write Shard({name}=P(...))."
                )
        object.__setattr__(self, "specs", tuple(sorted(param_specs.items())))
        object.__setattr__(self, "input_spec", input_spec)
        object.__setattr__(self, "output_spec", output_spec)
        checks.validate(self)  # makes the layouts tuples

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.specs)
        return f"Shard({inner})"

    def param_specs(self, ctx: ModuleContext) -> dict[str, P]:
        ctx.check_axes(
            self, tuple(a for _, spec in self.specs for e in spec for a in _specs.axes_of(e))
        )
        out = {}
        for name, spec in self.specs:
            if name not in ctx.shapes:
                raise ctx.fail(
                    self,
                    name,
                    f"the module has no parameter {name!r} (it has {sorted(ctx.shapes)})",
                    f"Name one of {sorted(ctx.shapes)}.{did_you_mean(name, ctx.shapes)}",
                )
            out[name] = spec
        for name, shape in ctx.shapes.items():
            out.setdefault(name, ctx.current.get(name) or _specs.replicated(len(shape)))
        return out

    def hooks(self, ctx, specs):
        if self.input_spec is None and self.output_spec is None:
            return None
        return ModuleHooks(layout=Layout(input=self.input_spec, output=self.output_spec))


@dataclasses.dataclass(frozen=True)
class Replicated:
    """Keeps every parameter under the matched module whole on every device.

    An explicit "replicate here" entry, clearer than a missing key (torchtitan's
    `NoParallel`). Applies to the matched module's whole subtree.

    Example:
      >>> mlp = TinyMLP(rngs=nnx.Rngs(0))
      >>> _ = parallelize(mlp, mesh8, {"up": ColumnParallel(), "down": Replicated()})
      >>> mlp.down.kernel[...].sharding.spec
      P(None, None)
    """

    subtree = True

    def param_specs(self, ctx: ModuleContext) -> dict[str, P]:
        return {name: _specs.replicated(len(shape)) for name, shape in ctx.shapes.items()}

    def hooks(self, ctx, specs):
        return None
