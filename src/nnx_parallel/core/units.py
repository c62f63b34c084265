"""FSDP units, as FSDP2's `fully_shard`: modules whose whole subtree is gathered at once.

A unit gathers every parameter FSDP shards in its subtree in one call of its
own `__call__`, and reduce-scatters their gradients together: one
all-gather per dtype per direction and one reduce-scatter, instead of one per
`Linear`. `FSDP(units=...)` says where the units are:

- `"auto"` (default): the repeated blocks under the matched module are the
  units: the items of an `nnx.List`/`nnx.Dict` (or list/dict) of modules of
  one class, numbered attributes of one class (`h0`, `h1`, `layer_0`, ...),
  and the layer of a scanned stack. Modules outside them (embeddings, final
  norm, head) keep a gather each: a constant number for the whole model.
  A matched module other than the root with no such blocks is one unit.
- `"module"`: each matched module is one unit.
- `"leaf"`: no units; each module gathers the params it owns itself.

A unit is only formed where it is safe; otherwise its modules keep their own
gathers and `Resolution.notes` says why: a module inside has a
tensor-parallel or other activation layout (FSDP x TP runs fully manual per
layer, see `runtime/dispatch.py`), the subtree holds non-`Param` state
(caches, batch statistics, rngs: a `shard_map` cannot carry them), or two
FSDP styles with different settings meet in it.

Example:
  >>> from nnx_parallel.core.graph import walk
  >>> class Stack(nnx.Module):
  ...     def __init__(self):
  ...         self.blocks = nnx.List([TinyMLP(rngs=nnx.Rngs(i)) for i in range(3)])
  >>> repeated_blocks(walk(Stack())[0], "")
  ['blocks.0', 'blocks.1', 'blocks.2']
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from nnx_parallel._paths import within
from nnx_parallel.core.layouts import ModuleHooks

UNITS = ("auto", "module", "leaf")

_NUMBERED = re.compile(r"^(.*?)_?(\d+)$")


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _last(path: str) -> str:
    return path.rpartition(".")[2]


def _is_container(node: Any) -> bool:
    return isinstance(node, (nnx.List, nnx.Dict, list, tuple, dict))


def repeated_blocks(
    modules: Mapping[str, Any], root: str, stacks: Mapping[str, Any] | None = None
) -> list[str]:
    """The outermost repeated blocks in the subtree of `root` (see the module doc).

    `stacks` (param path -> stack names, from `core.stacks.layer_stacks`)
    marks scanned stacks: a module all of whose params are stacked is the
    layer of a stack.
    """
    groups: dict[tuple, list[str]] = {}
    for path, node in modules.items():
        if not path or not within(path, root) or not isinstance(node, nnx.Module):
            continue
        if _is_container(node):
            continue
        parent, last = _parent(path), _last(path)
        if last.isdigit() or _is_container(modules.get(parent)):
            key = (parent, "", type(node))
        elif (m := _NUMBERED.match(last)) is not None:
            key = (parent, m.group(1), type(node))
        else:
            continue
        groups.setdefault(key, []).append(path)
    found = [p for paths in groups.values() if len(paths) > 1 for p in paths]
    found += _scanned_layers(modules, root, stacks or {})
    return _outermost(found)


def _scanned_layers(modules, root: str, stacks: Mapping[str, Any]) -> list[str]:
    """Modules under `root` whose params (at least two leaves) are all stacked."""
    if not stacks:
        return []
    out = []
    for path, node in modules.items():
        if not path or not within(path, root) or not isinstance(node, nnx.Module):
            continue
        names = [_join(path, k) for k, _ in nnx.to_flat_state(nnx.state(node, nnx.Param))]
        if len(names) > 1 and all(n in stacks for n in names):
            out.append(path)
    return out


def _join(path: str, keys: tuple) -> str:
    rest = ".".join(str(k) for k in keys)
    return f"{path}.{rest}" if path else rest


def _outermost(paths: list[str]) -> list[str]:
    chosen = set(paths)
    keep = [p for p in paths if not any(within(p, q) and p != q for q in chosen if q)]
    return sorted(dict.fromkeys(keep), key=_sort_key)


def _sort_key(path: str) -> tuple:
    return tuple((0, int(k), "") if k.isdigit() else (1, 0, k) for k in path.split("."))


def unit_roots(units: str, matched: str, modules: Mapping[str, Any], stacks=None) -> list[str]:
    """The units one FSDP style with `units` makes of the module at `matched`."""
    if units == "leaf":
        return []
    if units == "module":
        return [matched]
    blocks = repeated_blocks(modules, matched, stacks)
    if blocks:
        return blocks
    return [matched] if matched else []


def why_not(unit: str, modules: Mapping[str, Any], hooks: Mapping[str, ModuleHooks]) -> str | None:
    """Why `unit` cannot gather its subtree at once (None: it can)."""
    node = modules[unit]
    if not callable(getattr(type(node), "__call__", None)) or _is_container(node):
        return "it is a container, not a module with a __call__"
    members = {p: h for p, h in hooks.items() if within(p, unit)}
    gathers = {
        dataclasses.replace(h.gather, params=(), specs=()) for h in members.values() if h.gather
    }
    if len(gathers) > 1:
        return "FSDP styles with different settings meet in it"
    layout = next((p for p, h in members.items() if h.layout is not None), None)
    if layout is not None:
        return f"{layout or '<root>'!r} has an activation layout (tensor parallel)"
    routed = next((p for p, h in members.items() if _own_route(h)), None)
    if routed is not None:
        return f"{routed or '<root>'!r} runs its own call route (experts or context parallel)"
    if jax.tree.leaves(nnx.state(node, nnx.Not(nnx.Param))):
        return "it holds state (caches, batch statistics, rngs) a shard_map cannot carry"
    return None


def _own_route(hooks: ModuleHooks) -> bool:
    return any(getattr(hooks, f, None) is not None for f in ("context", "experts"))


def group(
    hooks: dict[str, ModuleHooks], unit: str, modules: Mapping[str, Any]
) -> tuple[dict[str, ModuleHooks], str | None]:
    """`hooks` with the gathers of `unit`'s subtree moved onto `unit`.

    Returns the new hooks and None, or the old hooks and why not.
    """
    members = [p for p, h in hooks.items() if within(p, unit) and h.gather is not None]
    if not members or members == [unit]:
        return hooks, None
    why = why_not(unit, modules, hooks)
    if why is not None:
        return hooks, why
    params, specs = [], []
    for owner in members:
        prefix = owner[len(unit) :].lstrip(".") if unit else owner
        name = lambda n, prefix=prefix: f"{prefix}.{n}" if prefix else n  # noqa: E731
        params += [(name(n), d) for n, d in hooks[owner].gather.params]
        specs += [(name(n), s) for n, s in hooks[owner].gather.specs]
    gather = dataclasses.replace(hooks[members[0]].gather, params=tuple(params), specs=tuple(specs))
    out = dict(hooks)
    for owner in members:
        rest = dataclasses.replace(out[owner], gather=None, methods=("__call__",))
        if rest.layout is None and rest.remat is None and not rest.guard:
            del out[owner]
        else:
            out[owner] = rest
    mesh = hooks[members[0]].mesh
    base = out.get(unit, ModuleHooks(mesh=mesh))
    out[unit] = base.merge(ModuleHooks(gather=gather, mesh=mesh))
    return out, None
