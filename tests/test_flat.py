"""`runtime/flat.py`: flatten, keep the arrays, splice them back."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from nnx_parallel.runtime.flat import Flat, is_array, is_node


def test_splice_puts_arrays_back_and_keeps_the_rest():
    layer = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    tree = ((jnp.ones(2), "mean", layer), {"scale": 2.0, "x": jnp.zeros(3)})
    f = Flat.of(tree)
    assert [a.shape for a in f.arrays] == [(2,), (3,)]
    assert f.nodes == (layer,)
    (a, mode, node), kw = f.splice([jnp.full(2, 5.0), jnp.full(3, 7.0)])
    assert float(a[0]) == 5.0 and float(kw["x"][0]) == 7.0
    assert mode == "mean" and node is layer and kw["scale"] == 2.0


def test_nodes_can_be_replaced():
    a, b = nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Linear(2, 2, rngs=nnx.Rngs(1))
    f = Flat.of(([a], {}))
    assert f.splice([], nodes=[b])[0][0] is b


def test_predicates():
    assert is_array(jnp.ones(1)) and not is_array(1.0)
    assert is_node(nnx.Param(jnp.ones(1))) and not is_node(jnp.ones(1))
