"""Resolution-time checks: the model and mesh are what `resolve` takes, each spec
fits its parameter and the mesh, no style moves a dim an earlier plan sharded, a
Param shared by two modules gets one spec, and a positional `@sharded(spec)` fits
the parameters it aligns to."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from nnx_parallel import _specs
from nnx_parallel.core.graph import match
from nnx_parallel.errors import MeshAxisError, MeshError, PlanError, did_you_mean


def _check_shared(entries, every: Mapping[str, str]) -> None:
    """Raises if two patterns give one shared module different styles through
    two of its paths (which one should win is not the plan's to guess)."""
    seen: dict[str, tuple[str, str]] = {}  # module -> (path, pattern) that first selected it
    for pattern, styles in entries.items():
        for path, module in every.items():
            if not match(pattern, path):
                continue
            first = seen.setdefault(module, (path, pattern))
            if first[0] != path and entries[first[1]] != styles:
                raise PlanError(
                    f"{first[0]!r} and {path!r} are one shared module, and pattern {first[1]!r} "
                    f"(via {first[0]!r}) and pattern {pattern!r} (via {path!r}) give it different "
                    "styles. A module has one layout: keep one of the two entries (the model's "
                    f"first path to it is {module!r})."
                )


def _align(
    declared: Mapping[str, P], shapes: Mapping[str, tuple], owner: str = "", module: Any = None
) -> dict[str, P]:
    """Expands a positional `@sharded(spec)` ("*") onto each param's trailing dims.

    A spec longer than every parameter's rank would lose leading entries
    everywhere: that raises `PlanError` instead of truncating.
    """
    if "*" not in declared:
        return dict(declared)
    spec = tuple(declared["*"])
    rank = max((len(s) for s in shapes.values()), default=len(spec))
    if len(spec) > rank:
        name = max(shapes, key=lambda n: len(shapes[n]))
        path = f"{owner}.{name}" if owner else name
        raise PlanError(
            f"@sharded({P(*spec)}) on {type(module).__name__} {owner or '<root>'!r} has "
            f"{len(spec)} entries, but its largest parameter {path!r} has shape {shapes[name]} "
            f"({rank} dims). A positional spec aligns to trailing dims: give at most {rank} "
            f"entries, or name the parameter: @sharded({name}=P(...))."
        )
    out = {}
    for name, shape in shapes.items():
        tail = spec[-len(shape) :] if shape else ()
        out[name] = P(*((None,) * (len(shape) - len(tail)) + tail))
    out.update({k: v for k, v in declared.items() if k != "*"})
    return out


def _check_conflicts(own, previous, current, sources) -> None:
    for name, old in previous.items():
        new = current.get(name)
        if new is None or old is None:
            continue
        ndim = max(len(tuple(old)), len(tuple(new)))
        for d, (a, b) in enumerate(zip(_specs.pad(old, ndim), _specs.pad(new, ndim))):
            moved = a is None and set(_specs.axes_of(b)) & _specs.spec_axes(old)
            if a is not None and a != b or moved:
                raise PlanError(
                    f"{own[name][0]!r} is already parallelized as {old} and the new plan "
                    f"(pattern {sources.get(name)!r}) wants {new}, which changes dim {d}. "
                    "Use nnx_parallel.reshard(model, mesh, plan) to move to a different plan, "
                    "or only add axes to dims that are still unsharded."
                )


def check_spec(path: str, source: str | None, spec: P, shape: tuple, mesh: Mesh) -> None:
    """Raises unless `spec` has one entry per dim of `shape`, names only mesh
    axes (each once) and divides every dim it shards."""
    where = f"{path!r}" + (f" (pattern {source!r})" if source is not None else "")
    entries = tuple(spec)
    if len(entries) != len(shape):
        raise PlanError(
            f"spec {spec} for {where} has {len(entries)} entries but the parameter has shape "
            f"{shape} ({len(shape)} dims). Give one entry per dim, None for unsharded dims."
        )
    seen: set[str] = set()
    for d, entry in enumerate(entries):
        for a in _specs.axes_of(entry):
            if a not in mesh.axis_names:
                raise MeshAxisError(
                    f"spec {spec} for {where} names mesh axis {a!r}, which the mesh "
                    f"{dict(mesh.shape)} does not have.{did_you_mean(a, mesh.axis_names)} "
                    "Rename the axis in the plan or build the mesh with it."
                )
            if a in seen:
                raise PlanError(
                    f"spec {spec} for {where} uses mesh axis {a!r} twice. A mesh axis can shard "
                    "at most one dim of a parameter."
                )
            seen.add(a)
        size = _specs.size(mesh, entry)
        if shape[d] % size:
            raise PlanError(
                f"{where}: dim {d} of shape {shape} is not divisible by mesh axis {entry!r} "
                f"(size {size}). Make that dim a multiple of {size}, or map this path to "
                "Replicated()."
            )


def _validate_inputs(model: Any, mesh: Any) -> None:
    if not isinstance(model, nnx.Module):
        raise PlanError(
            f"expected an nnx.Module, got {type(model).__name__}. nnx_parallel works on Flax NNX "
            "modules; for Linen or plain pytrees use jax.device_put with NamedShardings."
        )
    if not isinstance(mesh, Mesh):
        raise MeshError(
            f"expected a jax.sharding.Mesh, got {type(mesh).__name__}. "
            "Build one with jax.make_mesh((8,), ('model',)) or nnx_parallel.make_mesh(model=8)."
        )


def hook_axes(hooks: Any) -> tuple[str, ...]:
    """Every mesh axis a style's call-time hooks name (layouts, gathers, experts, context)."""
    if hooks is None:
        return ()
    entries: list = list(hooks.layout.axes) if hooks.layout is not None else []
    if hooks.gather is not None:
        entries += [*hooks.gather.axes, *hooks.gather.batch_axes]
    if hooks.experts is not None:
        entries += [hooks.experts.axis, *hooks.experts.batch_axes]
    if hooks.context is not None:
        entries.append(hooks.context.axis)
    axes = (a for e in entries for a in _specs.axes_of(e) if isinstance(a, str))
    return tuple(dict.fromkeys(axes))
