"""Rollback: a failure at any step of parallelize / sharded init / reshard leaves the
model (and optimizer) bit-identical: values, dtypes, shardings, metadata, classes."""

import importlib

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from nnx_parallel import FSDP, ColumnParallel, RowParallel, _compat, parallelize, reshard
from nnx_parallel.runtime import install, sharded_init
from tests import models

MESH8 = jax.make_mesh((8,), ("model",))
FSDP8 = jax.make_mesh((8,), ("fsdp",))
MESH2X4 = jax.make_mesh((2, 4), ("data", "model"))
reshard_module = importlib.import_module("nnx_parallel.reshard")  # the name is also a function
TP = {"mlp.up": ColumnParallel("model"), "mlp.down": RowParallel("model")}


class Injected(Exception):
    pass


class Net(nnx.Module):
    """Params with hooks (up, down), BatchNorm stats, a PRNG key: every kind of state."""

    def __init__(self, rngs):
        self.mlp = models.MLP(rngs=rngs)
        self.norm = nnx.BatchNorm(16, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)

    def __call__(self, x):
        return self.dropout(self.norm(self.mlp(x)))


def snapshot(*graphs):
    """Everything rollback must restore, in a form `==` compares exactly."""
    out = []
    for graph in graphs:
        for path, node in nnx.iter_graph(graph):
            if isinstance(node, nnx.Variable):
                value = node.get_value()
                data = value
                if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
                    data = jax.random.key_data(value)
                host = np.asarray(jax.device_get(data))
                meta = dict(node.get_metadata())
                out.append(
                    (
                        path,
                        type(node),
                        str(value.dtype),
                        host.shape,
                        host.tobytes(),
                        getattr(value, "sharding", None),
                        meta,
                    )
                )
            elif isinstance(node, nnx.Pytree):
                out.append((path, type(node), sorted(vars(node))))
    return out


def fail_on_call(monkeypatch, owner, name, n, exc=Injected, after=False):
    """Makes the `n`-th call of `owner.name` raise `exc` (after running it, if `after`)."""
    original = getattr(owner, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n and not after:
            raise exc("injected")
        result = original(*args, **kwargs)
        if len(calls) == n:
            raise exc("injected")
        return result

    monkeypatch.setattr(owner, name, wrapper)
    return calls


@pytest.mark.parametrize("exc", [Injected, KeyboardInterrupt])
@pytest.mark.parametrize("n", [2, 5, 8])
def test_parallelize_rolls_back_when_a_device_put_fails(monkeypatch, n, exc):
    model = Net(nnx.Rngs(0))
    before = snapshot(model)
    calls = fail_on_call(monkeypatch, _compat, "device_put", n, exc)
    with pytest.raises(exc, match="injected"):
        parallelize(model, MESH8, TP)
    assert len(calls) == n  # it did fail midway
    assert snapshot(model) == before


@pytest.mark.parametrize("exc", [Injected, KeyboardInterrupt])
def test_parallelize_rolls_back_when_the_second_hook_install_fails(monkeypatch, exc):
    model = Net(nnx.Rngs(0))
    before = snapshot(model)
    calls = fail_on_call(monkeypatch, install, "install", 2, exc)
    with pytest.raises(exc, match="injected"):
        parallelize(model, MESH8, TP)
    assert len(calls) == 2  # the first module's class was already swapped
    assert snapshot(model) == before
    monkeypatch.undo()
    parallelize(model, MESH8, TP)  # and the model still parallelizes afterwards
    assert model.mlp.up.kernel[...].sharding.spec == P(None, "model")


def test_second_parallelize_rolls_back_to_the_first(monkeypatch):
    model = parallelize(Net(nnx.Rngs(0)), MESH2X4, TP)
    before = snapshot(model)
    calls = fail_on_call(monkeypatch, install, "install", 2, after=True)
    with pytest.raises(Injected, match="injected"):
        parallelize(model, MESH2X4, {"": FSDP("data", min_size=16)})
    assert len(calls) == 2
    assert snapshot(model) == before


@pytest.mark.parametrize("exc", [Injected, KeyboardInterrupt])
def test_sharded_init_rolls_back_its_model_when_install_fails(monkeypatch, exc):
    seen = {}
    original_apply = sharded_init.apply

    def spy(model, resolution, undo=None):
        seen["model"], seen["before"] = model, snapshot(model)
        return original_apply(model, resolution, undo)

    monkeypatch.setattr(sharded_init, "apply", spy)
    calls = fail_on_call(monkeypatch, install, "install", 2, exc)
    with pytest.raises(exc, match="injected"):
        parallelize(lambda: Net(nnx.Rngs(0)), MESH8, TP)
    assert len(calls) == 2
    assert snapshot(seen["model"]) == seen["before"]
    assert not isinstance(seen["model"].mlp.up, install.hooked_classes())


def _fsdp_model_and_optimizer():
    model = parallelize(Net(nnx.Rngs(0)), FSDP8, FSDP("fsdp", min_size=16))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    return model, optimizer


@pytest.mark.parametrize(
    "where, n, after, exc",
    [
        ("move", 3, False, Injected),  # midway through moving the model's arrays
        ("_move_state", 1, True, KeyboardInterrupt),  # every model array moved, then Ctrl-C
        ("_move_optimizer", 1, True, Injected),  # the optimizer state moved too
    ],
)
def test_reshard_rolls_back_model_and_optimizer(monkeypatch, where, n, after, exc):
    model, optimizer = _fsdp_model_and_optimizer()
    before = snapshot(model, optimizer)
    calls = fail_on_call(monkeypatch, reshard_module, where, n, exc, after=after)
    with pytest.raises(exc, match="injected"):
        reshard(model, MESH2X4, TP, optimizer=optimizer)
    assert len(calls) == n
    assert snapshot(model, optimizer) == before


def test_reshard_rolls_back_when_install_fails(monkeypatch):
    model, optimizer = _fsdp_model_and_optimizer()
    before = snapshot(model, optimizer)
    calls = fail_on_call(monkeypatch, install, "install", 1)
    with pytest.raises(Injected, match="injected"):
        reshard(model, MESH2X4, TP, optimizer=optimizer)
    assert len(calls) == 1
    assert snapshot(model, optimizer) == before
