"""Sharded checkpoints: save on one mesh and plan, restore bit-exact on another."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nnx_parallel import (
    FSDP,
    ColumnParallel,
    PlanError,
    RowParallel,
    gather,
    parallelize,
    restore,
    save,
)
from nnx_parallel.checkpoint import CheckpointError
from tests import helpers, models
from tests.helpers import adam

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:orbax")


def sub_mesh(kind, shape, names, first=0):
    n = int(np.prod(shape))
    return jax.make_mesh(
        shape, names, axis_types=(kind,) * len(names), devices=jax.devices()[first : first + n]
    )


def host(tree):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(gather(tree)))


def assert_same(a, b):
    ha, hb = host(a), host(b)
    assert jax.tree.structure(ha) == jax.tree.structure(hb)
    jax.tree.map(np.testing.assert_array_equal, ha, hb)


def train_step(model, opt, mesh):
    x = jax.random.randint(jax.random.key(2), (8, 8), 0, 64)
    with jax.set_mesh(mesh):
        helpers.make_step()(model, opt, x)


def test_round_trip_8_to_4_to_2_across_fsdp_and_tp(kind, tmp_path):
    factory = lambda: models.GPT(layers=1, rngs=nnx.Rngs(0))  # noqa: E731
    fsdp8 = sub_mesh(kind, (8,), ("fsdp",))
    tp4 = sub_mesh(kind, (1, 4), ("data", "model"), 4)
    fsdp2 = sub_mesh(kind, (2,), ("fsdp",), 2)
    tp_plan = helpers.tp_plans()["gpt"]
    model = parallelize(factory, fsdp8, FSDP(min_size=64))
    opt = adam(model)
    train_step(model, opt, fsdp8)  # non-trivial params and Adam moments
    save(tmp_path / "a", model, opt)

    # 8 devices FSDP -> 4 devices TP, optimizer built abstractly from a factory.
    model4, opt4 = restore(tmp_path / "a", factory, tp4, tp_plan, optimizer=adam)
    up = model4.blocks[0].mlp.up
    assert up.kernel[...].sharding == NamedSharding(tp4, P(None, "model"))
    assert up.kernel.get_metadata("out_sharding") == (None, "model")
    mu = opt4.opt_state[0].mu["blocks"][0]["mlp"]["up"]["kernel"][...]
    assert mu.sharding == up.kernel[...].sharding  # moments laid out like their params
    assert opt4.opt_state[0].count[...].sharding.is_fully_replicated
    assert_same(model4, model)
    assert_same(opt4, opt)
    save(tmp_path / "b", model4, opt4)

    # 4 devices TP -> 2 devices FSDP, into an existing optimizer, in place.
    model2 = restore(tmp_path / "b", factory, fsdp2, FSDP(min_size=64))
    opt2 = adam(model2)
    model2, same = restore(tmp_path / "b", model2, fsdp2, FSDP(min_size=64), optimizer=opt2)
    assert same is opt2
    kernel = model2.blocks[0].mlp.up.kernel[...]
    assert kernel.sharding == NamedSharding(fsdp2, P(None, "fsdp"))
    assert {d.id for d in kernel.devices()} == {2, 3}
    assert opt2.opt_state[0].nu["blocks"][0]["mlp"]["up"]["kernel"][...].sharding == kernel.sharding
    assert_same(model2, model)
    assert_same(opt2, opt)

    # Training continues identically from the restored state.
    train_step(model, opt, fsdp8)
    train_step(model2, opt2, fsdp2)
    for path, value in helpers.params(model2).items():
        helpers.assert_close(value, helpers.params(model)[path], helpers.STEP_TOL, path)


def test_restore_arrives_in_planned_layout(mesh8, tmp_path):
    model = parallelize(
        lambda: models.MLP(rngs=nnx.Rngs(0)), mesh8, {"up": ColumnParallel(), "down": RowParallel()}
    )
    save(tmp_path / "c", model)
    back = restore(
        tmp_path / "c",
        nnx.eval_shape(lambda: models.MLP(rngs=nnx.Rngs(5))),
        mesh8,
        FSDP("model", min_size=16),
    )
    # Every array arrives in its planned layout: a 1/8 shard per device.
    kernel = back.up.kernel[...]
    assert kernel.sharding.spec == P(None, "model")
    assert [s.data.shape for s in kernel.addressable_shards] == [(16, 8)] * 8
    assert_same(back, model)
    x = jnp.ones((8, 16))
    with jax.set_mesh(mesh8):
        helpers.assert_close(back(x), model(x), helpers.FWD_TOL, "forward")


def test_non_param_state_round_trips(fsdp8, tmp_path):
    class Net(nnx.Module):
        def __init__(self, *, rngs):
            self.mlp = models.MLP(rngs=rngs)
            self.bn = nnx.BatchNorm(16, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

    model = parallelize(lambda: Net(rngs=nnx.Rngs(0, dropout=7)), fsdp8, FSDP(min_size=16))
    model.bn.mean.set_value(jax.device_put(jnp.full((16,), 3.0), model.bn.mean[...].sharding))
    save(tmp_path / "d", model)
    back = restore(
        tmp_path / "d", lambda: Net(rngs=nnx.Rngs(1, dropout=1)), fsdp8, FSDP(min_size=16)
    )
    assert_same(back, model)
    assert back.bn.mean[...].sharding.is_fully_replicated
    with pytest.raises(CheckpointError, match="already holds a checkpoint .*overwrite=True"):
        save(tmp_path / "d", model)  # exists
    save(tmp_path / "d", back, overwrite=True)


def test_restore_rejects_non_models(mesh8, tmp_path):
    with pytest.raises(PlanError, match="model or a zero-argument factory"):
        restore(tmp_path, 3, mesh8, FSDP())


def test_zero_optimizer_state_restores_in_its_zero_layout(kind, tmp_path):
    from nnx_parallel import ShardedOptimizer, ZeRO

    factory = lambda: models.MLP(rngs=nnx.Rngs(0))  # noqa: E731
    dp2x4 = sub_mesh(kind, (2, 4), ("data", "model"))
    dp4 = sub_mesh(kind, (4,), ("data",), 4)
    model = parallelize(factory, dp2x4, ZeRO(stage=1, axis="data", min_size=32))
    opt = ShardedOptimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(3), (8, 16))
    with jax.set_mesh(dp2x4):
        helpers.make_step()(model, opt, x)
    save(tmp_path / "z", model, opt)

    zero4 = ZeRO(stage=1, axis="data", min_size=32)
    model4, opt4 = restore(
        tmp_path / "z",
        factory,
        dp4,
        zero4,
        optimizer=lambda m: ShardedOptimizer(m, optax.adam(1e-2), wrt=nnx.Param),
    )
    assert model4.up.kernel[...].sharding.spec == P(None, None)  # params stay replicated
    mu = opt4.opt_state[0].mu["up"]["kernel"][...]
    assert mu.sharding == NamedSharding(dp4, P(None, "data"))  # moments in ZeRO's layout, 4-way
    assert opt4.opt_state[0].mu["down"]["bias"][...].sharding.spec == P(None)  # below min_size
    assert_same(model4, model)
    assert_same(opt4, opt)
