"""shard_batch / local_batch_slice / reduce_metrics in one process (8 CPU devices).

The multi-process behaviour is tested in test_multiprocess.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nnx_parallel import (
    MeshError,
    ParallelError,
    batch_spec,
    data,
    local_batch_slice,
    make_mesh,
    reduce_metrics,
    shard_batch,
)


def test_shard_batch_pytree(mesh2x4):
    batch = {"x": np.arange(32.0).reshape(8, 4), "y": [np.arange(8)]}
    out = shard_batch(batch, mesh2x4)
    assert out["x"].sharding == NamedSharding(mesh2x4, P("data"))
    np.testing.assert_array_equal(np.asarray(out["x"]), batch["x"])
    np.testing.assert_array_equal(np.asarray(out["y"][0]), batch["y"][0])


def test_shard_batch_spec_and_default():
    mesh = make_mesh(data=2, fsdp=2, model=2)
    assert batch_spec(mesh) == P(("data", "fsdp"))
    x = shard_batch(np.zeros((4, 6)), mesh, P("data", "model"))
    assert x.sharding.spec == P("data", "model")
    tp = jax.make_mesh((8,), ("model",))  # no batch axis: every process passes the whole batch
    assert shard_batch(np.zeros((3, 2)), tp).sharding.spec == P()


def test_local_batch_slice(mesh2x4):
    assert local_batch_slice(6, mesh2x4) == slice(0, 6)
    assert local_batch_slice(5, jax.make_mesh((8,), ("model",))) == slice(0, 5)


def test_shard_batch_errors(mesh2x4):
    with pytest.raises(
        ParallelError, match=r"leaf \['x'\] has 3 rows on process 0, not divisible by the 2 batch"
    ):
        shard_batch({"x": np.zeros((3, 2))}, mesh2x4)
    with pytest.raises(ParallelError, match=r"leaf \[1\] has shape \(\), but spec"):
        shard_batch([np.zeros(2), np.float32(1)], mesh2x4)
    with pytest.raises(MeshError, match=r"names mesh axes \['fsdp'\] that mesh .* does not have"):
        shard_batch(np.zeros((8, 2)), mesh2x4, P("fsdp"))


def test_local_batch_slice_errors(mesh2x4, monkeypatch):
    with pytest.raises(
        MeshError, match="global batch size 7 does not split into the 2 batch shards"
    ):
        local_batch_slice(7, mesh2x4)

    class Scattered:  # a process holding rows 0-1 and 4-5 of 8
        def __init__(self, mesh, spec):
            pass

        def addressable_devices_indices_map(self, shape):
            return {0: (slice(0, 2),), 1: (slice(4, 6),)}

    monkeypatch.setattr(data, "NamedSharding", Scattered)
    with pytest.raises(
        MeshError, match=r"holds rows \[\(0, 2\), \(4, 6\)\] .* not one contiguous block"
    ):
        local_batch_slice(8, mesh2x4)


def test_reduce_metrics(mesh2x4):
    per_example = jax.device_put(jnp.arange(8.0), NamedSharding(mesh2x4, P("data")))
    loss = jax.device_put(jnp.float32(2.5), NamedSharding(mesh2x4, P()))
    out = reduce_metrics({"ex": per_example, "loss": loss, "n": 3, "v": np.array([1.0, 2.0])})
    assert out == {"ex": 3.5, "loss": 2.5, "n": 3.0, "v": 1.5}
    assert all(type(v) is float for v in out.values())
    assert reduce_metrics((per_example, np.array([1.0, 2.0])), op="sum") == (28.0, 3.0)


def test_reduce_metrics_error():
    with pytest.raises(ParallelError, match=r"op must be one of \('mean', 'sum'\), got 'max'"):
        reduce_metrics({"loss": 1.0}, op="max")


def test_shard_batch_seq_axis():
    """Context parallelism: tokens/positions on (batch, sequence), masks on their query rows."""
    from nnx_parallel import MeshError, ParallelError

    mesh = jax.make_mesh((2, 4), ("data", "context"))
    batch = {
        "tokens": np.arange(16).reshape(2, 8),
        "mask": np.ones((2, 1, 8, 8), bool),
        "lengths": np.array([8, 5]),
    }
    out = shard_batch(batch, mesh, seq_axis="context")
    assert out["tokens"].sharding.spec == P("data", "context")
    assert out["mask"].sharding.spec == P("data", None, "context", None)
    assert out["lengths"].sharding.spec == P("data")
    np.testing.assert_array_equal(out["tokens"], batch["tokens"])
    assert out["tokens"].addressable_shards[0].data.shape == (1, 2)
    with pytest.raises(
        ParallelError, match=r"\['tokens'\].*\(7\) does not split.*Pad the sequence to 8"
    ):
        shard_batch({"tokens": np.zeros((2, 7), int)}, mesh, seq_axis="context")
    with pytest.raises(MeshError, match="seq_axis='ctx' is not an axis"):
        shard_batch(batch, mesh, seq_axis="ctx")
