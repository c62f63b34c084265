"""The tensor-parallel auto-plan on conv nets and scanned stacks (issue 24,
item 2): data flow (`plans/_flow.py`), sharded bytes, numerics, collectives.

Models are written in public idioms in `tests/idioms.py`: a ResNet of
Conv + BatchNorm bottlenecks, a VAE (GroupNorm res-blocks, stride-2 and
resize up/down sampling), a UNet (skip concatenations, transposed convs
named `up`) and Flax's scan-over-layers MLP.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nnx_parallel as npx
from nnx_parallel.core.resolve import resolve
from nnx_parallel.plans._flow import MIX, trace_flow
from nnx_parallel.views.collectives import collectives
from tests import helpers, idioms

AUTO, EXPLICIT = jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit
MODELS = {
    "resnet": (idioms.ResNet, (2, 8, 8, 3)),
    "vae": (lambda rngs: idioms.VAE(c=16, rngs=rngs), (2, 8, 8, 3)),
    "unet": (lambda rngs: idioms.UNet(c=8, depth=1, rngs=rngs), (2, 8, 8, 3)),
    "scanned_mlp": (idioms.ScannedMLP, (4, 32)),
}
# Measured with mesh ('model',) of 8 (see test_plan_shards_half_the_bytes).
FRACTIONS = {"resnet": 0.689, "vae": 0.919, "unet": 0.900, "scanned_mlp": 0.914}


def _abstract(ctor):
    return nnx.eval_shape(lambda: ctor(rngs=nnx.Rngs(0)))


def _mesh(kind=AUTO):
    return jax.make_mesh((8,), ("model",), axis_types=(kind,))


def test_flow_sees_skips_residuals_and_stacks():
    """UNet: each DoubleConv is a pair; `up` feeds a concatenation, so it is
    left alone whatever its name. ResNet: conv3 feeds the next block and the
    residual. Scanned MLP: the block's Linear reads and feeds the carry."""
    unet = trace_flow(_abstract(idioms.UNet))
    assert unet.pairs["ups.0.conv.conv1"] == "ups.0.conv.conv2"
    assert unet.feeds["ups.0.up"] == {MIX} and "ups.0.up" not in unet.pairs
    resnet = trace_flow(_abstract(idioms.ResNet))
    assert resnet.pairs == {f"layers.{i}.conv1": f"layers.{i}.conv2" for i in (0, 1)}
    assert resnet.feeds["layers.0.conv3"] == {MIX, "layers.1.conv1"}
    mlp = trace_flow(_abstract(idioms.ScannedMLP))
    assert mlp.chains == ["blocks.linear"] and mlp.stacked == {"blocks.linear"}


def test_flow_error_leaves_convs_replicated_with_the_reason():
    """An example that does not fit the model: no flow, no guess by name."""
    model = _abstract(idioms.UNet)
    bad = jax.ShapeDtypeStruct((1, 8, 8, 5), jnp.float32)  # 5 channels, the model takes 3
    plan, report = npx.plans.tensor_parallel(model, example=bad)
    assert plan == {}
    assert "no data flow (no input fits the model" in report.unclassified["ups.0.up"]


@pytest.mark.parametrize("name", list(MODELS))
def test_plan_shards_half_the_bytes(name):
    """>= 50% of parameter bytes sharded (resolve only: no devices used);
    layers without a partner are reported with the reason."""
    mesh = _mesh()
    model = _abstract(MODELS[name][0])
    plan, report = npx.plans.tensor_parallel(model, "model", mesh=mesh)
    entries = resolve(model, mesh, plan).params.values()
    total = sum(np.prod(e.shape) for e in entries)
    sharded = sum(np.prod(e.shape) for e in entries if "model" in jax.tree.leaves(tuple(e.spec)))
    print(f"{name}: {sharded / total:.3f} of parameter bytes sharded")
    assert sharded / total >= 0.5
    assert sharded / total == pytest.approx(FRACTIONS[name], abs=2e-3)
    for path, why in report.unclassified.items():
        assert "left replicated" in why or "plan entry" in why, (path, why)
    if name == "unet":
        assert "mixes features" in report.unclassified["ups.0.up"]


def _loss(model, x):
    y = model(x)
    return jnp.mean(y**2), y


# Module level, so the unsharded twin compiles once per model for both axis types.
_VALUE_AND_GRAD = nnx.jit(nnx.value_and_grad(_loss, has_aux=True))
_FORWARD = nnx.jit(lambda m, x: m(x))


def _forward_and_grads(model, x):
    """One compile: the output and the parameter gradients."""
    (_, y), grads = _VALUE_AND_GRAD(model, x)
    return y, helpers.params(grads)


@pytest.mark.parametrize("kind", [AUTO, EXPLICIT], ids=["auto", "explicit"])
@pytest.mark.parametrize("name", list(MODELS))
def test_plan_matches_unsharded_one_all_reduce_per_pair(name, kind):
    """Forward and gradients within 1e-5 of the unsharded model; the compiled
    forward holds at most one all-reduce per row layer (one per pair; a
    scanned chain's all-reduce sits once in the loop body), each the size of
    that layer's output. (Explicit axes add an all-gather before each
    BatchNorm/GroupNorm: see `layers.needs_whole_features`.)"""
    mesh = _mesh(kind)
    ctor, shape = MODELS[name]
    model, ref = ctor(rngs=nnx.Rngs(0)), ctor(rngs=nnx.Rngs(0))
    plan, report = npx.plans.tensor_parallel(model, "model", mesh=mesh)
    rows = [p for p, role in report.roles.items() if role.startswith("row")]
    npx.parallelize(model, mesh, plan)
    x = jax.random.normal(jax.random.key(0), shape)
    with jax.set_mesh(mesh):
        compiled = _FORWARD.lower(model, x).compile()
        y, grads = _forward_and_grads(model, x)
    y_ref, ref_grads = _forward_and_grads(ref, x)
    helpers.assert_close(y, y_ref, helpers.FWD_TOL, "forward")
    for key, g in ref_grads.items():
        helpers.assert_close(grads[key], g, helpers.GRAD_TOL, f"grad of {key}")
    reduces = [c for c in collectives(compiled, mesh) if c.kind == "all-reduce"]
    assert 1 <= len(reduces) <= len(rows), (rows, reduces)


class _Chain(nnx.Module):
    """conv -> relu -> up -> relu -> down: both (conv, up) and (up, down)
    could pair by data flow; the names break the tie."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(8, 16, (3, 3), rngs=rngs)
        self.up = nnx.Conv(16, 32, (1, 1), rngs=rngs)
        self.down = nnx.Conv(32, 8, (1, 1), rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.relu(self.up(nnx.relu(self.conv(x)))))


def test_names_break_ties_in_a_chain():
    model = _abstract(_Chain)
    assert trace_flow(model).pairs == {"conv": "up"}  # no names: call order
    plan, report = npx.plans.tensor_parallel(model)
    assert {p: type(s).__name__ for p, s in plan.items()} == {
        "up": "ColumnParallel",
        "down": "RowParallel",
    }
    assert "its partner 'up' is already paired" in report.unclassified["conv"]
