"""ZeRO-1/2 and FSDP: numerics over 3 Adam steps, shardings, collectives, bytes."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from nnx_parallel import FSDP, PlanError, ShardedOptimizer, ZeRO, parallelize, zero
from nnx_parallel.views.collectives import bytes_by_kind, collectives
from tests import helpers, models


def loss_fn(model, x):
    return jnp.mean(model(x) ** 2)


def run_steps(model, mesh, x, *, stage, steps=3):
    with jax.set_mesh(mesh):
        opt = ShardedOptimizer(model, optax.adam(1e-2), wrt=nnx.Param)
        grad_fn = zero.value_and_grad(loss_fn) if stage == 2 else nnx.value_and_grad(loss_fn)

        @nnx.jit
        def step(model, opt, x):
            loss, grads = grad_fn(model, x)
            opt.update(model, grads)
            return loss, grads

        compiled = step.lower(model, opt, x).compile()
        losses = []
        for _ in range(steps):
            loss, grads = step(model, opt, x)
            losses.append(float(loss))
    return losses, opt, compiled, grads


def reference_steps(steps=3):
    ref = models.MLP(rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (8, 16))
    opt = nnx.Optimizer(ref, optax.adam(1e-2), wrt=nnx.Param)
    step = nnx.jit(
        lambda m, o, x: (lambda lg: (o.update(m, lg[1]), lg[0])[1])(
            nnx.value_and_grad(loss_fn)(m, x)
        )
    )
    losses = [float(step(ref, opt, x)) for _ in range(steps)]
    return ref, x, losses


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_matches_unsharded_over_three_steps(stage, kind):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(kind,))
    ref, x, ref_losses = reference_steps()
    model = models.MLP(rngs=nnx.Rngs(0))
    parallelize(model, mesh, ZeRO(stage=stage, axis="data", min_size=16))
    xs = jax.device_put(x, jax.NamedSharding(mesh, P("data")))
    losses, opt, compiled, grads = run_steps(model, mesh, xs, stage=stage)
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    for k, v in helpers.params(model).items():
        helpers.assert_close(v, helpers.params(ref)[k], 1e-5, k)
    # Parameters stay replicated (no drift to the optimizer's layout).
    assert model.up.kernel[...].sharding.is_fully_replicated
    assert opt.opt_state[0].mu["up"]["kernel"][...].sharding.spec == P(None, "data")
    ops = collectives(compiled, mesh)
    totals = bytes_by_kind(ops)
    sharded = (16 * 64 + 64 + 64 * 16 + 16) * 4  # min_size=16: all four params
    if stage == 2:
        assert grads["up"]["kernel"][...].sharding.spec == P(None, "data")
        assert totals["reduce-scatter"] == sharded
        # Only the scalar loss is all-reduced; no gradient is.
        assert totals["all-reduce"] == 4
    else:
        assert totals["reduce-scatter"] == 0
    # Updated shards are all-gathered back into replicated parameters.
    assert totals["all-gather"] == sharded


def test_zero_errors(mesh8):
    with pytest.raises(PlanError, match="stage must be 1 or 2"):
        ZeRO(stage=3)
    with pytest.raises(PlanError, match="mesh axis 'data' is not in the mesh"):
        parallelize(models.MLP(rngs=nnx.Rngs(0)), mesh8, ZeRO(axis="data"))
    with pytest.raises(PlanError, match=r"Call parallelize\(model, mesh, ZeRO"):
        zero.value_and_grad(loss_fn)(models.MLP(rngs=nnx.Rngs(0)), jnp.ones((8, 16)))


def test_fsdp_three_steps_and_memory(fsdp8):
    ref, x, ref_losses = reference_steps()
    model = models.MLP(rngs=nnx.Rngs(0))
    parallelize(model, fsdp8, FSDP(min_size=16))
    xs = jax.device_put(x, jax.NamedSharding(fsdp8, P("fsdp")))
    losses, opt, _, grads = run_steps(model, fsdp8, xs, stage=1)
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    mem = zero.memory_per_device(model, opt, grads)
    # min_size=16: every parameter (down.bias has 16 elements) is sharded 8 ways.
    total = (16 * 64 + 64 + 64 * 16 + 16) * 4
    assert mem["params"] == total // 8
    assert mem["grads"] == total // 8
    assert mem["optimizer"] == 2 * total // 8 + 4  # mu, nu + the int32 step count
