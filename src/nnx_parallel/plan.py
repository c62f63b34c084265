"""Pure plan resolution: module paths and parameter shapes in, specs out.

`resolve(model, mesh, plan)` reads only paths, shapes and metadata, so it runs
on abstract models (`nnx.eval_shape`) without allocating, and its result can
be printed, diffed and tested without devices. Only `parallelize` mutates.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Mapping
from typing import Any

from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat
from nnx_parallel.errors import MeshError, PlanError, did_you_mean
from nnx_parallel.hooks import Layout, ModuleHooks, get_hooks
from nnx_parallel.styles import ModuleContext, Shard, Style, as_styles

DECORATOR_SOURCE = "@sharded"
SPECS_ATTR = "_nnx_parallel_specs"


@dataclasses.dataclass(frozen=True)
class ParamEntry:
    """The resolved layout of one parameter.

    Example:
      >>> entry = resolve(TinyMLP(rngs=nnx.Rngs(0)), mesh8, {"up": ColumnParallel()}).params["up.kernel"]
      >>> entry.spec, entry.source, entry.shard_shape(mesh8), entry.bytes_per_device(mesh8)
      (P(None, 'model'), 'up', (16, 8), 512)
    """

    path: str
    module_path: str
    name: str
    shape: tuple[int, ...]
    dtype: Any
    spec: P
    source: str | None  # plan pattern ("" is the root), "@sharded", or None when no rule touched it
    metadata: tuple = ()  # extra (key, value) metadata: what styles asked for, layer-stack names

    def shard_shape(self, mesh: Mesh) -> tuple[int, ...]:
        return tuple(n // _entry_size(mesh, e) for n, e in zip(self.shape, _padded(self.spec, len(self.shape))))

    def bytes_per_device(self, mesh: Mesh) -> int:
        return math.prod(self.shard_shape(mesh)) * _itemsize(self.dtype)


@dataclasses.dataclass(frozen=True)
class Resolution:
    """What a plan does to a model: per-parameter specs and per-module hooks.

    `resolve` returns one without touching the model; `parallelize` applies it.

    Example:
      >>> res = resolve(TinyMLP(rngs=nnx.Rngs(0)), mesh8, {"up": ColumnParallel()})
      >>> res.specs()["up.kernel"], res.matches["up"], res.untouched
      (P(None, 'model'), ('up',), ('down.bias', 'down.kernel'))
      >>> sorted(res.hooks)
      ['up']
    """

    mesh: Mesh
    params: dict[str, ParamEntry]
    hooks: dict[str, ModuleHooks]
    matches: dict[str, tuple[str, ...]]
    notes: tuple[str, ...] = ()

    def specs(self) -> dict[str, P]:
        """Parameter path -> PartitionSpec."""
        return {path: e.spec for path, e in self.params.items()}

    @property
    def unmatched(self) -> tuple[str, ...]:
        return tuple(p for p, hits in self.matches.items() if not hits)

    @property
    def untouched(self) -> tuple[str, ...]:
        return tuple(p for p, e in self.params.items() if e.source is None)


def _itemsize(dtype) -> int:
    import numpy as np

    return np.dtype(dtype).itemsize


def _entry_size(mesh: Mesh, entry) -> int:
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(mesh.shape[n] for n in names)


def _padded(spec: P, ndim: int) -> tuple:
    return tuple(spec) + (None,) * (ndim - len(tuple(spec)))


def join(path: tuple) -> str:
    return ".".join(str(k) for k in path)


# Walking the graph ------------------------------------------------------------------


def _is_module(node) -> bool:
    return isinstance(node, nnx.Module) or isinstance(node, (nnx.List, nnx.Dict))


def walk(model) -> tuple[dict[str, Any], dict[str, tuple[str, str, nnx.Variable]]]:
    """Module path -> module and param path -> (owner path, name, Variable)."""
    modules: dict[str, Any] = {}
    variables: list[tuple[tuple, nnx.Variable]] = []
    for path, node in nnx.iter_graph(model):
        if any(isinstance(k, str) and k.startswith("_pytree__") for k in path):
            continue
        if _is_module(node):
            modules[join(path)] = node
        elif isinstance(node, nnx.Param):
            variables.append((path, node))
    params = {}
    for path, var in variables:
        owner = _owner(path, modules)
        name = join(path[len(owner):]) if owner else join(path)
        params[join(path)] = (join(owner), name, var)
    return modules, params


def _owner(path: tuple, modules: Mapping[str, Any]) -> tuple:
    for cut in range(len(path) - 1, -1, -1):
        prefix = path[:cut]
        node = modules.get(join(prefix))
        if node is not None and isinstance(node, nnx.Module) and not isinstance(node, (nnx.List, nnx.Dict)):
            return prefix
    return ()


# Patterns -------------------------------------------------------------------------------


def match(pattern: str, path: str) -> bool:
    """Segment-wise match; `*` (or any fnmatch glob) stays within one segment."""
    p_parts = pattern.split(".") if pattern else []
    m_parts = path.split(".") if path else []
    return len(p_parts) == len(m_parts) and all(fnmatch.fnmatchcase(m, p) for p, m in zip(p_parts, m_parts))


def _specificity(pattern: str) -> int:
    return -sum("*" in seg or "?" in seg or "[" in seg for seg in pattern.split("."))


def _normalize_plan(plan: Any) -> dict[str, tuple[Style, ...]]:
    if plan is None:
        return {}
    if isinstance(plan, Mapping):
        out = {}
        for pattern, entry in plan.items():
            if not isinstance(pattern, str):
                raise PlanError(f"plan key {pattern!r} is not a string. Keys are dotted module paths like 'layers.*.mlp.up'.")
            out[pattern] = as_styles(entry)
        return out
    return {"": as_styles(plan)}


# Resolution ----------------------------------------------------------------------------------


def _declared(module) -> dict[str, P] | None:
    specs = getattr(module, SPECS_ATTR, None)
    return dict(specs) if specs else None


def _validate_mesh(mesh: Any) -> None:
    if not isinstance(mesh, Mesh):
        raise MeshError(
            f"expected a jax.sharding.Mesh, got {type(mesh).__name__}. "
            "Build one with jax.make_mesh((8,), ('model',)) or nnx_parallel.make_mesh(model=8)."
        )


def resolve(model: Any, mesh: Mesh, plan: Any, *, strict: bool = True) -> Resolution:
    """Resolves `plan` on `model` without touching it.

    Args:
      model: An `nnx.Module`, concrete or abstract (from `nnx.eval_shape`).
      mesh: The mesh the styles refer to.
      plan: A style, a tuple of styles, or a dict pattern -> style(s).
      strict: If True, a pattern that matches no module raises `PlanError`.

    Returns:
      A `Resolution`: every `nnx.Param`'s spec and source, the hooks each
      module gets, which modules each pattern matched, and notes.

    Raises:
      PlanError: a pattern matches nothing (strict), a style cannot handle a
        module, or a spec does not fit its parameter.
      MeshError: `mesh` is not a Mesh.

    Example:
      >>> abstract = nnx.eval_shape(lambda: TinyMLP(rngs=nnx.Rngs(0)))
      >>> res = resolve(abstract, mesh8, {"up": ColumnParallel(), "down": RowParallel()})
      >>> res.specs()["up.kernel"], res.specs()["down.kernel"]
      (P(None, 'model'), P('model', None))
    """
    if not isinstance(model, nnx.Module):
        raise PlanError(
            f"expected an nnx.Module, got {type(model).__name__}. nnx_parallel works on Flax NNX "
            "modules; for Linen or plain pytrees use jax.device_put with NamedShardings."
        )
    _validate_mesh(mesh)
    entries = _normalize_plan(plan)
    modules, params = walk(model)
    matches = {p: tuple(m for m in modules if match(p, m)) for p in entries}
    if strict:
        for pattern, hits in matches.items():
            if not hits:
                hint = _suggest(pattern, modules)
                raise PlanError(
                    f"pattern {pattern!r} matched no module.{hint} Pass strict=False to ignore "
                    "unmatched patterns."
                )
    chosen = _choose(entries, matches)
    by_owner: dict[str, dict[str, tuple[str, nnx.Variable]]] = {}
    for path, (owner, name, var) in params.items():
        by_owner.setdefault(owner, {})[name] = (path, var)
    notes: list[str] = []
    resolved: dict[str, ParamEntry] = {}
    hooks: dict[str, ModuleHooks] = {}
    stacks = layer_stacks(params, mesh)
    # Modules a non-subtree style matches (Remat, TP) are visited even if they own no params.
    visit = [m for m in chosen if not all(s.subtree for s in entries[chosen[m]])]
    owners = list(dict.fromkeys(list(by_owner) + visit))
    for owner in owners:
        own = by_owner.get(owner, {})
        module = modules[owner]
        shapes = {n: tuple(v.get_value().shape) for n, (_, v) in own.items()}
        stacked = {n: stacks[path] for n, (path, _) in own.items() if path in stacks}
        specs, sources, module_hooks, extra = _resolve_module(
            owner, module, shapes, own, chosen, entries, modules, mesh, notes, stacked
        )
        for name, (path, var) in own.items():
            spec = specs.get(name, P(*([None] * len(shapes[name]))))
            _check_spec(path, sources.get(name), spec, shapes[name], mesh)
            meta = extra.get(name, {})
            if name in stacked and not _compat.get_declared_spec(var, raw=True):
                meta = {**_stack_metadata(stacked[name], spec), **meta}
            resolved[path] = ParamEntry(
                path, owner, name, shapes[name], var.get_value().dtype, spec, sources.get(name),
                tuple(sorted(meta.items())),
            )
        if module_hooks is not None:
            hooks[owner] = dataclasses.replace(module_hooks, mesh=mesh)
    ordered = {p: resolved[p] for p in params}
    return Resolution(mesh=mesh, params=ordered, hooks=hooks, matches=matches, notes=tuple(notes))


# Layer stacks ----------------------------------------------------------------------------


def layer_stacks(params, mesh: Mesh) -> dict[str, tuple[str, ...]]:
    """Param path -> the names of its leading dims that stack layers.

    `nnx.vmap`/`nnx.scan(transform_metadata={nnx.PARTITION_NAME: name})`
    insert `name` into the `out_sharding` of every Variable that has one, and
    `nnx.scan` removes it again at each step (failing where it is missing).
    A name counts as a layer-stack name if it is no mesh axis, and every param
    that declares it has it at the same leading position with the same size,
    at least two params do. A logical name a model uses on several dims
    ('embed' in ('embed', 'mlp') and ('mlp', 'embed')) is none.

    Params without `out_sharding` that were stacked too are found through the
    nearest module above them holding tagged params: if every param under it
    has the same leading sizes, they share its stack names.
    """
    declared = {
        path: _compat.get_declared_spec(var, raw=True) or ()
        for path, (_, _, var) in params.items()
    }
    shapes = {path: tuple(var.get_value().shape) for path, (_, _, var) in params.items()}
    seen: dict[str, set] = {}
    for path, spec in declared.items():
        for d, e in enumerate(spec):
            if isinstance(e, str) and e not in mesh.axis_names and d < len(shapes[path]):
                seen.setdefault(e, set()).add((d, shapes[path][d], path))
    names = {e for e, uses in seen.items() if len(uses) >= 2 and len({u[:2] for u in uses}) == 1}
    out = {}
    for path, spec in declared.items():
        lead = 0
        while lead < len(spec) and isinstance(spec[lead], str) and spec[lead] in names:
            lead += 1
        if lead:
            out[path] = tuple(spec[:lead])
    if not out:  # no stacks: nothing to propagate (and no quadratic walk below)
        return out
    for path in [p for p in params if p not in out and not declared[p]]:
        for anc in _ancestors(path):
            inside = [p for p in params if not anc or p.startswith(anc + ".")]
            tags = {out[p] for p in inside if p in out}
            if not tags:
                continue
            if len(tags) == 1:
                (tag,) = tags
                lead = {shapes[p][:len(tag)] for p in inside}
                if len(lead) == 1 and all(len(shapes[p]) >= len(tag) for p in inside):
                    out[path] = tag
            break
    return out


def _stack_metadata(tag: tuple[str, ...], spec: P) -> dict[str, Any]:
    """`out_sharding` with the stack names on the leading dims `spec` leaves unsharded."""
    entries = list(_padded(spec, len(tag)))
    for d, name in enumerate(tag):
        if entries[d] is None:
            entries[d] = name
    rules = tuple((name, None) for name in tag)
    return {_compat.SHARDING_KEY: tuple(entries), "sharding_rules": rules}


def _suggest(pattern: str, modules) -> str:
    paths = [m for m in modules if m]
    generalized = sorted({".".join("*" if s.isdigit() else s for s in m.split(".")) for m in paths})
    return did_you_mean(pattern, generalized + paths)


def _choose(entries, matches) -> dict[str, str]:
    """Module path -> the most specific pattern matching it (first on ties)."""
    chosen: dict[str, str] = {}
    for pattern in entries:
        for module_path in matches[pattern]:
            best = chosen.get(module_path)
            if best is None or _specificity(pattern) > _specificity(best):
                chosen[module_path] = pattern
    return chosen


def _ancestors(path: str) -> list[str]:
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)]


def _resolve_module(owner, module, shapes, own, chosen, entries, modules, mesh, notes, stacked):
    """Specs, sources and hooks for the params `owner` directly holds."""
    current: dict[str, P | None] = {}
    sources: dict[str, str | None] = {}
    for name, (path, var) in own.items():
        meta = _compat.get_metadata(var)
        declared = _compat.get_declared_spec(var)
        if _compat.SOURCE_KEY in meta and declared is not None:  # set by an earlier parallelize
            current[name] = P(*declared)
            sources[name] = meta[_compat.SOURCE_KEY]
        elif declared is not None:
            layer_names = set(stacked.get(name, ()))
            unknown = sorted({
                a for e in declared for a in ((e,) if isinstance(e, str) else (e or ()))
                if a not in mesh.axis_names and a not in layer_names
            })
            if unknown:
                notes.append(f"{path}: ignored its own out_sharding {declared} (axes {unknown} are not in the mesh)")
    previous_specs = dict(current)
    decl = _declared(module)
    styles: list[tuple[str, Style]] = []
    if owner in chosen:
        styles = [(chosen[owner], s) for s in entries[chosen[owner]]]
    elif decl is not None:
        styles = [(DECORATOR_SOURCE, Shard(**_align(decl, shapes)))]
    if not any(s.subtree for _, s in styles):
        # Subtree styles (FSDP, Replicated) of the nearest ancestor fill in
        # around tensor-parallel styles and declarations.
        for anc in _ancestors(owner):
            inherited = [(chosen[anc], s) for s in entries.get(chosen.get(anc), ()) if s.subtree]
            if inherited:
                styles += inherited
                break
    hooks = get_hooks(module)
    extra: dict[str, dict] = {}
    if not styles:
        return current, sources, _features_whole_for_batch_stats(module, mesh, hooks), extra
    for pattern, style in styles:
        declared = {n: d for n, (_, v) in own.items() if (d := _compat.get_declared_spec(v, raw=True))}
        ctx = ModuleContext(owner, pattern, module, shapes, dict(current), mesh, declared, stacked)
        new = style.param_specs(ctx)
        for name, spec in new.items():
            if spec != current.get(name):
                sources[name] = pattern
            current[name] = spec
        hooks = (hooks or ModuleHooks()).merge(style.hooks(ctx, new))
        metadata = getattr(style, "param_metadata", None)  # optional protocol method
        if metadata is not None:
            for name, meta in metadata(ctx, dict(current)).items():
                extra.setdefault(name, {}).update(meta)
    _check_conflicts(owner, own, previous_specs, current, sources)
    return current, sources, _features_whole_for_batch_stats(module, mesh, hooks), extra


def _features_whole_for_batch_stats(module, mesh: Mesh, hooks: ModuleHooks | None) -> ModuleHooks | None:
    """Explicit axes: an unhooked `nnx.BatchNorm` gets its input's features whole.

    Its running statistics are replicated `BatchStat`s. From a feature-sharded
    input (after a ColumnParallel conv) they come out sharded, and Explicit
    axes refuse to write those into the replicated variable. Resharding the
    features first (an all-gather where they were sharded, nothing where they
    were not) keeps the model running unmodified. Auto axes need nothing.
    """
    if hooks is not None and (hooks.layout is not None or hooks.gather is not None):
        return hooks
    if not isinstance(module, nnx.BatchNorm) or not _compat.is_explicit(mesh):
        return hooks
    if getattr(module, "axis", -1) != -1:  # features not last: leave it as written
        return hooks
    return (hooks or ModuleHooks()).merge(ModuleHooks(layout=Layout(input=(None,))))


def _align(declared: Mapping[str, P], shapes: Mapping[str, tuple]) -> dict[str, P]:
    """Expands a positional `@sharded(spec)` ("*") onto each param's trailing dims."""
    if "*" not in declared:
        return dict(declared)
    spec = tuple(declared["*"])
    out = {}
    for name, shape in shapes.items():
        tail = spec[-len(shape):] if shape else ()
        out[name] = P(*((None,) * (len(shape) - len(tail)) + tail))
    out.update({k: v for k, v in declared.items() if k != "*"})
    return out


def _check_conflicts(owner, own, previous, current, sources) -> None:
    for name, old in previous.items():
        new = current.get(name)
        if new is None or old is None:
            continue
        ndim = max(len(tuple(old)), len(tuple(new)))
        for d, (a, b) in enumerate(zip(_padded(old, ndim), _padded(new, ndim))):
            moved = a is None and b is not None and set(_names(b)) & {n for e in old for n in _names(e)}
            if a is not None and a != b or moved:
                raise PlanError(
                    f"{own[name][0]!r} is already parallelized as {old} and the new plan "
                    f"(pattern {sources.get(name)!r}) wants {new}, which changes dim {d}. "
                    "Use nnx_parallel.reshard(model, mesh, plan) to move to a different plan, "
                    "or only add axes to dims that are still unsharded."
                )


def _names(entry) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _check_spec(path: str, source: str | None, spec: P, shape: tuple, mesh: Mesh) -> None:
    where = f"{path!r}" + (f" (pattern {source!r})" if source is not None else "")
    entries = tuple(spec)
    if len(entries) != len(shape):
        raise PlanError(
            f"spec {spec} for {where} has {len(entries)} entries but the parameter has shape "
            f"{shape} ({len(shape)} dims). Give one entry per dim, None for unsharded dims."
        )
    seen: set[str] = set()
    for d, entry in enumerate(entries):
        if entry is None:
            continue
        names = (entry,) if isinstance(entry, str) else tuple(entry)
        for a in names:
            if a not in mesh.axis_names:
                raise MeshError(
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
        size = _entry_size(mesh, entry)
        if shape[d] % size:
            raise PlanError(
                f"{where}: dim {d} of shape {shape} is not divisible by mesh axis {entry!r} "
                f"(size {size}). Make that dim a multiple of {size}, or map this path to Replicated()."
            )
