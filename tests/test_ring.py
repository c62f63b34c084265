"""nnx_parallel.runtime.ring: ring attention, and the head-tail order of load balancing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat
from nnx_parallel.runtime.ring import (
    _from_balanced,
    _hops,
    _to_balanced,
    balanced_order,
    ring_attention,
)
from nnx_parallel.views.collectives import collectives

N = 4
MESH = jax.make_mesh((N,), ("cp",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:N])


def _manual(f, n_in=1):
    spec = P(None, "cp")
    return jax.jit(
        _compat.shard_map(f, mesh=MESH, in_specs=(spec,) * n_in, out_specs=spec, axis_names={"cp"})
    )


def _put(x):
    return jax.device_put(x, NamedSharding(MESH, P(None, "cp")))


def test_balanced_order_pairs_a_head_chunk_with_a_tail_chunk():
    assert balanced_order(8, 2) == [0, 1, 6, 7, 2, 3, 4, 5]
    order = balanced_order(16, N)
    assert sorted(order) == list(range(16))
    assert order[:4] == [0, 1, 14, 15]  # device 0: chunks 0 and 7


def test_rows_move_into_head_tail_order_and_back():
    x = jnp.arange(2 * 16, dtype=jnp.float32).reshape(2, 16)
    to = _manual(lambda x: _to_balanced(x, 1, "cp", N))(_put(x))
    np.testing.assert_array_equal(to, x[:, balanced_order(16, N)])
    back = _manual(lambda x: _from_balanced(_to_balanced(x, 1, "cp", N), 1, "cp", N))(_put(x))
    np.testing.assert_array_equal(back, x)


@pytest.mark.parametrize("balanced", [False, True], ids=["ring", "balanced"])
def test_ring_attention_equals_jax_nn_causal_gqa(balanced):
    s, kv, groups, h = 32, 2, 2, 8
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (1, s, kv * groups, h))
    k, v = (jax.random.normal(key, (1, s, kv, h)) for key in keys[1:])
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True)

    def local(q, k, v):
        if balanced:
            q, k, v = (_to_balanced(x, 1, "cp", N) for x in (q, k, v))
        out = ring_attention(
            q, k, v, None, None, axis="cp", size=N, scale=h**-0.5, causal=True, balanced=balanced
        )
        return _from_balanced(out, 1, "cp", N) if balanced else out

    got = _manual(local, 3)(_put(q), _put(k), _put(v))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


WINDOWS = [
    (True, (5, 0), False, 1),  # causal window shorter than a block (8 rows): one hop
    (True, (9, 0), False, 2),  # reaches one row into the block two back
    (True, (5, 0), True, N - 1),  # balanced: chunks spread out, pairs skipped, all hops
    (False, (3, 3), False, N - 1),  # two-sided: blocks ahead too
]


@pytest.mark.parametrize(("causal", "window", "balanced", "hops"), WINDOWS)
def test_sliding_window_skips_blocks_out_of_reach(causal, window, balanced, hops):
    """Exact against jax.nn's sliding window; K/V move `hops` times (HLO
    collective-permutes), fewer than N - 1 where a causal window is short."""
    s, kv, groups, h = 32, 2, 2, 8
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (1, s, kv * groups, h))
    k, v = (jax.random.normal(key, (1, s, kv, h)) for key in keys[1:])
    want = jax.nn.dot_product_attention(q, k, v, is_causal=causal, local_window_size=window)

    def local(q, k, v):
        if balanced:
            q, k, v = (_to_balanced(x, 1, "cp", N) for x in (q, k, v))
        out = ring_attention(
            q, k, v, None, None, axis="cp", size=N, scale=h**-0.5, causal=causal,
            window=window, balanced=balanced,
        )  # fmt: skip
        return _from_balanced(out, 1, "cp", N) if balanced else out

    f = _manual(local, 3)
    got = f(_put(q), _put(k), _put(v))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # K/V move `hops` times: the ring's scan runs hops steps (its body holds
    # the one K and one V collective-permute, counted once in the HLO).
    assert _hops(N, s // N, causal, window, balanced) == hops
    ops = collectives(f.lower(_put(q), _put(k), _put(v)).compile(), MESH)
    block = f"f32[1,{s // N},{kv},{h}]"  # one device's K or V block
    ring = [c for c in ops if c.kind == "collective-permute" and block in c.shape]
    assert len(ring) >= 2
