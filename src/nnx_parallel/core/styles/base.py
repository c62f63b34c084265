"""The style protocol, the context a style sees, and plan values as tuples of styles."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from nnx_parallel import _specs
from nnx_parallel._specs import AxisNames
from nnx_parallel.core.layouts import ModuleHooks
from nnx_parallel.errors import MeshAxisError, PlanError, did_you_mean


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

    def fail(
        self, style: Any, name: str | None, why: str, fix: str, error: type = PlanError
    ) -> PlanError:
        where = f"{self.param_path(name)!r}" if name else f"module {self.path or '<root>'!r}"
        return error(f"{style!r} cannot shard {where} (pattern {self.pattern!r}): {why}. {fix}")

    def check_axes(self, style: Any, axes: AxisNames) -> None:
        """Raises `MeshAxisError` (a `PlanError`) naming the style if an axis of
        `axes` is not in the mesh."""
        names = tuple(self.mesh.axis_names)
        for a in _specs.axes_of(axes):
            if a not in names:
                raise self.fail(
                    style,
                    None,
                    f"mesh axis {a!r} is not in the mesh {names}",
                    f"Use one of {names}.{did_you_mean(a, names)}",
                    MeshAxisError,
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


def largest_free_dim(shape, used, size: int, start: int = 0) -> int | None:
    """The dim to shard over an axis of `size`: the largest dim from `start` on
    that nothing shards yet (`used[d] is None`) and that `size` divides; ties go
    to the earlier dim. None where no dim qualifies. FSDP and ZeRO both use it.

    Example:
      >>> largest_free_dim((512, 2048), (None, None), 8), largest_free_dim((6, 4), (None, 'x'), 4)
      (1, None)
    """
    free = [d for d in range(start, len(shape)) if used[d] is None and shape[d] % size == 0]
    return max(free, key=lambda d: (shape[d], -d)) if free else None
