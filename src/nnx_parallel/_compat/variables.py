"""Variable values and sharding metadata across Flax releases."""

from __future__ import annotations

from typing import Any

from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

# The metadata key `nnx.with_partitioning` writes, newest first.
_SHARDING_KEYS = ("out_sharding", "sharding_names", "sharding")
SHARDING_KEY = "out_sharding"
# Our own marker: which plan pattern (or decorator) set a Variable's spec.
SOURCE_KEY = "nnx_parallel_source"

UNCONSTRAINED = P.UNCONSTRAINED


# Variables ----------------------------------------------------------------


def get_value(var: nnx.Variable) -> Any:
    return var.get_value()


def set_value(var: nnx.Variable, value: Any) -> None:
    var.set_value(value)


def get_metadata(var: nnx.Variable) -> dict[str, Any]:
    return dict(var.get_metadata())


def get_declared_spec(var: nnx.Variable, *, raw: bool = False) -> tuple | None:
    """The spec a Variable's own metadata declares (any key Flax ever used).

    Names are mapped through the Variable's `sharding_rules` metadata, as
    Flax does, unless `raw`.
    """
    meta = get_metadata(var)
    for key in _SHARDING_KEYS:
        value = meta.get(key)
        if value:
            rules = dict(meta.get("sharding_rules") or ()) if not raw else {}
            return tuple(rules.get(e, e) if isinstance(e, str) else e for e in value)
    return None


def set_sharding_metadata(var: nnx.Variable, spec: P, mesh: Mesh, source: str | None) -> None:
    """Writes what `nnx.with_partitioning(init, spec, mesh)` would have written.

    A name the old metadata had on a dim the new spec leaves unsharded, and
    that is no mesh axis (the `nnx.PARTITION_NAME` that `nnx.vmap`/`nnx.scan`
    add for a layer stack), stays, mapped to None through `sharding_rules`:
    `nnx.scan(transform_metadata=...)` checks it is still there.
    """
    entries = list(spec)
    old = get_declared_spec(var, raw=True) or ()
    rules = dict(get_metadata(var).get("sharding_rules") or ())
    if len(old) == len(entries):
        for d, (a, b) in enumerate(zip(old, entries)):
            if b is None and isinstance(a, str) and a not in mesh.axis_names:
                entries[d] = a
                rules[a] = None
    extra = {"sharding_rules": tuple(rules.items())} if rules else {}
    var.set_metadata(**{SHARDING_KEY: tuple(entries), "mesh": mesh, SOURCE_KEY: source, **extra})


def restore_metadata(var: nnx.Variable, metadata: dict[str, Any]) -> None:
    """Puts a Variable's metadata back exactly as `get_metadata` returned it."""
    current = get_metadata(var)
    for key in current:
        if key not in metadata:
            var.del_metadata(key)
    var.set_metadata(**metadata)
