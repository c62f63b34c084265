"""Bad inputs and faults from issue 24, section 3: each case fails on the old code.

Cases a and j live in tests/test_conflicts.py, h in tests/test_accumulate.py,
e in tests/test_unpickle.py, f and g in tests/test_checkpoint_faults.py.
"""

import glob
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import nnx_parallel as npx
from nnx_parallel import (
    FSDP,
    CheckpointError,
    ColumnParallel,
    MeshError,
    ParallelError,
    PlanError,
    Replicated,
    RowParallel,
    Shard,
    ZeRO,
)
from tests.helpers import assert_same, check_equivalence, snapshot
from tests.models import MLP

TP = {"up": ColumnParallel("model"), "down": RowParallel("model")}


def _x(n=8):
    return jax.random.normal(jax.random.key(1), (n, 16))


# b: one Param owned by two modules under FSDP -----------------------------------------


def test_fsdp_param_tied_between_two_modules(fsdp8):
    # Before: the second module read its shard, `dot_general` shape error.
    model, ref = MLP(16, 16, 16, rngs=nnx.Rngs(0)), MLP(16, 16, 16, rngs=nnx.Rngs(0))
    model.down.kernel, ref.down.kernel = model.up.kernel, ref.up.kernel
    npx.parallelize(model, fsdp8, FSDP("fsdp", min_size=1))
    assert model.up.kernel[...].sharding.spec == P("fsdp", None)
    x = _x()
    check_equivalence(model, ref, fsdp8, x, x)
    assert model.down.kernel is model.up.kernel  # still tied after the step


# c: FSDP on a 1-device mesh ---------------------------------------------------------------


@pytest.mark.parametrize("explicit", [False, True])
def test_fsdp_on_one_device(explicit):
    # Before: every call raised a shard_map error about replication over 'fsdp'.
    mesh = npx.make_mesh(fsdp=1, explicit=explicit, devices=jax.devices()[:1])
    model, ref = MLP(rngs=nnx.Rngs(0)), MLP(rngs=nnx.Rngs(0))
    npx.parallelize(model, mesh, FSDP("fsdp", min_size=1))
    hooks = npx.core.layouts.get_hooks(model.up)
    assert hooks is None or hooks.gather is None  # nothing to gather over one device
    x = _x()
    check_equivalence(model, ref, mesh, x, x)


def test_fsdp_over_a_size_one_axis_of_a_bigger_mesh():
    mesh = jax.make_mesh((1, 8), ("fsdp", "model"), axis_types=(AxisType.Explicit,) * 2)
    specs = npx.resolve(MLP(rngs=nnx.Rngs(0)), mesh, {"": FSDP("fsdp", min_size=1), **TP}).specs()
    assert specs["up.kernel"] == P(None, "model") and specs["down.bias"] == P(None)
    model, ref = (
        npx.parallelize(MLP(rngs=nnx.Rngs(0)), mesh, FSDP("fsdp", min_size=1)),
        MLP(rngs=nnx.Rngs(0)),
    )
    with jax.set_mesh(mesh):
        y = nnx.jit(lambda m, x: m(x))(model, _x())
    np.testing.assert_allclose(y, ref(_x()), atol=1e-5)


# d: nnx.update with host weights into an FSDP x TP model --------------------------------


def test_update_with_host_weights_into_fsdp_x_tp(mesh2x4):
    # nnx.update replaces each Variable's metadata (out_sharding is gone) and
    # value (on one device): the FSDP gather keeps each param's full spec
    # (Gather.specs) and, on Explicit axes, lays the values out again.
    mesh = mesh2x4
    model, fresh = MLP(rngs=nnx.Rngs(0)), MLP(rngs=nnx.Rngs(1))
    npx.parallelize(model, mesh, npx.plans.combine(TP, FSDP("data", min_size=1)))
    nnx.update(model, nnx.state(fresh))
    with jax.set_mesh(mesh):
        y = nnx.jit(lambda m, x: m(x))(model, _x())
    np.testing.assert_allclose(y, fresh(_x()), atol=1e-5)


# i: reshard with a foreign optimizer --------------------------------------------------


def test_reshard_refuses_an_optax_transform(fsdp8, mesh8):
    model = npx.parallelize(MLP(rngs=nnx.Rngs(0)), fsdp8, FSDP(min_size=1))
    before = snapshot(model)
    with pytest.raises(ParallelError, match=r"got an optax transform, not optimizer state"):
        npx.reshard(model, mesh8, TP, optimizer=optax.adam(1e-3))
    assert_same(before, snapshot(model))


def test_reshard_refuses_the_optimizer_of_another_model(fsdp8, mesh8):
    # Before: it moved the other model's optimizer and left its model behind.
    model = npx.parallelize(MLP(rngs=nnx.Rngs(0)), fsdp8, FSDP(min_size=1))
    other = MLP(rngs=nnx.Rngs(1))
    opt = nnx.Optimizer(other, optax.adam(1e-3), wrt=nnx.Param)
    before, before_opt = snapshot(model), snapshot(opt)
    match = r"'opt_state.0.mu.down.bias' is laid out as SingleDeviceSharding.*another model"
    with pytest.raises(ParallelError, match=match):
        npx.reshard(model, mesh8, TP, optimizer=opt)
    assert_same(before, snapshot(model))
    assert_same(before_opt, snapshot(opt))
    linear = nnx.Optimizer(nnx.Linear(3, 5, rngs=nnx.Rngs(1)), optax.adam(1e-3), wrt=nnx.Param)
    with pytest.raises(ParallelError, match=r"no state leaf of this Optimizer mirrors a param"):
        npx.reshard(model, mesh8, TP, optimizer=linear)


def test_reshard_still_moves_its_own_optimizer(fsdp8, mesh8):
    model = npx.parallelize(MLP(rngs=nnx.Rngs(0)), fsdp8, FSDP(min_size=1))
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    npx.reshard(model, mesh8, TP, optimizer=opt)
    assert opt.opt_state[0].mu["up"]["kernel"][...].sharding.spec == P(None, "model")
    z = npx.parallelize(MLP(rngs=nnx.Rngs(0)), fsdp8, ZeRO(1, axis="fsdp", min_size=1))
    zopt = npx.ShardedOptimizer(z, optax.adam(1e-3), wrt=nnx.Param)
    npx.reshard(z, mesh8, TP, optimizer=zopt)  # optimizer state laid out as ZeRO says


# k: the class-not-instance hint ----------------------------------------------------------


@pytest.mark.parametrize(
    "cls,hint",
    [
        (Replicated, "Replicated()."),
        (ColumnParallel, "ColumnParallel() or ColumnParallel('model')."),
        (Shard, "Shard(kernel=P(None, 'model')) (a PartitionSpec per parameter name)."),
        (ZeRO, "ZeRO() or ZeRO(axis='data')."),
    ],
)
def test_class_not_instance_hint_builds(cls, hint):
    with pytest.raises(PlanError, match=re.escape(f"is a class, not a style: write {hint}")):
        npx.parallelize(MLP(rngs=nnx.Rngs(0)), jax.make_mesh((8,), ("model",)), {"up": cls})
    # What the hint says works (before: Replicated('model') raised TypeError).
    suggestion = hint.split(" (a ")[0].rstrip(".").split(" or ")[-1]
    assert isinstance(eval(suggestion, {**vars(npx), "P": P}), npx.Style)


# l: a Python-float Param -----------------------------------------------------------------


class WithFloat(nnx.Module):
    def __init__(self):
        self.scale = nnx.Param(1.5)
        self.lin = nnx.Linear(8, 8, rngs=nnx.Rngs(0))


def test_python_float_param_in_parallelize(tmp_path):
    fsdp8 = jax.make_mesh((8,), ("fsdp",))
    # Before: a raw AttributeError ('float' object has no attribute 'shape').
    model = WithFloat()
    match = r"'scale' is an nnx.Param holding a float \(1.5\), not an array.*jnp.asarray\(1.5\)"
    with pytest.raises(PlanError, match=match):
        npx.parallelize(model, fsdp8, FSDP(min_size=1))
    assert model.scale.get_value() == 1.5 and type(model) is WithFloat
    with pytest.raises(PlanError, match=r"save: model state 'scale' holds a float.*Nothing was"):
        npx.save(tmp_path / "ckpt", model)
    assert not (tmp_path / "ckpt").exists()


# m: TP on Explicit axes outside jax.set_mesh ---------------------------------------------


def test_tp_on_explicit_axes_outside_set_mesh():
    # Before: "Using PartitionSpec when you are not under a mesh context is not allowed".
    mesh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Explicit,))
    model, ref = npx.parallelize(MLP(rngs=nnx.Rngs(0)), mesh, TP), MLP(rngs=nnx.Rngs(0))
    x = _x()
    np.testing.assert_allclose(model(x), ref(x), atol=1e-5)
    loss = lambda m, x: (m(x) ** 2).mean()  # noqa: E731
    grads = nnx.jit(nnx.grad(loss))(model, x)
    want = nnx.grad(loss)(ref, x)
    np.testing.assert_allclose(grads["up"]["kernel"][...], want["up"]["kernel"][...], atol=1e-5)


# n, o: damaged manifests and wrong restore messages --------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "c"
    npx.save(path, MLP(rngs=nnx.Rngs(0)))
    (manifest,) = glob.glob(str(path / "0" / "nnx_parallel" / "metadata"))
    return str(path), manifest


@pytest.mark.parametrize(
    "edit,problem",
    [
        ("truncate", r"it cannot be read \(JSONDecodeError"),
        ("checksum", r"the entry of model.down.bias lacks \['checksum'\]"),
        ("items", r"its 'items' \(\[\]\) do not list the model"),
    ],
)
def test_damaged_manifest(saved, edit, problem):
    path, manifest = saved
    manifest = pathlib.Path(manifest)
    text = manifest.read_text()
    if edit == "truncate":
        damaged = text[: len(text) // 2]
    elif edit == "checksum":
        data = json.loads(text)
        del data["items"]["model"]["down.bias"]["checksum"]
        damaged = json.dumps(data)
    else:
        damaged = json.dumps({**json.loads(text), "items": []})
    manifest.write_text(damaged)
    try:
        match = rf"step 0 in .* has a damaged manifest .*: {problem}.*Restore another step"
        with pytest.raises(CheckpointError, match=match):
            npx.restore(path, lambda: MLP(rngs=nnx.Rngs(1)), jax.make_mesh((8,), ("m",)), {})
    finally:
        manifest.write_text(text)


def test_restore_messages(saved):
    path, manifest = saved
    mesh = jax.make_mesh((8,), ("m",))
    with npx.CheckpointManager._reader(path) as ckpt:
        with pytest.raises(PlanError, match=r"step must be an int >= 0, got '0'"):
            ckpt.restore(lambda: MLP(rngs=nnx.Rngs(1)), mesh, {}, step="0")
    with pytest.raises(CheckpointError, match=r"it is a file, not a checkpoint directory"):
        npx.restore(manifest, lambda: MLP(rngs=nnx.Rngs(1)), mesh, {})


@pytest.mark.parametrize("budget", ["1GB", None, float("nan"), -1.0, True])
def test_auto_budget_must_be_a_positive_number(budget):
    with pytest.raises(PlanError, match=r"budget must be a positive, finite number of bytes"):
        npx.plans.auto(
            lambda: MLP(rngs=nnx.Rngs(0)), jax.make_mesh((8,), ("m",)), _x(), budget_bytes=budget
        )


# p: estimate inputs ------------------------------------------------------------------------


FSDP8 = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Explicit,))


def test_estimate_input_errors():
    fsdp8 = FSDP8
    model, x = MLP(rngs=nnx.Rngs(0)), jax.ShapeDtypeStruct((8, 16), jnp.float32)
    with pytest.raises(MeshError, match=r"batch_axes=\('fdsp',\) names 'fdsp'.*mean 'fsdp'"):
        npx.estimate(model, fsdp8, FSDP(), x, batch_axes=("fdsp",))
    with pytest.raises(
        PlanError, match=r"a batch argument is a list, not an array.*tuple\(batch\)"
    ):
        npx.estimate(model, fsdp8, FSDP(), [x])
    with pytest.raises(PlanError, match=r"got int: expected an optax transform"):
        npx.estimate(model, fsdp8, FSDP(), x, optimizer=3)


def test_estimate_takes_an_nnx_optimizer_factory():
    fsdp8 = FSDP8
    # Before: AttributeError: 'function' object has no attribute 'init'.
    model, x = MLP(rngs=nnx.Rngs(0)), jax.ShapeDtypeStruct((8, 16), jnp.float32)
    sgd = optax.sgd(0.1)
    est = npx.estimate(
        model, fsdp8, FSDP(), x, optimizer=lambda m: nnx.Optimizer(m, sgd, wrt=nnx.Param)
    )
    assert est.peak_bytes == npx.estimate(model, fsdp8, FSDP(), x, optimizer=sgd).peak_bytes


# q: plans.auto's reasons -------------------------------------------------------------------


def test_auto_skip_reason_names_no_unknown_argument():
    mesh = jax.make_mesh((8,), ("data",))
    with pytest.raises(PlanError, match=r"no candidate plan compiled") as err:
        npx.plans.auto(
            lambda: nnx.Linear(16, 16, rngs=nnx.Rngs(0)), mesh, _x(6), budget_bytes=10**9
        )
    assert "batch_axes=()" not in str(err.value)
    assert "Give plans.auto a batch whose dim 0 is a multiple of 8" in str(err.value)
