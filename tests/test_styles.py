"""The contract every style keeps (optax's `_common_test.py` idea).

Each style, on a tiny MLP: it is a frozen, hashable dataclass that satisfies
the `Style` protocol; it resolves on an abstract model without allocating;
`parallelize` gives every parameter exactly the resolved spec; and one
jitted forward equals the unsharded model, on Auto and Explicit axes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import nnx_parallel as npx
from tests import models
from tests.helpers import flat_state as _flat

MESH = ("data", "model")

STYLES = {
    "column": {"up": npx.ColumnParallel("model")},
    "row": {"down": npx.RowParallel("model")},
    "column-row": {"up": npx.ColumnParallel("model"), "down": npx.RowParallel("model")},
    "shard": {"up": npx.Shard(kernel=P("data", "model"))},
    "replicated": npx.Replicated(),
    "fsdp": npx.FSDP("model", min_size=16),
    "zero": npx.ZeRO(stage=1, axis="data", min_size=16),
    "remat": {"": npx.Replicated(), "up": npx.Remat()},
    "sequence": {
        "up": npx.SequenceColumnParallel("model"),
        "down": npx.SequenceRowParallel("model"),
    },
    # The MLP's (8, 4, 16) input split on its length-4 dim; no attention to replace.
    "context": {"": npx.ContextParallel("model")},
}


def _styles(plan):
    entries = plan.values() if isinstance(plan, dict) else [plan]
    return [s for e in entries for s in (e if isinstance(e, tuple) else (e,))]


@pytest.mark.parametrize("name", list(STYLES))
def test_style_is_a_frozen_hashable_protocol_instance(name):
    for style in _styles(STYLES[name]):
        assert isinstance(style, npx.Style)
        assert dataclasses.is_dataclass(style)
        hash(style)
        with pytest.raises(dataclasses.FrozenInstanceError):
            style.subtree = not style.subtree


def _train_step(model, opt, x):
    def loss_fn(m):
        y = m(x)
        return jnp.mean(y**2), y

    (loss, y), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    opt.update(model, grads)
    return y, loss, grads


@pytest.mark.parametrize("kind", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
@pytest.mark.parametrize("name", list(STYLES))
def test_style_resolves_applies_and_keeps_numerics(name, kind):
    """Specs as resolved; forward, gradients and one optimizer step as unsharded
    (a broken Remat or ZeRO backward fails here, not only a broken forward)."""
    mesh = jax.make_mesh((2, 4), MESH, axis_types=(kind, kind))
    plan = STYLES[name]
    abstract = nnx.eval_shape(lambda: models.MLP(rngs=nnx.Rngs(0)))
    resolution = npx.resolve(abstract, mesh, plan)
    ref = models.MLP(rngs=nnx.Rngs(0))
    model = npx.parallelize(models.MLP(rngs=nnx.Rngs(0)), mesh, plan)
    for path, entry in resolution.params.items():
        var = model
        for key in path.split("."):
            var = getattr(var, key)
        assert var[...].sharding.spec == entry.spec, path
    x = jax.random.normal(jax.random.key(1), (8, 4, 16), jnp.float32)
    tx = optax.sgd(0.1, momentum=0.9)
    opt = npx.ShardedOptimizer(model, tx, wrt=nnx.Param)
    ref_opt = nnx.Optimizer(ref, tx, wrt=nnx.Param)
    with jax.set_mesh(mesh):
        out, loss, grads = nnx.jit(_train_step)(model, opt, x)
    ref_out, ref_loss, ref_grads = nnx.jit(_train_step)(ref, ref_opt, x)
    close = dict(atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), **close)
    np.testing.assert_allclose(float(loss), float(ref_loss), **close)
    got, want = _flat(grads), _flat(ref_grads)
    assert set(got) == set(want) == {"up.kernel", "up.bias", "down.kernel", "down.bias"}
    for path in want:
        np.testing.assert_allclose(got[path], want[path], err_msg=path, **close)
    after, ref_after = _flat(nnx.state(model, nnx.Param)), _flat(nnx.state(ref, nnx.Param))
    initial = _flat(nnx.state(models.MLP(rngs=nnx.Rngs(0)), nnx.Param))
    for path in ref_after:
        np.testing.assert_allclose(after[path], ref_after[path], err_msg=path, **close)
        assert not np.allclose(ref_after[path], initial[path])  # the step moved every param


@pytest.mark.parametrize(
    "make",
    [
        lambda: npx.FSDP("fsdp", 16),
        lambda: npx.ColumnParallel("model", "kernel"),
        lambda: npx.RowParallel("model", "kernel"),
        lambda: npx.SequenceParallel("model", -2),
        lambda: npx.SequenceColumnParallel("model", "kernel"),
        lambda: npx.ExpertParallel("expert", 8),
        lambda: npx.ContextParallel("context", "ring"),
        lambda: npx.ZeRO(2, "data"),
    ],
    ids=["FSDP", "Column", "Row", "Sequence", "SequenceColumn", "Expert", "Context", "ZeRO"],
)
def test_options_after_the_first_are_keyword_only(make):
    # FSDP("fsdp", 16) once set min_size silently; now only the first option is positional.
    with pytest.raises(TypeError, match="positional argument"):
        make()


def test_keyword_options_still_work():
    assert npx.FSDP("fsdp", min_size=16).min_size == 16
    assert npx.ZeRO(1, axis="fsdp").axis == "fsdp"
    assert npx.SequenceColumnParallel("model", seq_dim=-3).seq_dim == -3
