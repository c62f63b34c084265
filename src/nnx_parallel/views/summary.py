"""Inspection: what got sharded, what it costs, and why.

Three text views and one HTML view, all read-only:

* `summary` - one row per parameter: spec, shard shape, bytes per device and
  the plan pattern that set it, with per-device totals. Works on a
  `Resolution`, so it runs before anything is allocated.
* `explain` - which pattern matched which module, which matched nothing, and
  which parameters no rule touched.
* `communication_report` (in `nnx_parallel.views.report`) - the collectives and
  memory of one compiled step.
* `render` / `treescope_renderer` (in `nnx_parallel.views.render`) - treescope rendering (notebook or standalone
  HTML) with each parameter's layout on its line and the device layout of its
  array a click away.

Nothing here mutates a model; rendering goes through treescope's public
renderer API (`TreescopeRenderer.extended_with`, `active_renderer`).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat, _specs
from nnx_parallel.core.graph import normalize_plan, suggest, walk
from nnx_parallel.core.resolve import ParamEntry, Resolution, resolve
from nnx_parallel.runtime import dispatch
from nnx_parallel.views import _text

_SORTS = ("size", "path", "none")


# Parameter entries from a model or a resolution --------------------------------------


def _sharding_of(value: Any) -> NamedSharding | None:
    sharding = getattr(value, "sharding", None)
    return sharding if isinstance(sharding, NamedSharding) else None


def _entry_from_variable(path: str, owner: str, name: str, var: nnx.Variable, mesh: Mesh | None):
    """A ParamEntry (and its mesh) read back from a Variable's metadata and value."""
    value = var.get_value()
    shape = tuple(value.shape)
    meta = _compat.get_metadata(var)
    sharding = _sharding_of(value)
    meta_mesh = meta.get("mesh") if isinstance(meta.get("mesh"), Mesh) else None
    value_mesh = sharding.mesh if sharding is not None and isinstance(sharding.mesh, Mesh) else None
    mesh = mesh or meta_mesh or value_mesh
    declared = _compat.get_declared_spec(var)
    if (
        declared is not None
        and mesh is not None
        and not _specs.spec_axes(declared) <= set(mesh.axis_names)
    ):
        declared = None  # names no axis of this mesh (e.g. a layer-stack name)
    if declared is not None:
        spec = tuple(declared)
    elif sharding is not None:
        spec = tuple(sharding.spec)
    else:
        spec = ()
    spec = P(*(spec + (None,) * (len(shape) - len(spec))))
    source = meta.get(_compat.SOURCE_KEY)
    return ParamEntry(path, owner, name, shape, value.dtype, spec, source), mesh


def param_entries(obj: Any, mesh: Mesh | None = None) -> tuple[dict[str, ParamEntry], Mesh | None]:
    """Every `nnx.Param`'s resolved layout, from a `Resolution` or a module.

    A module's layouts are read from what `parallelize` wrote (`out_sharding`,
    `mesh` and source metadata), else from its arrays' shardings; parameters
    with neither count as replicated. Abstract modules (`nnx.eval_shape`) work.

    Args:
      obj: A `Resolution` or an `nnx.Module`.
      mesh: Overrides the mesh found in the resolution or metadata.

    Returns:
      `({param path: ParamEntry}, mesh)`; the mesh is None if none was found.

    Example:
      >>> mlp = parallelize(TinyMLP(rngs=nnx.Rngs(0)), mesh8, {"up": ColumnParallel()})
      >>> entries, mesh = param_entries(mlp)
      >>> entries["up.kernel"].spec, entries["up.kernel"].source, mesh.shape["model"]
      (P(None, 'model'), 'up', 8)
    """
    if isinstance(obj, Resolution):
        return dict(obj.params), mesh or obj.mesh
    if not isinstance(obj, nnx.Module):
        raise TypeError(f"expected an nnx.Module or a Resolution, got {type(obj).__name__}.")
    entries: dict[str, ParamEntry] = {}
    found = mesh
    for path, (owner, name, var) in walk(obj)[1].items():
        entries[path], var_mesh = _entry_from_variable(path, owner, name, var, mesh)
        found = found or var_mesh
    return entries, found


def _total_bytes(entry: ParamEntry) -> int:
    return _specs.nbytes(entry.shape, entry.dtype)


class _OneDevice:
    """Stands in for a mesh when every spec entry is None."""

    shape: dict = {}


_ONE = _OneDevice()


def _is_replicated(entry: ParamEntry) -> bool:
    return all(e is None for e in tuple(entry.spec))


def _source_text(entry: ParamEntry) -> str:
    """Who set the layout: `'' (root)`, a pattern, `@sharded`, `own metadata` or `none`."""
    if entry.source is None:
        return "none" if _is_replicated(entry) else "own metadata"
    return "'' (root)" if entry.source == "" else entry.source


# summary ------------------------------------------------------------------------------


def summary(model_or_resolution: Any, mesh: Mesh | None = None, *, sort: str = "size") -> str:
    """A table of every parameter's layout and per-device cost.

    Columns: path, shape, dtype, spec, shard shape, bytes per device and
    source (the plan pattern, `@sharded`, or `none` when no rule touched it).
    Replicated parameters are flagged. The footer gives the bytes each device
    holds, split into sharded and replicated parameters, and the unsharded size.

    Args:
      model_or_resolution: A `Resolution` (from `resolve`, works on abstract
        models before allocation) or a module (parallelized or not).
      mesh: Overrides the mesh of the resolution / metadata.
      sort: `"size"` (largest bytes per device first), `"path"` or `"none"`
        (model order).

    Returns:
      The table as text.

    Raises:
      ValueError: an unknown `sort`.

    Example:
      >>> abstract = nnx.eval_shape(lambda: TinyMLP(rngs=nnx.Rngs(0)))
      >>> res = resolve(abstract, mesh8, {"up": ColumnParallel(), "down": RowParallel()})
      >>> print(summary(res))
      mesh {'model': 8} (8 devices), 4 params
      path         shape     dtype    spec              shard shape  bytes/device  source  note
      -----------  --------  -------  ----------------  -----------  ------------  ------  ----------
      down.kernel  (64, 16)  float32  P('model', None)  (8, 16)               512  down
      up.kernel    (16, 64)  float32  P(None, 'model')  (16, 8)               512  up
      down.bias    (16,)     float32  P(None)           (16,)                  64  down    replicated
      up.bias      (64,)     float32  P('model')        (8,)                   32  up
      per device: 1,120 B (1.1 KiB) = sharded 1,056 B (3 params) + replicated 64 B (1 param)
      unsharded: 8,512 B (8.3 KiB); each device holds 13.2%
    """
    if sort not in _SORTS:
        raise ValueError(f"sort={sort!r} is not one of {_SORTS}.")
    entries, mesh = param_entries(model_or_resolution, mesh)
    items = list(entries.values())
    on = mesh if mesh is not None else _ONE
    if sort == "size":
        items.sort(key=lambda e: (-e.bytes_per_device(on), -_total_bytes(e), e.path))
    elif sort == "path":
        items.sort(key=lambda e: e.path)
    n_devices = mesh.devices.size if mesh is not None else 1
    rows = []
    for e in items:
        flag = "replicated" if _is_replicated(e) and n_devices > 1 else ""
        rows.append(
            [
                e.path,
                str(e.shape),
                str(jax.numpy.dtype(e.dtype)),
                _text.format_spec(e.spec),
                str(e.shard_shape(on)),
                f"{e.bytes_per_device(on):,}",
                _source_text(e),
                flag,
            ]
        )
    header = ["path", "shape", "dtype", "spec", "shard shape", "bytes/device", "source", "note"]
    lines = [f"{_text.mesh_text(mesh)}, {len(items)} params"] + _text.table(header, rows, right={5})
    sharded = [e for e in items if not _is_replicated(e)]
    replicated = [e for e in items if _is_replicated(e)]
    s_bytes = sum(e.bytes_per_device(on) for e in sharded)
    r_bytes = sum(e.bytes_per_device(on) for e in replicated)
    full = sum(_total_bytes(e) for e in items)
    total = s_bytes + r_bytes
    lines.append(
        f"per device: {total:,} B ({_text.human(total)}) = sharded {s_bytes:,} B "
        f"({_text.plural(len(sharded), 'param')})"
        f" + replicated {r_bytes:,} B ({_text.plural(len(replicated), 'param')})"
    )
    share = f"{100 * total / full:.1f}%" if full else "n/a"
    lines.append(f"unsharded: {full:,} B ({_text.human(full)}); each device holds {share}")
    return "\n".join(lines)


# explain ------------------------------------------------------------------------------


def _style_text(style: Any) -> str:
    axis = getattr(style, "axis", None)
    return f"{type(style).__name__}({axis!r})" if axis is not None else f"{type(style).__name__}()"


def explain(model: Any, mesh: Mesh, plan: Any) -> str:
    """Why each parameter got its layout: the plan, pattern by pattern.

    Resolves `plan` with `strict=False` (nothing is modified) and lists, for
    each pattern, its styles, the modules it matched and the parameters it set;
    then the patterns that matched nothing (with a suggestion), the parameters
    no rule touched, the modules that get call-time hooks, and resolver notes.

    Args:
      model: An `nnx.Module`, concrete or abstract (`nnx.eval_shape`).
      mesh: The mesh the plan's styles refer to.
      plan: A style, a tuple of styles, or a dict pattern -> style(s).

    Returns:
      The explanation as text.

    Raises:
      PlanError, MeshError: as `resolve` does, except for unmatched patterns.

    Example:
      >>> mlp = TinyMLP(rngs=nnx.Rngs(0))
      >>> print(explain(mlp, mesh8, {"up": ColumnParallel(), "mlp.gate": RowParallel()}))
      plan on mesh {'model': 8} (8 devices): 2 patterns, 1 matched nothing; 4 params, 2 set by the plan
      'up' -> ColumnParallel('model')
        matched 1 module: up
          up.bias    P('model')
          up.kernel  P(None, 'model')
      'mlp.gate' -> RowParallel('model')
        matched nothing
      patterns that matched nothing:
        'mlp.gate'
      params no rule touched: 2
        down.bias    (16,)     P(None)
        down.kernel  (64, 16)  P(None, None)
      call-time hooks (1 module):
        up  layout  route as-written/as-is/constrained (else as-written/as-is/caller, as-written/as-is/as-is)
    """
    entries = normalize_plan(plan)
    res = resolve(model, mesh, plan, strict=False)
    touched = [e for e in res.params.values() if e.source is not None]
    lines = [
        f"plan on {_text.mesh_text(mesh)}: {_text.plural(len(entries), 'pattern')}, "
        f"{len(res.unmatched)} matched nothing; "
        f"{_text.plural(len(res.params), 'param')}, {len(touched)} set by the plan"
    ]
    for pattern, styles in entries.items():
        lines += _pattern_lines(res, pattern, styles)
    modules = walk(model)[0]
    if res.unmatched:
        lines.append("patterns that matched nothing:")
        lines += [f"  {p!r}{suggest(p, modules)}" for p in res.unmatched]
    if res.untouched:
        lines.append(f"params no rule touched: {len(res.untouched)}")
        rows = [
            [p, str(res.params[p].shape), _text.format_spec(res.params[p].spec)]
            for p in res.untouched
        ]
        table = _text.table(["path", "shape", "spec"], rows, right=set())
        lines += ["  " + line for line in table[2:]]
    if res.hooks:
        lines += _hook_lines(res, modules, _compat.is_explicit(mesh))
    if res.notes:
        lines.append("notes:")
        lines += [f"  {n}" for n in res.notes]
    return "\n".join(lines)


def _pattern_lines(res: Resolution, pattern: str, styles) -> list[str]:
    """One plan pattern: its styles, the modules it matched, the params it set."""
    lines = [f"{pattern!r} -> " + " + ".join(_style_text(s) for s in styles)]
    hits = res.matches[pattern]
    if not hits:
        return lines + ["  matched nothing"]
    more = f", ... ({len(hits) - 6} more)" if len(hits) > 6 else ""
    shown = ", ".join(m or "<root>" for m in hits[:6]) + more
    lines.append(f"  matched {len(hits)} module{'s' if len(hits) != 1 else ''}: {shown}")
    mine = [e for e in res.params.values() if e.source == pattern]
    if not mine:
        lines.append(
            "    set no parameter (a more specific pattern won, or the style kept every spec)"
        )
    width = max((len(e.path) for e in mine), default=0)
    return lines + [f"    {e.path.ljust(width)}  {_text.format_spec(e.spec)}" for e in mine]


def _hook_lines(res: Resolution, modules, explicit: bool) -> list[str]:
    """Each hooked module: what its hooks do and the call route it takes."""
    lines = [f"call-time hooks ({_text.plural(len(res.hooks), 'module')}):"]
    width = max(len(p or "<root>") for p in res.hooks)
    for path, h in res.hooks.items():
        kinds = ", ".join(
            k
            for k in ("layout", "gather", "remat", "guard", "context")
            if getattr(h, k, None) not in (None, False)
        )
        if h.gather is not None and any("." in name for name, _ in h.gather.params):
            kinds = kinds.replace("gather", f"unit gather ({len(h.gather.params)} params)")
        route = dispatch.describe(modules[path], h)
        lines.append(f"  {(path or '<root>').ljust(width)}  {kinds or 'none'}  route {route}")
    return lines
