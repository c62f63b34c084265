"""The class swap: visible names, the registry, and what NNX transforms keep."""

from __future__ import annotations

import jax
from flax import nnx

import nnx_parallel as npx
from nnx_parallel.core.layouts import base_class, get_hooks
from nnx_parallel.runtime import install
from tests import models


def _fsdp8():
    return jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))


def _model8():
    return jax.make_mesh((8,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))


def test_hooked_class_names_what_it_does():
    mlp = npx.parallelize(models.MLP(rngs=nnx.Rngs(0)), _fsdp8(), npx.FSDP(min_size=16))
    tp = npx.parallelize(models.MLP(rngs=nnx.Rngs(0)), _model8(), {"up": npx.ColumnParallel()})
    assert type(mlp.up).__name__ == "FSDPLinear" and type(mlp.up).__qualname__ == "FSDPLinear"
    assert type(tp.up).__name__ == "ParallelLinear"
    assert type(tp.down) is nnx.Linear  # untouched layers keep their class
    assert isinstance(mlp.up, nnx.Linear) and type(mlp.up) is not nnx.Linear
    assert base_class(mlp.up) is nnx.Linear
    assert "FSDPLinear" in repr(mlp.up)


def test_registry_shares_one_class_per_base_and_hooks():
    a = npx.parallelize(models.MLP(rngs=nnx.Rngs(0)), _fsdp8(), npx.FSDP(min_size=16))
    b = npx.parallelize(models.MLP(rngs=nnx.Rngs(1)), _fsdp8(), npx.FSDP(min_size=16))
    assert type(a.up) is type(b.up)
    assert type(a.up) is not type(a.down)  # other gathered params: other hooks
    assert type(a.up) in install.hooked_classes()
    assert nnx.graphdef(a) == nnx.graphdef(b)


def test_uninstall_gives_the_users_class_back():
    mlp = npx.parallelize(models.MLP(rngs=nnx.Rngs(0)), _fsdp8(), npx.FSDP(min_size=16))
    install.uninstall(mlp.up)
    assert type(mlp.up) is nnx.Linear and get_hooks(mlp.up) is None
    install.uninstall(mlp.up)  # idempotent
    assert type(mlp.up) is nnx.Linear


def test_split_merge_and_clone_keep_the_hooks():
    mlp = npx.parallelize(models.MLP(rngs=nnx.Rngs(0)), _fsdp8(), npx.FSDP(min_size=16))
    graphdef, state = nnx.split(mlp)
    merged = nnx.merge(graphdef, state)
    cloned = nnx.clone(mlp)
    for copy in (merged, cloned):
        assert type(copy.up) is type(mlp.up)
        assert get_hooks(copy.up) == get_hooks(mlp.up) is not None
