"""`runtime/batch.py`: which inputs and outputs carry the batch, from one shape trace."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from nnx_parallel.runtime import batch
from nnx_parallel.runtime.flat import Flat


def _split(fn, *args, n=4):
    flat = Flat.of(args)
    calls = [0]

    def shapes_of(arrays):
        calls[0] += 1
        return jax.eval_shape(lambda a: fn(*flat.splice(a)), arrays)

    return batch.split(shapes_of, flat, n), calls[0]


def test_one_symbolic_trace_finds_batch_dims():
    fn = lambda x, pos: (x * 2, jnp.swapaxes(x, 0, 1), pos.sum())  # noqa: E731
    split, traces = _split(fn, jnp.ones((8, 3)), jnp.ones((5,)))
    assert traces == 1
    assert split.inputs == (True, False)
    assert split.outputs == (0, 1, -1)


def test_code_that_needs_a_number_falls_back_to_two_concrete_traces():
    split, traces = _split(lambda x: x * 2 if x.shape[0] > 3 else x * 3, jnp.ones((8, 3)))
    assert traces == 3 and split.outputs == 0  # the symbolic one failed, then full + local


def test_an_output_that_folds_the_batch_cannot_run_per_shard():
    with pytest.raises(batch.NotPerShard, match="do not split over the batch"):
        _split(lambda x: x.reshape(-1), jnp.ones((8, 3)))
