"""reshard / move / gather: bit-identical, device to device, across meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax._src import array as jax_array
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nnx_parallel import (
    FSDP,
    ColumnParallel,
    PlanError,
    RowParallel,
    gather,
    move,
    parallelize,
    reshard,
)
from nnx_parallel.core.layouts import get_hooks
from tests import helpers, models


def sub_mesh(kind, shape, names, first=0):
    n = int(np.prod(shape))
    return jax.make_mesh(
        shape, names, axis_types=(kind,) * len(names), devices=jax.devices()[first : first + n]
    )


@pytest.fixture
def host_reads(monkeypatch):
    """Records every device-to-host fetch of a whole jax.Array (`Array._value`)."""
    reads = []
    original = jax_array.ArrayImpl._value

    def spy(self):
        reads.append(self.shape)
        return original.fget(self)

    monkeypatch.setattr(jax_array.ArrayImpl, "_value", property(spy))
    return reads


def test_device_put_goes_through_host_but_move_does_not(kind, host_reads):
    m8 = sub_mesh(kind, (8,), ("fsdp",))
    m24 = sub_mesh(kind, (2, 4), ("data", "model"))
    x = jax.device_put(jnp.arange(48 * 32.0).reshape(48, 32), NamedSharding(m8, P("fsdp", None)))
    jax.device_put(x, NamedSharding(m24, P(None, "model")))
    assert host_reads == [(48, 32)]  # the detector sees jax.device_put's host round trip
    host_reads.clear()
    expected = np.arange(48 * 32.0).reshape(48, 32)
    targets = [
        NamedSharding(m24, P(None, "model")),  # same devices, other mesh
        NamedSharding(
            sub_mesh(kind, (2, 2), ("data", "model"), 4), P("model", "data")
        ),  # 4 other devices
        NamedSharding(sub_mesh(kind, (3,), ("fsdp",), 1), P("fsdp")),  # 3 devices: no divisibility
        NamedSharding(sub_mesh(kind, (2,), ("fsdp",), 6), P(None, "fsdp")),
        NamedSharding(m8, P(None, "fsdp")),  # grow back to 8
        NamedSharding(m24, P()),  # replicated
    ]
    for target in targets:
        x = move(x, target)
        assert x.sharding == target
    assert host_reads == []
    np.testing.assert_array_equal(np.asarray(x), expected)


def test_move_keys_scalars_and_uncommitted(kind):
    m8 = sub_mesh(kind, (8,), ("fsdp",))
    m2 = sub_mesh(kind, (2,), ("fsdp",), 2)
    key = jax.device_put(jax.random.key(3), NamedSharding(m8, P()))
    moved = move(key, NamedSharding(m2, P()))
    assert moved.sharding.mesh == m2
    np.testing.assert_array_equal(jax.random.key_data(moved), jax.random.key_data(key))
    keys = jax.device_put(jax.random.split(jax.random.key(1), 8), NamedSharding(m8, P("fsdp")))
    moved = move(keys, NamedSharding(m2, P("fsdp")))
    np.testing.assert_array_equal(jax.random.key_data(moved), jax.random.key_data(keys))
    scalar = move(jax.device_put(jnp.float32(2.5), NamedSharding(m8, P())), NamedSharding(m2, P()))
    assert float(scalar) == 2.5 and scalar.sharding.mesh == m2
    host = move(np.ones((4, 2), np.float32), NamedSharding(m2, P("fsdp")))
    assert host.sharding.spec == P("fsdp")


def test_reshard_fsdp8_to_tp2x4_to_4_devices(kind, host_reads):
    fsdp8 = sub_mesh(kind, (8,), ("fsdp",))
    tp2x4 = sub_mesh(kind, (2, 4), ("data", "model"))
    mesh4 = sub_mesh(kind, (2, 2), ("fsdp", "model"), 4)
    model = parallelize(lambda: models.GPT(layers=1, rngs=nnx.Rngs(0)), fsdp8, FSDP(min_size=64))
    expected = helpers.params(models.GPT(layers=1, rngs=nnx.Rngs(0)))
    x = jax.random.randint(jax.random.key(1), (8, 8), 0, 64)
    y0 = np.asarray(models.GPT(layers=1, rngs=nnx.Rngs(0))(x))  # unsharded reference
    assert get_hooks(model.blocks[0].mlp.up).gather is not None
    host_reads.clear()

    assert reshard(model, tp2x4, helpers.tp_plans()["gpt"]) is model
    assert host_reads == []
    up = model.blocks[0].mlp.up
    assert up.kernel[...].sharding == NamedSharding(tp2x4, P(None, "model"))
    assert up.kernel.get_metadata("out_sharding") == (None, "model")
    assert up.kernel.get_metadata("mesh") == tp2x4
    assert get_hooks(up).gather is None  # FSDP hooks gone, TP layout hooks in
    assert model.pos.embedding[...].sharding == NamedSharding(
        tp2x4, P(None, None)
    )  # untouched: replicated
    for path, value in helpers.params(model).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(expected[path]), err_msg=path)
    with jax.set_mesh(tp2x4):
        helpers.assert_close(
            helpers.forward(model, x), y0, helpers.FWD_TOL, "forward after FSDP -> TP"
        )

    host_reads.clear()
    reshard(
        model, mesh4, {"": FSDP("fsdp", min_size=64), "blocks.*.mlp.up": ColumnParallel("model")}
    )
    assert host_reads == []
    assert up.kernel[...].sharding.spec == P("fsdp", "model")
    assert {d.id for d in up.kernel[...].devices()} == {4, 5, 6, 7}
    for path, value in helpers.params(model).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(expected[path]), err_msg=path)
    with jax.set_mesh(mesh4):
        helpers.assert_close(helpers.forward(model, x), y0, helpers.FWD_TOL, "forward on 4 devices")


def test_reshard_unparallelized_model_and_other_state(mesh8):
    model = models.MLP(rngs=nnx.Rngs(0))
    expected = helpers.params(models.MLP(rngs=nnx.Rngs(0)))
    reshard(model, mesh8, {"up": ColumnParallel(), "down": RowParallel()})
    assert model.up.kernel[...].sharding.spec == P(None, "model")
    for path, value in helpers.params(model).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(expected[path]))


def test_reshard_moves_optimizer_state_with_its_params(kind):
    mesh8 = sub_mesh(kind, (8,), ("model",))
    fsdp2 = sub_mesh(kind, (2,), ("fsdp",), 6)
    model = parallelize(models.MLP(rngs=nnx.Rngs(0)), mesh8, helpers.tp_plans()["mlp"])
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(1), (8, 16))
    step = helpers.make_step()
    with jax.set_mesh(mesh8):
        step(model, opt, x)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(opt)))
    reshard(model, fsdp2, FSDP(min_size=16), optimizer=opt)
    kernel = model.up.kernel[...]
    assert kernel.sharding == NamedSharding(fsdp2, P(None, "fsdp"))
    assert opt.opt_state[0].mu["up"]["kernel"][...].sharding == kernel.sharding
    assert opt.opt_state[0].count[...].sharding == NamedSharding(fsdp2, P())
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(opt)))
    jax.tree.map(np.testing.assert_array_equal, after, before)
    with jax.set_mesh(fsdp2):
        step(model, opt, jax.device_put(x, NamedSharding(fsdp2, P("fsdp"))))  # training goes on
    assert int(opt.step[...]) == 2


def test_second_parallelize_refuses_and_reshard_accepts(mesh8):
    model = parallelize(
        models.MLP(rngs=nnx.Rngs(0)), mesh8, {"up": ColumnParallel(), "down": RowParallel()}
    )
    swapped = {"up": RowParallel(), "down": ColumnParallel()}
    with pytest.raises(PlanError, match="nnx_parallel.reshard"):
        parallelize(model, mesh8, swapped)
    reshard(model, mesh8, swapped)
    assert model.up.kernel[...].sharding.spec == P("model", None)
    assert model.down.kernel[...].sharding.spec == P(None, "model")


def test_reshard_failure_leaves_model_untouched(mesh8, fsdp8):
    model = parallelize(models.MLP(rngs=nnx.Rngs(0)), fsdp8, FSDP(min_size=16))
    before = {p: v.sharding for p, v in helpers.params(model).items()}
    cls, meta = type(model.up), model.up.kernel.get_metadata()
    with pytest.raises(PlanError, match="matched no module"):
        reshard(model, mesh8, {"upp": ColumnParallel()})
    mesh3 = sub_mesh(jax.sharding.AxisType.Auto, (3,), ("model",))
    with pytest.raises(PlanError, match="not divisible by mesh axis 'model'"):
        reshard(model, mesh3, {"up": ColumnParallel()})  # 64 columns over 3 devices
    assert {p: v.sharding for p, v in helpers.params(model).items()} == before
    assert type(model.up) is cls and model.up.kernel.get_metadata() == meta


def test_gather_returns_host_numpy(mesh2x4):
    model = parallelize(lambda: models.GPT(rngs=nnx.Rngs(0)), mesh2x4, helpers.tp_plans()["gpt"])
    host = gather(model)
    assert isinstance(host, nnx.State)
    flat = dict(nnx.to_flat_state(host))
    kernel = flat[("blocks", 0, "mlp", "up", "kernel")].get_value()
    assert isinstance(kernel, np.ndarray) and kernel.shape == (32, 128)
    expected = helpers.params(models.GPT(rngs=nnx.Rngs(0)))
    np.testing.assert_array_equal(kernel, np.asarray(expected["blocks.0.mlp.up.kernel"]))
