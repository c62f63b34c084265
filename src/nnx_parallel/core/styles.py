"""Plan entries: frozen dataclasses that answer "which spec for this parameter?".

A style implements the small `Style` protocol: `param_specs(ctx)` returns the
PartitionSpec of each parameter a module owns, and `hooks(ctx, specs)` returns
the call-time layout the module needs (or None). `parallelize` never checks
for concrete style types, so a user extends the library by writing one class.

PyTorch names: `ColwiseParallel` -> `ColumnParallel`, `RowwiseParallel` ->
`RowParallel`, `fully_shard` -> `FSDP`, `NoParallel` -> `Replicated`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat, _specs
from nnx_parallel._specs import AxisNames
from nnx_parallel.core import checks, layers
from nnx_parallel.core.layouts import Gather, Layout, ModuleHooks, Recompute
from nnx_parallel.errors import PlanError, did_you_mean


@dataclasses.dataclass(frozen=True)
class ModuleContext:
    """What a style sees of one module while a plan is resolved.

    Attributes:
      path: Dotted module path ("" for the root).
      pattern: The plan pattern (or "@sharded") that selected this style.
      module: The module itself (possibly abstract, from `nnx.eval_shape`).
      shapes: Parameter name -> shape, for the parameters this module owns.
      current: Parameter name -> spec assigned so far (earlier styles in a
        tuple, or an earlier `parallelize` call); None where unassigned.
      mesh: The mesh.
      declared: Parameter name -> the spec its own `out_sharding` metadata
        names, as written (mesh axes or not); absent where it has none.
      stacked: Parameter name -> the names of its leading dims that stack
        layers (`nnx.PARTITION_NAME` of `nnx.vmap`/`nnx.scan`), found by
        `plan.layer_stacks`; absent where none.
    """

    path: str
    pattern: str
    module: Any
    shapes: Mapping[str, tuple[int, ...]]
    current: Mapping[str, P | None]
    mesh: Mesh
    declared: Mapping[str, tuple] = dataclasses.field(default_factory=dict)
    stacked: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def param_path(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def fail(self, style: Any, name: str | None, why: str, fix: str) -> PlanError:
        where = f"{self.param_path(name)!r}" if name else f"module {self.path or '<root>'!r}"
        return PlanError(f"{style!r} cannot shard {where} (pattern {self.pattern!r}): {why}. {fix}")

    def check_axes(self, style: Any, axes: AxisNames) -> None:
        """Raises `PlanError` naming the style if an axis of `axes` is not in the mesh."""
        names = tuple(self.mesh.axis_names)
        for a in _specs.axes_of(axes):
            if a not in names:
                raise self.fail(
                    style,
                    None,
                    f"mesh axis {a!r} is not in the mesh {names}",
                    f"Use one of {names}.{did_you_mean(a, names)}",
                )


@runtime_checkable
class Style(Protocol):
    """The protocol every plan entry implements.

    `subtree` says whether the style also applies to the parameters of
    descendant modules (FSDP, Replicated) or only to the matched module's own
    parameters (ColumnParallel, RowParallel, Shard). A style may also define
    `param_metadata(ctx, specs) -> {name: {key: value}}` to attach extra
    Variable metadata (ZeRO writes `optimizer_sharding` this way).

    Example: a style of your own is one small frozen dataclass.

      >>> import dataclasses
      >>> @dataclasses.dataclass(frozen=True)
      ... class ShardFirstDim:
      ...     axis: str = "model"
      ...     subtree = False
      ...     def param_specs(self, ctx):
      ...         return {n: P(self.axis, *[None] * (len(s) - 1)) for n, s in ctx.shapes.items()}
      ...     def hooks(self, ctx, specs):
      ...         return None
      >>> mlp = parallelize(TinyMLP(rngs=nnx.Rngs(0)), mesh8, {"up": ShardFirstDim()})
      >>> mlp.up.kernel[...].sharding.spec, mlp.up.bias[...].sharding.spec
      (P('model', None), P('model',))
    """

    subtree: bool

    def param_specs(self, ctx: ModuleContext) -> dict[str, P]: ...

    def hooks(self, ctx: ModuleContext, specs: Mapping[str, P]) -> ModuleHooks | None: ...


# Tensor parallel ----------------------------------------------------------


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


# FSDP -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FSDP:
    """Fully shards parameters over `axis` (ZeRO-3), gathered per module call.

    Each parameter of at least `min_size` elements is sharded over `axis` on
    its largest dim that the axis size divides and that no other style
    already shards. Over an axis of size 1 (one device) nothing is sharded
    and nothing gathered. A tensor-parallel style on the same axis as FSDP
    (or its batch axes) raises `PlanError`: use two axes (`plans.combine`).
    When its module is called, the parameter is all-gathered inside a
    `shard_map` over the batch axes, so the backward pass reduce-scatters
    its gradient: Ψ gathered + Ψ scattered per step, the
    optimum, on every backend.

    Args:
      axis: Mesh axis (or tuple of axes; a list becomes a tuple) to shard
        parameters over.
      min_size: Parameters with fewer elements stay replicated.
      batch_axes: Mesh axes the batch (dim 0 of every input) is sharded over;
        default: `axis` plus a `'data'` axis if the mesh has one.
      reshard_after_forward: True (ZeRO-3 memory): free the gathered copy
        after forward and gather again in backward (2 psi all-gathered per
        step, step memory independent of depth). False: keep it (psi
        all-gathered, memory grows with depth by one gathered layer each).
      methods: Methods that read the parameters and get the gather hook.
        Add yours (e.g. `("__call__", "encode", "decode")` for an embedder):
        a parameter read by another method is gathered by GSPMD instead, and
        under Explicit axes an embedding lookup there needs an out_sharding.
      scan_axes: Leading dims that stack layers (`nnx.vmap` + `nnx.scan`)
        and are never sharded. Stacks tagged through `transform_metadata=
        {nnx.PARTITION_NAME: ...}` are found without it (see
        `ModuleContext.stacked`). Params of such a stack that declare no
        `out_sharding` get none (see `param_metadata`).
      prefetch: 0: each module's gather waits for its own input (forward) or
        output cotangent (backward): strictly one module at a time, least
        memory. 1: it waits for the previous hooked call's input (backward:
        for the next one's cotangent), so XLA may run it while that module
        computes, holding one more gathered module.
      param_dtype: Mixed precision (FSDP2's `MixedPrecisionPolicy`): cast
        floating shards to this dtype *before* the all-gather and floating
        inputs before the call, so the module computes in it. Master params
        and optimizer state keep their dtype. None: no cast.
      reduce_dtype: Dtype gradients are reduce-scattered in (then cast back
        to the parameter's dtype). None: the gradient's own dtype.
      units: Which modules gather their subtree's params at once, as FSDP2's
        `fully_shard` units (see `core/units.py`). `"auto"`: each repeated
        block (items of an `nnx.List`, numbered layers, a scanned layer)
        under the matched module, else the matched module itself unless it
        is the root; `"module"`: each matched module; `"leaf"`: every module
        gathers its own params. One unit costs one all-gather per dtype per
        direction and one reduce-scatter per call.

    Raises:
      PlanError: `prefetch` is not 0 or 1, or a dtype is not floating.

    Example:
      >>> mlp = TinyMLP(rngs=nnx.Rngs(0))
      >>> _ = parallelize(mlp, fsdp8, FSDP("fsdp"))
      >>> mlp.up.kernel[...].sharding.spec
      P(None, 'fsdp')
    """

    axis: AxisNames = "fsdp"
    min_size: int = 2**10
    batch_axes: tuple[str, ...] | None = None
    reshard_after_forward: bool = True
    methods: tuple[str, ...] = ("__call__", "attend")
    scan_axes: int = 0
    prefetch: int = 0
    param_dtype: Any = None
    reduce_dtype: Any = None
    units: str = "auto"
    subtree = True

    def __post_init__(self) -> None:
        checks.validate(self)  # one rule per field name: see checks.RULES
        if self.prefetch not in (0, 1):
            raise PlanError(
                f"FSDP(prefetch={self.prefetch!r}): prefetch must be 0 (one module at a time) "
                "or 1 (the next module's gather may overlap this module's compute)."
            )
        for field in ("param_dtype", "reduce_dtype"):
            dtype = getattr(self, field)
            if dtype is not None and not _is_float_dtype(dtype):
                raise PlanError(
                    f"FSDP({field}={dtype!r}): not a floating dtype. Use e.g. jnp.bfloat16 "
                    "or jnp.float32, or None to keep each parameter's dtype."
                )

    def _stacked(self, ctx: ModuleContext, name: str) -> int:
        """How many leading dims of `name` stack layers."""
        return max(self.scan_axes, len(ctx.stacked.get(name, ())))

    def _axes(self) -> tuple[str, ...]:
        return _specs.axes_of(self.axis)

    def param_specs(self, ctx: ModuleContext) -> dict[str, P]:
        ctx.check_axes(self, self.axis)
        size = _specs.size(ctx.mesh, self.axis)
        out = {}
        for name, shape in ctx.shapes.items():
            current = ctx.current.get(name)
            out[name] = current if current is not None else _specs.replicated(len(shape))
            if math.prod(shape) < self.min_size or size == 1:
                continue  # size 1: nothing to shard over (a 1-device mesh), so no gather either
            used = _specs.pad(current, len(shape))
            if set(self._axes()) & _specs.spec_axes(used):
                continue  # already sharded over this axis (parallelize called twice)
            stacked = self._stacked(ctx, name)
            if stacked > len(shape):
                raise ctx.fail(
                    self,
                    name,
                    f"scan_axes={stacked} stacks more dims than its shape {shape} has",
                    "scan_axes counts the leading layer-stack dims (1 for one nnx.scan): pass a "
                    "smaller value, or 0 when the stack is tagged with nnx.PARTITION_NAME",
                )
            free = [
                d for d in range(stacked, len(shape)) if used[d] is None and shape[d] % size == 0
            ]
            if free:
                best = max(free, key=lambda d: (shape[d], -d))
                out[name] = _specs.with_dim(current, len(shape), best, self.axis)
        return out

    def param_metadata(self, ctx: ModuleContext, specs: Mapping[str, P]) -> dict[str, dict]:
        """No `out_sharding` on untagged params of a `scan_axes` stack.

        `nnx.scan(transform_metadata={nnx.PARTITION_NAME: name})` removes
        `name` from every `out_sharding` it finds and fails where it is
        missing; a param that had none cannot tell us the name. Such params
        keep none: the value's sharding and the FSDP hook carry the layout.
        """
        if not self.scan_axes:
            return {}
        return {
            n: {_compat.SHARDING_KEY: None}
            for n in ctx.shapes
            if n not in ctx.declared and n not in ctx.stacked and n in specs
        }

    def batch_axes_for(self, mesh: Mesh) -> tuple[str, ...]:
        if self.batch_axes is not None:
            return tuple(self.batch_axes)
        extra = tuple(a for a in ("data",) if a in mesh.axis_names and a not in self._axes())
        return extra + self._axes()

    def hooks(self, ctx: ModuleContext, specs: Mapping[str, P]) -> ModuleHooks | None:
        axes = set(self._axes())
        gathered = []
        for name, spec in specs.items():
            for d, entry in enumerate(spec):
                if axes & set(_specs.axes_of(entry)):
                    gathered.append((name, d - len(spec)))  # from the end: scan-proof
        if not gathered:
            return None
        methods = tuple(m for m in self.methods if callable(getattr(type(ctx.module), m, None)))
        return ModuleHooks(
            gather=Gather(
                axes=self._axes(),
                batch_axes=self.batch_axes_for(ctx.mesh),
                params=tuple(gathered),
                specs=tuple((n, tuple(s)) for n, s in specs.items()),
                reshard_after_forward=self.reshard_after_forward,
                prefetch=self.prefetch,
                param_dtype=self.param_dtype,
                reduce_dtype=self.reduce_dtype,
            ),
            methods=methods,
        )


def _is_float_dtype(dtype: Any) -> bool:
    import jax.numpy as jnp

    try:
        return bool(jnp.issubdtype(jnp.dtype(dtype), jnp.floating))
    except TypeError:
        return False


def _instance_hint(cls: type) -> str:
    """How to write an instance of style class `cls`, checked by building it."""
    name = cls.__name__
    fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    if "specs" in fields:  # Shard: specs are keyword arguments
        return f"{name}(kernel=P(None, 'model')) (a PartitionSpec per parameter name)"
    try:
        cls()
    except Exception:  # a user's style with required arguments
        return f"an instance, {name}(...) with its arguments"
    axis = fields["axis"].default if "axis" in fields else None
    if not isinstance(axis, str):
        return f"{name}()"
    arg = repr(axis) if next(iter(fields)) == "axis" else f"axis={axis!r}"
    return f"{name}() or {name}({arg})"


def as_styles(entry: Any) -> tuple[Style, ...]:
    """A plan value (a style or a tuple of styles) as a tuple of styles."""
    items = tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)
    for item in items:
        if isinstance(item, type):
            raise PlanError(
                f"plan value {item.__name__} is a class, not a style: write {_instance_hint(item)}."
            )
        if not isinstance(item, Style):
            raise PlanError(
                f"plan value {item!r} is not a style. Use ColumnParallel(), RowParallel(), "
                "Replicated(), Shard(...), FSDP(), a tuple of them, or your own class with "
                "`subtree`, `param_specs(ctx)` and `hooks(ctx, specs)`."
            )
    return items


# Activation recompute ---------------------------------------------------------


def resolve_policy(policy: Any) -> Recompute:
    """A `Recompute` for `Remat(policy)`; raises PlanError for an unknown name.

    Example:
      >>> from nnx_parallel.core.styles import resolve_policy
      >>> resolve_policy(None).name, resolve_policy("dots_saveable").name
      ('full', 'dots_saveable')
    """
    if policy is None:
        return Recompute()
    policies = _compat.checkpoint_policies()
    if callable(policy):
        names = [n for n, p in policies.items() if p is policy]
        return Recompute(policy, names[0] if names else getattr(policy, "__name__", repr(policy)))
    if not isinstance(policy, str):
        raise PlanError(
            f"Remat(policy={policy!r}): expected None, a policy name or a jax.checkpoint_policies "
            "policy. Write Remat() for full recompute or Remat('dots_saveable')."
        )
    if policy in policies:
        return Recompute(policies[policy], policy)
    if policy in _compat.CHECKPOINT_POLICY_FACTORIES:
        raise PlanError(
            f"Remat(policy={policy!r}): {policy!r} builds a policy from names, it is not one. "
            f"Pass the policy it builds: Remat(jax.checkpoint_policies.{policy}('my_name'))."
        )
    raise PlanError(
        f"Remat(policy={policy!r}): no checkpoint policy is called {policy!r}."
        f"{did_you_mean(policy, policies)} Known names: {sorted(policies)}."
    )


@dataclasses.dataclass(frozen=True)
class Remat:
    """Recomputes the matched module's call in the backward pass.

    Activations inside the call are not kept for the backward pass; the
    call runs again there, after the gradient of its output exists, so this
    saves memory on every backend (plain `jax.checkpoint` saves nothing on
    XLA's CPU backend; see `nnx_parallel.runtime.remat`). Parameters keep whatever
    layout other styles give them: combine it with them in a tuple
    (`{"blocks.*": (FSDP("fsdp"), Remat())}`) or give it its own pattern
    (`{"": FSDP("fsdp"), "blocks.*": Remat()}`).

    Args:
      policy: None recomputes everything (only the call's inputs are
        saved). A `jax.checkpoint_policies` policy, or the name of one
        (`"dots_saveable"`, `"dots_with_no_batch_dims_saveable"`, ...),
        saves what it allows and recomputes the rest.

    Raises:
      PlanError: `policy` names no checkpoint policy.

    Example:
      >>> mlp = TinyMLP(rngs=nnx.Rngs(0))
      >>> _ = parallelize(mlp, mesh8, {"": Replicated(), "up": Remat("dots_saveable")})
      >>> npx.core.layouts.get_hooks(mlp.up).remat.name
      'dots_saveable'
    """

    policy: Any = None
    subtree = False

    def __post_init__(self):
        resolve_policy(self.policy)  # fail at construction, not at call time

    def param_specs(self, ctx: ModuleContext) -> dict[str, P]:
        return {n: s for n, s in ctx.current.items() if s is not None}

    def hooks(self, ctx: ModuleContext, specs: Mapping[str, P]) -> ModuleHooks | None:
        if isinstance(ctx.module, (nnx.List, nnx.Dict)) or not callable(ctx.module):
            inside = f"{ctx.path}.*" if ctx.path else "*"
            raise PlanError(
                f"{self!r} matched {ctx.path or '<root>'!r} (pattern {ctx.pattern!r}), a "
                f"{type(ctx.module).__name__}, which is never called, so there is no call to "
                f"recompute. Match the modules it holds instead: {inside!r}."
            )
        return ModuleHooks(remat=resolve_policy(self.policy))
