"""Layer stacks: which leading parameter dims stack layers (`nnx.vmap`/`nnx.scan`).

Example:
  >>> stack_metadata(("layers",), P(None, "fsdp"))["out_sharding"]
  ('layers', 'fsdp')
"""

from __future__ import annotations

from typing import Any

from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat, _specs
from nnx_parallel._paths import ancestors


def _stack_names(declared, shapes, mesh: Mesh) -> set[str]:
    """Names (no mesh axis) that every param declaring them has at one
    position with one size, used by at least two params."""
    seen: dict[str, set] = {}
    for path, spec in declared.items():
        for d, e in enumerate(spec):
            if isinstance(e, str) and e not in mesh.axis_names and d < len(shapes[path]):
                seen.setdefault(e, set()).add((d, shapes[path][d], path))
    return {e for e, uses in seen.items() if len(uses) >= 2 and len({u[:2] for u in uses}) == 1}


def _untagged_stack(path: str, params, shapes, out) -> tuple[str, ...] | None:
    """The stack names an untagged param shares with its nearest tagged ancestor."""
    for anc in ancestors(path):
        inside = [p for p in params if not anc or p.startswith(anc + ".")]
        tags = {out[p] for p in inside if p in out}
        if not tags:
            continue
        if len(tags) == 1:
            (tag,) = tags
            lead = {shapes[p][: len(tag)] for p in inside}
            if len(lead) == 1 and all(len(shapes[p]) >= len(tag) for p in inside):
                return tag
        return None
    return None


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
        path: _compat.get_declared_spec(var, raw=True) or () for path, (_, _, var) in params.items()
    }
    shapes = {path: tuple(var.get_value().shape) for path, (_, _, var) in params.items()}
    names = _stack_names(declared, shapes, mesh)
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
        tag = _untagged_stack(path, params, shapes, out)
        if tag is not None:
            out[path] = tag
    return out


def stack_metadata(tag: tuple[str, ...], spec: P) -> dict[str, Any]:
    """`out_sharding` with the stack names on the leading dims `spec` leaves unsharded."""
    entries = list(_specs.pad(spec, len(tag)))
    for d, name in enumerate(tag):
        if entries[d] is None:
            entries[d] = name
    rules = tuple((name, None) for name in tag)
    return {_compat.SHARDING_KEY: tuple(entries), "sharding_rules": rules}
