"""Pure plan resolution: module paths and parameter shapes in, specs out.

`resolve(model, mesh, plan)` reads only paths, shapes and metadata, so it runs
on abstract models (`nnx.eval_shape`) without allocating, and its result can
be printed, diffed and tested without devices. Only `parallelize` mutates.

The steps, each a function below:

1. earlier specs: what an earlier `parallelize` left on each parameter;
2. styles per module: the most specific plan pattern's styles, else the
   module's `@sharded` declaration, plus the subtree styles (FSDP,
   Replicated) of the nearest ancestor;
3. run the styles in order: each sees the specs so far and returns new ones
   and its call-time hooks;
4. check: no style moved a dim an earlier plan sharded, and every spec fits
   its parameter and the mesh.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any

from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat, _specs
from nnx_parallel._paths import ancestors, within
from nnx_parallel.core import conflicts, layers, units
from nnx_parallel.core.graph import aliases, choose, match, normalize_plan, suggest, walk
from nnx_parallel.core.layouts import ModuleHooks, get_hooks
from nnx_parallel.core.stacks import layer_stacks, stack_metadata
from nnx_parallel.core.styles import ModuleContext, Shard, Style
from nnx_parallel.core.verify import (
    _align,
    _check_conflicts,
    _check_shared,
    _validate_inputs,
    check_spec,
    hook_axes,
)
from nnx_parallel.errors import PlanError

DECORATOR_SOURCE = "@sharded"
SPECS_ATTR = "_nnx_parallel_specs"


@dataclasses.dataclass(frozen=True)
class ParamEntry:
    """The resolved layout of one parameter.

    Example:
      >>> plan = {"up": ColumnParallel()}
      >>> entry = resolve(TinyMLP(rngs=nnx.Rngs(0)), mesh8, plan).params["up.kernel"]
      >>> entry.spec, entry.source, entry.shard_shape(mesh8), entry.bytes_per_device(mesh8)
      (P(None, 'model'), 'up', (16, 8), 512)
    """

    path: str
    module_path: str
    name: str
    shape: tuple[int, ...]
    dtype: Any
    spec: P
    source: str | None  # plan pattern ("" is the root), "@sharded", or None: no rule touched it
    metadata: tuple = ()  # extra (key, value) metadata: what styles asked for, layer-stack names

    def shard_shape(self, mesh: Mesh) -> tuple[int, ...]:
        return _specs.shard_shape(self.shape, self.spec, mesh)

    def bytes_per_device(self, mesh: Mesh) -> int:
        return _specs.nbytes(self.shard_shape(mesh), self.dtype)


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


@dataclasses.dataclass(frozen=True)
class _Scope:
    """What every module's resolution reads: the model, the plan, the mesh."""

    mesh: Mesh
    entries: dict[str, tuple[Style, ...]]
    chosen: dict[str, str]
    modules: dict[str, Any]
    stacks: dict[str, tuple[str, ...]]
    notes: list[str]
    tied: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class _Module:
    """One module's resolution: specs, sources and extra metadata per parameter."""

    specs: dict[str, P | None]
    sources: dict[str, str | None]
    hooks: ModuleHooks | None
    metadata: dict[str, dict]


def _matches(entries, modules, strict: bool, alias: Mapping[str, str]) -> dict[str, tuple]:
    """Pattern -> the modules it matches; a second path of a shared module
    (`alias`: path -> `walk`'s path) matches as that module."""
    every = {**{m: m for m in modules}, **alias}
    matches = {p: tuple(dict.fromkeys(every[m] for m in every if match(p, m))) for p in entries}
    if alias:
        _check_shared(entries, every)
    for pattern, hits in matches.items():
        if strict and not hits:
            raise PlanError(
                f"pattern {pattern!r} matched no module.{suggest(pattern, modules)} Pass "
                "strict=False to ignore unmatched patterns."
            )
    return matches


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
        module (a parameter tied to another module is named as such), a
        spec does not fit its parameter, or two paths of one shared module
        get different styles.
      MeshError: `mesh` is not a Mesh.

    Example:
      >>> abstract = nnx.eval_shape(lambda: TinyMLP(rngs=nnx.Rngs(0)))
      >>> res = resolve(abstract, mesh8, {"up": ColumnParallel(), "down": RowParallel()})
      >>> res.specs()["up.kernel"], res.specs()["down.kernel"]
      (P(None, 'model'), P('model', None))
    """
    _validate_inputs(model, mesh)
    entries = normalize_plan(plan)
    modules, params = walk(model)
    alias, tied = aliases(model, modules, params)
    matches = _matches(entries, modules, strict, alias)
    chosen = choose(entries, matches)
    scope = _Scope(mesh, entries, chosen, modules, layer_stacks(params, mesh, modules), [], tied)
    by_owner: dict[str, dict[str, tuple[str, nnx.Variable]]] = {}
    for path, (owner, name, var) in params.items():
        by_owner.setdefault(owner, {})[name] = (path, var)
    styled = [m for m in chosen if not all(s.subtree for s in entries[chosen[m]])]
    resolved: dict[str, ParamEntry] = {}
    hooks: dict[str, ModuleHooks] = {}
    for owner in dict.fromkeys(list(by_owner) + styled):
        own = by_owner.get(owner, {})
        result = _resolve_module(scope, owner, own)
        resolved.update(_entries(scope, owner, own, result))
        if result.hooks is not None:
            hooks[owner] = dataclasses.replace(result.hooks, mesh=mesh)
    _tied_gathers(scope, resolved, hooks)
    hooks = _units(scope, matches, params, hooks)
    if _compat.is_explicit(mesh) and "" in modules:  # see runtime/regions.py
        hooks[""] = dataclasses.replace(hooks.get("", ModuleHooks(mesh=mesh)), guard=True)
    ordered = {p: resolved[p] for p in params}
    return Resolution(mesh, ordered, hooks, matches, tuple(scope.notes))


def _units(scope: _Scope, matches, params, hooks: dict[str, ModuleHooks]):
    """`hooks` with each FSDP unit's gathers moved onto the unit (`core/units.py`)."""
    refused: dict[str, list[str]] = {}
    for pattern, hits in matches.items():
        for style in scope.entries[pattern]:
            kind = getattr(style, "units", None)
            if kind is None:
                continue
            for matched in hits:
                if scope.chosen.get(matched) != pattern:
                    continue  # a more specific pattern chose this module
                stacks = scope.stacks
                if getattr(style, "scan_axes", 0):  # an untagged stack: every param stacked
                    stacks = {p: ("",) for p in params if within(p, matched)}
                for unit in units.unit_roots(kind, matched, scope.modules, stacks):
                    tied = sorted(o for _, o in scope.tied.values() if within(o, unit))
                    if tied:
                        refused.setdefault(f"{tied[0]!r} reads a tied parameter", []).append(
                            unit or "<root>"
                        )
                        continue
                    hooks, why = units.group(hooks, unit, scope.modules)
                    if why is not None:
                        refused.setdefault(why, []).append(unit or "<root>")
    for why, where in refused.items():
        scope.notes.append(
            f"FSDP units {', '.join(where)}: each module gathers its own params ({why})."
        )
    return hooks


def _entries(scope: _Scope, owner: str, own, result: _Module) -> dict[str, ParamEntry]:
    """Checked `ParamEntry`s for the params `owner` directly holds."""
    out = {}
    for name, (path, var) in own.items():
        shape = tuple(var.get_value().shape)
        spec = result.specs.get(name, _specs.replicated(len(shape)))
        check_spec(path, result.sources.get(name), spec, shape, scope.mesh)
        meta = result.metadata.get(name, {})
        if path in scope.stacks and not _compat.get_declared_spec(var, raw=True):
            meta = {**stack_metadata(scope.stacks[path], spec), **meta}
        out[path] = ParamEntry(
            path,
            owner,
            name,
            shape,
            var.get_value().dtype,
            spec,
            result.sources.get(name),
            tuple(sorted(meta.items())),
        )
    return out


# Steps -------------------------------------------------------------------------------


def _earlier_specs(scope: _Scope, own) -> tuple[dict[str, P], dict[str, str | None]]:
    """Specs (and their sources) an earlier `parallelize` left on the params.

    A model's own `out_sharding` naming axes the mesh lacks is ignored, with
    a note.
    """
    current: dict[str, P] = {}
    sources: dict[str, str | None] = {}
    for name, (path, var) in own.items():
        meta = _compat.get_metadata(var)
        declared = _compat.get_declared_spec(var)
        if _compat.SOURCE_KEY in meta and declared is not None:
            current[name] = P(*declared)
            sources[name] = meta[_compat.SOURCE_KEY]
        elif declared is not None:
            known = set(scope.mesh.axis_names) | set(scope.stacks.get(path, ()))
            unknown = sorted(_specs.spec_axes(declared) - known)
            if unknown:
                scope.notes.append(
                    f"{path}: ignored its own out_sharding {declared} (axes {unknown} are not "
                    "in the mesh)"
                )
    return current, sources


def _styles_for(scope: _Scope, owner: str, module, shapes) -> list[tuple[str, Style]]:
    """(pattern, style) pairs that apply to `owner`'s own params, in order."""
    styles: list[tuple[str, Style]] = []
    declared = getattr(module, SPECS_ATTR, None)
    if owner in scope.chosen:
        styles = [(scope.chosen[owner], s) for s in scope.entries[scope.chosen[owner]]]
    elif declared:
        styles = [(DECORATOR_SOURCE, Shard(**_align(dict(declared), shapes, owner, module)))]
    if not any(s.subtree for _, s in styles):
        # Subtree styles (FSDP, Replicated) of the nearest ancestor fill in
        # around tensor-parallel styles and declarations.
        for anc in ancestors(owner):
            pattern = scope.chosen.get(anc)
            inherited = [(pattern, s) for s in scope.entries.get(pattern, ()) if s.subtree]
            if inherited:
                return styles + inherited
    return styles


def _resolve_module(scope: _Scope, owner: str, own) -> _Module:
    """Specs, sources, hooks and metadata for the params `owner` directly holds."""
    module = scope.modules[owner]
    shapes = {n: tuple(v.get_value().shape) for n, (_, v) in own.items()}
    stacked = {n: scope.stacks[path] for n, (path, _) in own.items() if path in scope.stacks}
    current, sources = _earlier_specs(scope, own)
    previous = dict(current)
    hooks = get_hooks(module)
    metadata: dict[str, dict] = {}
    styles = _styles_for(scope, owner, module, shapes)
    paths = {n: path for n, (path, _) in own.items()}
    weight = max(paths, key=lambda n: len(shapes[n]), default=None)  # the kernel, not a bias
    conflicts.check_axis_clash(owner, paths.get(weight), styles, scope.mesh)
    declared = {n: d for n, (_, v) in own.items() if (d := _compat.get_declared_spec(v, raw=True))}
    setters: dict[str, Style] = {}  # param name -> the style of this plan that set its spec
    for pattern, style in styles:
        ctx = ModuleContext(
            owner, pattern, module, shapes, dict(current), scope.mesh, declared, stacked
        )
        with _explain_tied(scope, owner):
            new = style.param_specs(ctx)
        conflicts.check_tuple_override(paths, current, new, setters, style, pattern)
        for name, spec in new.items():
            if spec != current.get(name):
                sources[name] = pattern
                setters[name] = style
            current[name] = spec
        style_hooks = style.hooks(ctx, new)
        ctx.check_axes(style, hook_axes(style_hooks))  # layouts and batch axes, as specs
        hooks = (hooks or ModuleHooks()).merge(style_hooks)
        param_metadata = getattr(style, "param_metadata", None)  # optional protocol method
        if param_metadata is not None:
            for name, meta in param_metadata(ctx, dict(current)).items():
                metadata.setdefault(name, {}).update(meta)
    if styles:
        _check_conflicts(own, previous, current, sources)
    return _Module(current, sources, _layer_hooks(module, scope.mesh, hooks), metadata)


def _tied_gathers(scope: _Scope, resolved: dict[str, ParamEntry], hooks: dict) -> None:
    """Gives a module that reads a Param owned by another module (`b.kernel = a.kernel`)
    the FSDP gather of that Param too, so each of the two calls sees it whole."""
    extra: dict[str, dict[str, str]] = {}  # alias owner -> {name on it: first path}
    for alias, (first, owner) in scope.tied.items():
        if first in resolved:
            extra.setdefault(owner, {})[alias[len(owner) + 1 :] if owner else alias] = first
    for owner, names in extra.items():
        module = scope.modules[owner]
        own = {e.name: e for e in resolved.values() if e.module_path == owner}
        own.update({n: resolved[first] for n, first in names.items()})
        specs = {n: e.spec for n, e in own.items()}
        shapes = {n: e.shape for n, e in own.items()}
        for pattern, style in _styles_for(scope, owner, module, shapes):
            if not style.subtree:
                continue
            ctx = ModuleContext(owner, pattern, module, shapes, specs, scope.mesh)
            new = style.hooks(ctx, specs)
            if new is not None and new.gather is not None:
                base = hooks.get(owner) or ModuleHooks()
                merged = base.merge(ModuleHooks(gather=new.gather, methods=new.methods))
                hooks[owner] = dataclasses.replace(merged, mesh=scope.mesh)


def _layer_hooks(module, mesh: Mesh, hooks: ModuleHooks | None) -> ModuleHooks | None:
    """Hooks the layer table asks for where no style gave any (see
    `layers.explicit_layout`: BatchNorm and Embed on Explicit axes)."""
    if hooks is not None and (hooks.layout is not None or hooks.gather is not None):
        return hooks
    layout = layers.explicit_layout(module, _compat.is_explicit(mesh))
    if layout is None:
        return hooks
    return (hooks or ModuleHooks()).merge(ModuleHooks(layout=layout))


# Checks ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _explain_tied(scope: _Scope, owner: str):
    """Re-raises a style's `PlanError` on `owner` saying which of its
    parameters are tied to another module (they are not `owner`'s own)."""
    try:
        yield
    except PlanError as err:
        tied = [(a, first) for a, (first, o) in scope.tied.items() if o == owner]
        if not tied:
            raise
        names = "; ".join(f"{a!r} is the same nnx.Param as {first!r}" for a, first in tied)
        home = tied[0][1].rpartition(".")[0]
        raise PlanError(
            f"{err} Note: {names} (a shared, tied parameter). A shared parameter has one "
            f"layout and belongs to its first path: plan it there ({home!r}), leave "
            f"{owner!r} out of the plan, or untie the weights."
        ) from err
