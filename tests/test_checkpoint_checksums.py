"""Tests for nnx_parallel.checkpoint._checksums: per-array checksums, on host and device."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nnx_parallel.checkpoint import _checksums as C

MESH = jax.make_mesh((8,), ("fsdp",))


def test_fmix_matches_murmur3_finalizer_on_host_and_device():
    # fmix32(1) of MurmurHash3 is 0x514E28B7; fmix32(0) is 0.
    assert int(C._fmix(jnp.uint32(1))) == 0x514E28B7
    assert int(C._fmix(jnp.uint32(0))) == 0
    h = np.array([1, 2, 0xDEADBEEF], np.uint32)
    np.testing.assert_array_equal(C._np_fmix(h), np.asarray(C._fmix(jnp.asarray(h))))


def test_words_are_the_element_bits():
    assert C._words(jnp.array([1.0], jnp.float32)).tolist() == [0x3F800000]
    assert C._words(jnp.array([True, False])).tolist() == [1, 0]
    assert C._words(jnp.array([-1], jnp.int8)).tolist() == [0xFF]
    assert C._words(jnp.array([1.0], jnp.bfloat16)).tolist() == [0x3F80]
    assert C._words(jnp.array([1 + 2j], jnp.complex64)).tolist() == [[0x3F800000, 0x40000000]]


def test_checksum_is_layout_invariant_and_position_sensitive():
    x = jnp.arange(32 * 8, dtype=jnp.float32).reshape(32, 8)
    sharded = jax.device_put(x, NamedSharding(MESH, P("fsdp", None)))
    value = int(C._checksum(x))
    assert int(C._checksum_jit(sharded)) == value
    assert C._host_partial(sharded) == value  # from the 8 shards, in numpy
    assert C._host_partial(np.asarray(x)) == value
    # Same elements, other places: another checksum.
    assert C._host_partial(np.asarray(x)[::-1].copy()) != value
    # Only the flat (row-major) index enters: a reshape keeps the checksum.
    assert C._host_partial(np.asarray(x).reshape(8, 32)) == value


def test_host_readable_by_dtype_size_and_kind():
    small = jax.device_put(jnp.zeros((16, 8)), NamedSharding(MESH, P("fsdp")))
    assert C._host_readable(small)
    assert C._host_readable(np.zeros(3, np.int8))
    assert C._host_readable(np.zeros(2**22, np.float32))  # numpy: any size
    assert not C._host_readable(np.zeros(3, np.float64))  # 64-bit
    assert not C._host_readable(jnp.zeros(3, jnp.bool_))
    assert not C._host_readable(jnp.zeros(3, jnp.complex64))
    over = C.HOST_HASH_BYTES // 4 + 1  # float32 elements: just over the limit
    assert not C._host_readable(jnp.zeros(over, jnp.float32))
    assert C._host_readable(jnp.zeros(over - 1, jnp.float32))


def test_checksums_agree_between_host_and_device_paths():
    x = jnp.arange(64, dtype=jnp.int32).reshape(8, 8)
    flat = {
        "host": jax.device_put(x, NamedSharding(MESH, P(None, "fsdp"))),
        "bits": jnp.array([True, False, True]),
        "key": jax.random.key(0),
    }
    sums = C._checksums(flat)
    assert set(sums) == {"host", "bits", "key"}
    assert all(isinstance(v, int) and 0 <= v < 2**32 for v in sums.values())
    assert sums["host"] == int(C._checksum(x))
    assert sums["bits"] == int(C._checksum(jnp.array([1, 0, 1], jnp.int8)))
    assert sums["key"] == int(C._checksum(jax.random.key_data(jax.random.key(0))))
