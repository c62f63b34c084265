"""Dotted paths: one spelling for graph paths, state keys and key paths.

`nnx.iter_graph` yields tuples of keys, `jax.tree_util` yields key paths of
`DictKey`/`SequenceKey`/`GetAttrKey` entries; plans, resolutions and error
messages speak `"blocks.0.mlp.up.kernel"`. These helpers convert, so every
module writes paths the same way.

Example:
  >>> join(("blocks", 0, "kernel"))
  'blocks.0.kernel'
  >>> generalize("blocks.0.mlp")
  'blocks.*.mlp'
"""

from __future__ import annotations

from typing import Any


def join(path: tuple) -> str:
    """`("blocks", 0, "kernel")` -> `"blocks.0.kernel"`."""
    return ".".join(str(k) for k in path)


def keys(keypath: Any) -> tuple:
    """The plain keys of a `jax.tree_util` key path: dict keys and sequence
    indices. Attribute entries (a Variable's value) drop out."""
    return tuple(
        getattr(k, "key", getattr(k, "idx", None))
        for k in keypath
        if hasattr(k, "key") or hasattr(k, "idx")
    )


def leaf_path(keypath: Any) -> str:
    """Dotted path of an `nnx.State` leaf (`blocks.0.mlp.up.kernel`), as
    `resolve` keys parameters."""
    return join(keys(keypath))


def ancestors(path: str) -> list[str]:
    """The paths above `path`, nearest first, ending with the root `""`."""
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)]


def within(path: str, root: str) -> bool:
    """True if `path` is `root` or below it (every path is within the root `""`).

    Example:
      >>> within("blocks.0.mlp", "blocks.0"), within("blocks.01", "blocks.0")
      (True, False)
    """
    return root == "" or path == root or path.startswith(root + ".")


def generalize(path: str) -> str:
    """`path` with every integer segment replaced by `*` (a plan pattern)."""
    return ".".join("*" if seg.isdigit() else seg for seg in path.split("."))
