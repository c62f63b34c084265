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
from nnx_parallel.core import layers


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


def _shape_stacks(params, modules, shapes, declared, mesh, done) -> dict[str, tuple]:
    """Stacked params found by shape: a known layer's param with more leading
    dims than the layer's own attributes give it (`layers.unstacked_shape`).
    Their names are the non-mesh names its own `out_sharding` has there
    (one annotated param of a tagged stack), else unknown (None)."""
    out = {}
    for path, (owner, name, _) in params.items():
        if path in done or owner not in modules:
            continue
        own = layers.unstacked_shape(modules[owner], name)
        shape = shapes[path]
        if own is None or len(shape) <= len(own) or shape[len(shape) - len(own) :] != own:
            continue
        lead = len(shape) - len(own)
        names = tuple(declared[path][:lead]) if len(declared[path]) == len(shape) else ()
        if not all(isinstance(e, str) and e not in mesh.axis_names for e in names):
            names = ()
        out[path] = names or (None,) * lead
    return out


def layer_stacks(params, mesh: Mesh, modules=None) -> dict[str, tuple[str | None, ...]]:
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

    Given `modules` (path -> module), the params of known layers (Linear,
    Conv, Embed, norms) left are checked against the layer's own attributes:
    a kernel of shape (4, 512, 512) in a `Linear(512, 512)` was stacked by
    `nnx.vmap`. No metadata names such a stack (`nnx.vmap` adds the
    `PARTITION_NAME` only to an `out_sharding` that exists), so its names are
    None; other params under the same stack share them as above.
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
    _propagate(params, shapes, declared, out)
    if modules is not None:
        found = _shape_stacks(params, modules, shapes, declared, mesh, out)
        out.update({p: tag for p, tag in found.items() if None not in tag})
        _propagate(params, shapes, declared, out)
        rest = {p: tag for p, tag in found.items() if p not in out}
        _propagate(params, shapes, declared, rest)
        out.update(rest)
    return out


def _propagate(params, shapes, declared, out) -> None:
    """Adds to `out` the undeclared params that share a stack found in it."""
    if not out:  # no stacks: nothing to propagate (and no quadratic walk below)
        return
    for path in [p for p in params if p not in out and not declared[p]]:
        tag = _untagged_stack(path, params, shapes, out)
        if tag is not None:
            out[path] = tag


def stack_metadata(tag: tuple[str | None, ...], spec: P) -> dict[str, Any]:
    """`out_sharding` with the stack names on the leading dims `spec` leaves unsharded.

    A stack whose names are unknown (found by shape) gets no `out_sharding`:
    `nnx.scan(transform_metadata=...)` would find its name missing, and
    without one it checks nothing. The value's sharding carries the layout.
    """
    if None in tag:
        return {_compat.SHARDING_KEY: None}
    entries = list(_specs.pad(spec, len(tag)))
    for d, name in enumerate(tag):
        if entries[d] is None:
            entries[d] = name
    rules = tuple((name, None) for name in tag)
    return {_compat.SHARDING_KEY: tuple(entries), "sharding_rules": rules}
