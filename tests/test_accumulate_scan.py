"""nnx_parallel.accumulate_scan: microbatch splitting and the accumulators of both scan paths."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nnx_parallel as npx
from nnx_parallel.accumulate_scan import _finish, _params_mesh, _resharded, _splitter
from tests import models


def test_microbatch_i_holds_rows_i_i_plus_k_and_so_on():
    batch = {"x": jnp.arange(12).reshape(6, 2), "flag": "kept"}
    take = _splitter(batch, 3)
    np.testing.assert_array_equal(take(1)["x"], [[2, 3], [8, 9]])  # rows 1 and 4
    assert take(0)["flag"] == "kept"


def test_finish_means_inexact_leaves_and_sums_the_rest():
    acc = {"g": jnp.array([4.0, 8.0]), "n": jnp.array(6)}
    mean = _finish(acc, "mean", 4)
    np.testing.assert_allclose(mean["g"], [1.0, 2.0])
    assert int(mean["n"]) == 6  # integer counts are summed, never divided
    assert _finish(acc, "sum", 4) is acc


def test_params_mesh_and_resharded_read_the_parallelized_model():
    mesh = jax.make_mesh((8,), ("fsdp",))
    plain = models.MLP(rngs=nnx.Rngs(0))
    assert _params_mesh(plain) is None and not _resharded(plain)
    fsdp = npx.parallelize(models.MLP(rngs=nnx.Rngs(0)), mesh, npx.FSDP(min_size=16))
    assert _params_mesh(fsdp) is mesh and _resharded(fsdp)
    keep = npx.parallelize(
        models.MLP(rngs=nnx.Rngs(0)), mesh, npx.FSDP(min_size=16, reshard_after_forward=False)
    )
    assert not _resharded(keep)
