"""Reading a model graph and a plan: module paths, parameter owners, patterns.

Pure queries over `nnx.iter_graph`: nothing here mutates or traces.

Example:
  >>> modules, params = walk(TinyMLP(rngs=nnx.Rngs(0)))
  >>> sorted(modules), params["up.kernel"][:2]
  (['', 'down', 'up'], ('up', 'kernel'))
  >>> match("blocks.*.mlp", "blocks.3.mlp"), match("blocks.*", "blocks.3.mlp")
  (True, False)
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

from flax import nnx

from nnx_parallel import _compat
from nnx_parallel._paths import generalize, join
from nnx_parallel.core.styles import Style, as_styles
from nnx_parallel.errors import PlanError, did_you_mean

# Walking the graph ------------------------------------------------------------------


def _is_module(node) -> bool:
    return isinstance(node, (nnx.Module, nnx.List, nnx.Dict))


def _is_container(node) -> bool:
    return isinstance(node, (nnx.List, nnx.Dict))


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
            _check_array(join(path), node)
            variables.append((path, node))
    params = {}
    for path, var in variables:
        owner = _owner(path, modules)
        name = join(path[len(owner) :]) if owner else join(path)
        params[join(path)] = (join(owner), name, var)
    return modules, params


def _check_array(path: str, var: nnx.Variable) -> None:
    """Raises `PlanError` for a Param whose value is not an array (a Python float)."""
    value = var.get_value()
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return
    raise PlanError(
        f"{path!r} is an nnx.Param holding a {type(value).__name__} ({value!r:.40}), not an "
        "array: it has no shape to shard, and jit and checkpoints need arrays. Make it one "
        f"where the model is built: nnx.Param(jnp.asarray({value!r:.40})), or hold a constant "
        "as a plain attribute instead of a Param."
    )


def _owner(path: tuple, modules: Mapping[str, Any]) -> tuple:
    """The path of the nearest module (not a List/Dict container) above `path`."""
    for cut in range(len(path) - 1, -1, -1):
        prefix = path[:cut]
        node = modules.get(join(prefix))
        if isinstance(node, nnx.Module) and not _is_container(node):
            return prefix
    return ()


def all_paths(model) -> list[tuple[tuple, Any, Any]]:
    """(path, node, owner) for every module and Param, at every path that reaches it.

    `nnx.iter_graph` (so `walk`) visits a shared node once, at its first
    path; this also yields the others. The owner is the nearest module
    (not a List/Dict container) above the node, or `model`. Cycles are cut.
    """
    out = []
    stack: list[tuple[tuple, Any, Any, frozenset]] = [((), model, model, frozenset())]
    while stack:
        path, node, owner, above = stack.pop()
        if isinstance(node, nnx.Param):
            out.append((path, node, owner))
            continue
        children = _compat.graph_children(node)
        if children is None or id(node) in above:
            continue
        if _is_module(node):
            out.append((path, node, owner))
        inner = node if _is_module(node) and not _is_container(node) else owner
        for key, child in reversed(children.items()):
            if not (isinstance(key, str) and key.startswith("_pytree__")):
                stack.append(((*path, key), child, inner, above | {id(node)}))
    return out


def aliases(model, modules, params) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """Second paths of shared nodes, given `walk(model)`'s `modules` and `params`.

    Returns:
      module alias path -> the module's path in `walk`; and, for a Param
      tied between two different modules, alias param path -> (its path in
      `walk`, the alias owner's path in `walk`).

    Example:
      >>> mlp = TinyMLP(rngs=nnx.Rngs(0))
      >>> mlp.upper = mlp.up  # the same Linear, reachable at two paths
      >>> modules, params = walk(mlp)
      >>> aliases(mlp, modules, params)[0]
      {'upper': 'up'}
    """
    module_at = {id(m): p for p, m in modules.items()}
    param_at = {id(v): (p, owner) for p, (owner, _, v) in params.items()}
    mod_alias: dict[str, str] = {}
    tied: dict[str, tuple[str, str]] = {}
    for path, node, owner in all_paths(model):
        dotted = join(path)
        if isinstance(node, nnx.Param):
            first, first_owner = param_at.get(id(node), (dotted, ""))
            alias_owner = module_at.get(id(owner), "")
            if first != dotted and alias_owner != first_owner:
                tied[dotted] = (first, alias_owner)
        elif module_at.get(id(node), dotted) != dotted:
            mod_alias[dotted] = module_at[id(node)]
    return mod_alias, tied


# Patterns -------------------------------------------------------------------------------


def match(pattern: str, path: str) -> bool:
    """Segment-wise match; `*` (or any fnmatch glob) stays within one segment."""
    p_parts = pattern.split(".") if pattern else []
    m_parts = path.split(".") if path else []
    if len(p_parts) != len(m_parts):
        return False
    return all(fnmatch.fnmatchcase(m, p) for p, m in zip(p_parts, m_parts))


def specificity(pattern: str) -> int:
    """Higher for patterns with fewer wildcard segments."""
    return -sum("*" in seg or "?" in seg or "[" in seg for seg in pattern.split("."))


def normalize_plan(plan: Any) -> dict[str, tuple[Style, ...]]:
    """A plan (one style, a tuple, or a dict) as pattern -> tuple of styles."""
    if plan is None:
        return {}
    if isinstance(plan, Mapping):
        out = {}
        for pattern, entry in plan.items():
            if not isinstance(pattern, str):
                raise PlanError(
                    f"plan key {pattern!r} is not a string. Keys are dotted module paths like "
                    "'layers.*.mlp.up'."
                )
            out[pattern] = as_styles(entry)
        return out
    return {"": as_styles(plan)}


def suggest(pattern: str, modules) -> str:
    """' Did you mean ...?' for the module path or pattern nearest `pattern`."""
    paths = [m for m in modules if m]
    generalized = sorted({generalize(m) for m in paths})
    return did_you_mean(pattern, generalized + paths)


def choose(entries, matches) -> dict[str, str]:
    """Module path -> the most specific pattern matching it (first on ties)."""
    chosen: dict[str, str] = {}
    for pattern in entries:
        for module_path in matches[pattern]:
            best = chosen.get(module_path)
            if best is None or specificity(pattern) > specificity(best):
                chosen[module_path] = pattern
    return chosen
