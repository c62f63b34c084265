"""accumulate's aux reductions (issue 24 h): values equal the full batch's, on every path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from nnx_parallel import FSDP, ParallelError, Replicated, accumulate, parallelize
from tests import models

K = 4
NAMED = {"top": "max", "low": "min", "neg": "max", "all_small": "min", "per_ex": "concat"}


def aux_loss(model, x):
    y = model(x)
    per_ex = jnp.mean(y**2, axis=-1)
    aux = {
        "mean": jnp.mean(y),
        "count": jnp.sum(y > 0),
        "top": jnp.max(y),
        "low": jnp.min(y),
        "neg": jnp.any(y < -0.5),
        "all_small": jnp.all(jnp.abs(y) < 0.9),
        "per_ex": per_ex,
    }
    return jnp.mean(per_ex), aux


def _x():
    return jax.random.normal(jax.random.key(3), (64, 16))


def _check(got, want):
    (loss, aux), grads = got
    (ref_loss, ref_aux), ref_grads = want
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    assert aux.keys() == ref_aux.keys()
    for name in ref_aux:
        a, b = np.asarray(aux[name]), np.asarray(ref_aux[name])
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=name)
    g, rg = nnx.to_flat_state(grads), nnx.to_flat_state(ref_grads)
    for (_, v), (_, w) in zip(g, rg):
        np.testing.assert_allclose(v.get_value(), w.get_value(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("where", ["one device", "data parallel", "fsdp"])
def test_aux_reductions_equal_the_full_batch(where):
    # Before: a max was averaged, a bool came back int32, a per-example vector as (16,).
    model = models.MLP(rngs=nnx.Rngs(0))
    x = _x()
    want = nnx.jit(nnx.value_and_grad(aux_loss, has_aux=True))(models.MLP(rngs=nnx.Rngs(0)), x)
    mesh = None
    if where != "one device":
        axis = "data" if where == "data parallel" else "fsdp"
        mesh = jax.make_mesh((8,), (axis,), axis_types=(AxisType.Explicit,))
        plan = Replicated() if where == "data parallel" else FSDP("fsdp", min_size=1)
        parallelize(model, mesh, plan)
        x = jax.device_put(x, NamedSharding(mesh, P(axis)))
    grad_fn = accumulate(
        nnx.value_and_grad(aux_loss, has_aux=True), microbatches=K, aux_reduce=NAMED
    )
    if mesh is None:
        got = nnx.jit(grad_fn)(model, x)
    else:
        with jax.set_mesh(mesh):
            got = nnx.jit(grad_fn)(model, x)
    _check(got, want)


def test_grad_with_aux_and_one_name_for_every_leaf():
    def loss(model, x):
        y = model(x)
        return jnp.mean(y**2), (jnp.max(y), jnp.max(jnp.abs(y)))

    x = _x()
    grads, aux = nnx.jit(
        accumulate(nnx.grad(loss, has_aux=True), microbatches=K, aux_reduce="max")
    )(models.MLP(rngs=nnx.Rngs(0)), x)
    y = models.MLP(rngs=nnx.Rngs(0))(x)
    np.testing.assert_allclose(aux, (jnp.max(y), jnp.max(jnp.abs(y))), rtol=1e-6)


@pytest.mark.parametrize(
    "aux_reduce,match",
    [
        ({k: v for k, v in NAMED.items() if k != "neg"}, r"aux\['neg'\] is a bool.*'neg': 'max'"),
        (
            {k: v for k, v in NAMED.items() if k != "per_ex"},
            r"aux\['per_ex'\] has shape \(16,\).*'concat'",
        ),
        (
            {**NAMED, "top": "maximum"},
            r"aux_reduce for aux\['top'\] is 'maximum'.*Did you mean 'max'",
        ),
        ({**NAMED, "tpo": "max"}, r"aux_reduce names 'tpo', which the aux does not have"),
    ],
)
def test_aux_errors_name_the_reduction(aux_reduce, match):
    fn = accumulate(
        nnx.value_and_grad(aux_loss, has_aux=True), microbatches=K, aux_reduce=aux_reduce
    )
    with pytest.raises(ParallelError, match=match):
        jax.eval_shape(lambda x: fn(models.MLP(rngs=nnx.Rngs(0)), x), _x())


def test_aux_reduce_without_aux():
    fn = accumulate(
        nnx.value_and_grad(lambda m, x: jnp.mean(m(x))), microbatches=K, aux_reduce="max"
    )
    with pytest.raises(ParallelError, match=r"grad_fn returns no aux"):
        jax.eval_shape(lambda x: fn(models.MLP(rngs=nnx.Rngs(0)), x), _x())
