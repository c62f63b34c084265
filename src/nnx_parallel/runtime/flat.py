"""One idiom, written once: flatten a call's arguments, keep the arrays, splice them back.

JAX transformations (`shard_map`, `custom_vjp`, `eval_shape`, `auto_axes`)
take arrays; a module's call takes anything (arrays, flags, modules,
caches). `Flat.of(tree)` flattens the tree, `arrays` are the leaves that go
through the transformation, and `splice(new arrays)` rebuilds the tree with
them in place and everything else as it was.

Example:
  >>> from nnx_parallel.runtime.flat import Flat
  >>> f = Flat.of(((jax.numpy.ones(2), "mean"), {"scale": 2.0}))
  >>> len(f.arrays)
  1
  >>> f.splice([jax.numpy.zeros(2)])[0][1]
  'mean'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx


def is_array(x: Any) -> bool:
    """A JAX array or an abstract stand-in for one (`ShapeDtypeStruct`, tracer)."""
    return isinstance(x, jax.Array) or hasattr(x, "shape") and hasattr(x, "dtype")


def is_node(x: Any) -> bool:
    """An NNX graph node (module, variable, other `nnx.Pytree`): kept whole."""
    return isinstance(x, (nnx.Variable, nnx.Pytree))


@dataclasses.dataclass(frozen=True)
class Flat:
    """A flattened tree and where its arrays are (see the module docstring)."""

    leaves: tuple
    treedef: Any
    where: tuple[int, ...]

    @classmethod
    def of(cls, tree, is_leaf: Callable[[Any], bool] | None = is_node, keep=is_array) -> Flat:
        leaves, treedef = jax.tree.flatten(tree, is_leaf=is_leaf)
        return cls(tuple(leaves), treedef, tuple(i for i, x in enumerate(leaves) if keep(x)))

    @property
    def arrays(self) -> list:
        return [self.leaves[i] for i in self.where]

    @property
    def nodes(self) -> tuple:
        """The graph nodes among the leaves (modules passed as arguments)."""
        return tuple(x for x in self.leaves if is_node(x))

    def splice(self, arrays, nodes=None) -> Any:
        """The tree with `arrays` in place of its arrays (and `nodes` of its nodes)."""
        leaves = list(self.leaves)
        for i, a in zip(self.where, arrays):
            leaves[i] = a
        if nodes is not None:
            at = [i for i, x in enumerate(self.leaves) if is_node(x)]
            for i, node in zip(at, nodes):
                leaves[i] = node
        return jax.tree.unflatten(self.treedef, leaves)
