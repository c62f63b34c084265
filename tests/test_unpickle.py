"""Pickling parallelized models, their state and gathered copies (issue 24 e).

Also the namesake tests of runtime/unpickle.py.
"""

import copy
import pickle

import jax
import numpy as np
import pytest
from flax import nnx

import nnx_parallel as npx
from nnx_parallel import FSDP, ColumnParallel, RowParallel
from nnx_parallel.core.layouts import get_hooks
from tests.models import MLP

PLANS = {
    "fsdp": lambda mesh: FSDP("data", min_size=1),
    "fsdp x tp": lambda mesh: npx.plans.combine(
        {"up": ColumnParallel("model"), "down": RowParallel("model")}, FSDP("data", min_size=1)
    ),
}


def _params(model):
    return {p: v for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}


@pytest.mark.parametrize("plan", PLANS)
def test_pickle_round_trip_of_a_parallelized_model(mesh2x4, plan):
    # Before: PicklingError for the generated class, TypeError for the mesh's Devices.
    model = npx.parallelize(MLP(rngs=nnx.Rngs(0)), mesh2x4, PLANS[plan](mesh2x4))
    back = pickle.loads(pickle.dumps(model))
    assert type(back) is type(model) and type(back.up) is type(model.up)
    assert get_hooks(back.up) == get_hooks(model.up) and isinstance(back.up, nnx.Linear)
    before, after = _params(model), _params(back)
    assert before.keys() == after.keys()
    for path, var in before.items():
        np.testing.assert_array_equal(after[path][...], var[...])
        assert after[path].get_metadata() == var.get_metadata()  # spec, source, mesh (equal)
        assert after[path][...].sharding == var[...].sharding  # laid out again (unpickle.py)
    x = jax.random.normal(jax.random.key(0), (8, 16))
    with jax.set_mesh(mesh2x4):
        f = nnx.jit(lambda m, x: m(x))
        np.testing.assert_allclose(f(back, x), f(model, x), atol=1e-6)


def test_pickle_state_and_gathered_copy(fsdp8):
    model = npx.parallelize(MLP(rngs=nnx.Rngs(0)), fsdp8, FSDP(min_size=1))
    for tree in (nnx.state(model), npx.gather(model)):
        back = pickle.loads(pickle.dumps(tree))
        a, b = jax.tree.leaves(tree), jax.tree.leaves(back)
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
        assert back["up"]["kernel"].get_metadata()["mesh"] == fsdp8
    assert copy.deepcopy(model).up.kernel.get_metadata()["mesh"] == fsdp8
