"""Plans that contradict themselves, refused while resolving (issue 24, cases a and j).

Two checks that `resolve` runs on each module's styles, before anything
changes:

- `check_tuple_override`: a later style of a tuple changing a dim an earlier
  one sharded (`(ColumnParallel("model"), ColumnParallel("data"))` would
  silently drop the `model` sharding);
- `check_axis_clash`: FSDP and a tensor-parallel style on one mesh axis.
  FSDP shards the batch over its axes at call time (and gathers parameters
  inside a `shard_map` over them); tensor parallelism shards features over
  its axis and needs the batch whole on it. One axis cannot do both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from nnx_parallel import _specs
from nnx_parallel.errors import PlanError


def short(style: Any) -> str:
    """`ColumnParallel('model')`: a style's class and axis, for messages.

    Example:
      >>> short(FSDP("fsdp", min_size=1)), short(Replicated())
      ("FSDP('fsdp')", 'Replicated()')
    """
    axis = getattr(style, "axis", None)
    return f"{type(style).__name__}({'' if axis is None else repr(axis)})"


def changed_dim(old: P | None, new: P | None) -> int | None:
    """The first dim `new` changes that `old` sharded (or moves an axis of `old` to), or None.

    Example:
      >>> changed_dim(P(None, "model"), P("fsdp", "model")), changed_dim(P(None, "a"), P(None, "b"))
      (None, 1)
    """
    if old is None or new is None:
        return None
    ndim = max(len(tuple(old)), len(tuple(new)))
    for d, (a, b) in enumerate(zip(_specs.pad(old, ndim), _specs.pad(new, ndim))):
        moved = a is None and set(_specs.axes_of(b)) & _specs.spec_axes(old)
        if a is not None and a != b or moved:
            return d
    return None


def check_tuple_override(
    paths: Mapping[str, str],
    before: Mapping[str, P | None],
    after: Mapping[str, P | None],
    earlier: Mapping[str, Any],
    style: Any,
    pattern: str | None,
) -> None:
    """Raises if `style` changes a dim that an earlier style of the same plan sharded.

    Args:
      paths: Parameter name -> dotted path.
      before: Specs before `style` ran; `after`: after.
      earlier: Parameter name -> the style (of this plan) that set its spec in `before`.
      style: The style that just ran; `pattern` selected it.
    """
    for name, first in earlier.items():
        d = changed_dim(before.get(name), after.get(name))
        if d is None:
            continue
        raise PlanError(
            f"{paths[name]!r} (pattern {pattern!r}): {short(style)} wants {after[name]}, but "
            f"{short(first)}, earlier in the same plan, already gave it {before[name]}; the later "
            f"style would silently change dim {d}. A parameter gets one layout per dim: keep "
            "one of the two styles, or shard two dims with one Shard(...) entry (e.g. "
            "Shard(kernel=P('data', 'model')))."
        )


def _tp_axes(style: Any) -> tuple[str, ...]:
    """Mesh axes a tensor-parallel style shards features over (() for others)."""
    if getattr(style, "subtree", True) or not hasattr(style, "axis"):
        return ()
    return _specs.axes_of(style.axis)


def _fsdp_axes(style: Any, mesh: Mesh) -> tuple[str, ...]:
    """Mesh axes an FSDP-like style shards parameters and the batch over (() for others)."""
    batch_axes_for = getattr(style, "batch_axes_for", None)
    if batch_axes_for is None or not hasattr(style, "axis"):
        return ()
    return tuple(dict.fromkeys((*_specs.axes_of(style.axis), *batch_axes_for(mesh))))


def check_axis_clash(
    path: str, weight: str | None, styles: Sequence[tuple[str | None, Any]], mesh: Mesh
) -> None:
    """Raises if a tensor-parallel style and FSDP of one module share a mesh axis.

    Args:
      path: The module's dotted path; `weight`: the dotted path of its first parameter.
      styles: (pattern, style) pairs that apply to the module, in order.
      mesh: The mesh.
    """
    for tp_pattern, tp in styles:
        for fsdp_pattern, fsdp in styles:
            if fsdp is tp:  # one style using its axis for both (ExpertParallel) means it
                continue
            both = [a for a in _tp_axes(tp) if a in _fsdp_axes(fsdp, mesh)]
            if not both:
                continue
            sizes = {a: mesh.shape[a] for a in mesh.axis_names}
            where = repr(weight) if weight else f"module {path or '<root>'!r}"
            raise PlanError(
                f"{where}: {short(tp)} (pattern {tp_pattern!r}) and {short(fsdp)} (pattern "
                f"{fsdp_pattern!r}) both use mesh axis {both[0]!r}. FSDP splits the batch over "
                f"that axis and gathers parameters over it at each call, while tensor "
                f"parallelism splits features over it and needs the batch whole there: one "
                f"axis cannot do both. Use two axes (this mesh has {sizes}): e.g. "
                "mesh = npx.make_mesh(fsdp=2, model=4) and "
                "plans.combine({...: ColumnParallel('model'), ...}, FSDP('fsdp')), or drop one "
                "of the two styles."
            )
