"""plans.fsdp and plans.combine: ready-made FSDP and 2D/3D (FSDP x TP) plans."""

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from nnx_parallel import (
    FSDP,
    ColumnParallel,
    Replicated,
    parallelize,
    plans,
    resolve,
)
from nnx_parallel.views.collectives import collectives
from tests import models
from tests.transformers import _loss, _parallel_loss


def _gpt(layers=1):
    return models.GPT(layers=layers, rngs=nnx.Rngs(0))


def _grads_match(model, ref, mesh, batch_axes, loss=_loss):
    tokens = jax.random.randint(jax.random.key(1), (8, 8), 0, 64)
    sharded = jax.device_put(tokens, NamedSharding(mesh, P(batch_axes)))
    with jax.set_mesh(mesh):
        step = nnx.jit(nnx.value_and_grad(loss))
        loss, grads = step(model, sharded)
        compiled = step.lower(model, sharded).compile()
    loss_ref, grads_ref = nnx.value_and_grad(_loss)(ref, tokens)
    assert abs(float(loss) - float(loss_ref)) <= 1e-5
    flat = lambda g: {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(g)}  # noqa: E731
    g, g_ref = flat(grads), flat(grads_ref)
    assert g.keys() == g_ref.keys()
    for key in g:
        assert float(np.max(np.abs(g[key] - g_ref[key]))) <= 1e-5, key
    return collectives(compiled, mesh)


def test_fsdp_plan_shards_every_large_parameter(fsdp8):
    plan = plans.fsdp(min_size=256)
    assert plan == {"": FSDP("fsdp", min_size=256)}
    model, ref = _gpt(), _gpt()
    parallelize(model, fsdp8, plan)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        sharded = "fsdp" in tuple(value.sharding.spec)
        assert sharded == (value.size >= 256), (path, value.shape, value.sharding.spec)
    ops = _grads_match(model, ref, fsdp8, "fsdp")
    assert any(c.kind == "reduce-scatter" for c in ops)


def test_combine_puts_fsdp_around_tensor_parallel():
    tp = {"blocks.*.mlp.up": ColumnParallel("model"), "pos": Replicated()}
    combined = plans.combine(tp, FSDP("fsdp", min_size=64))
    assert combined == {
        "": FSDP("fsdp", min_size=64),
        "blocks.*.mlp.up": ColumnParallel("model"),
        "pos": FSDP("fsdp", min_size=64),
    }
    assert tp == {"blocks.*.mlp.up": ColumnParallel("model"), "pos": Replicated()}  # not modified
    assert plans.combine({})[""] == FSDP("fsdp")


def test_combine_2d_matches_unsharded(kind):
    """TP over 'model' (4) x FSDP over 'fsdp' (2): every TP weight also sharded
    on 'fsdp'; gradients equal the unsharded model's; FSDP reduce-scatters."""
    mesh = jax.make_mesh((2, 4), ("fsdp", "model"), axis_types=(kind,) * 2)
    model, ref = _gpt(), _gpt()
    tp, report = plans.tensor_parallel(model)
    parallelize(model, mesh, plans.combine(tp, FSDP("fsdp", min_size=64)))
    assert model.blocks[0].mlp.up.kernel[...].sharding.spec == P("fsdp", "model")
    assert model.blocks[0].mlp.down.kernel[...].sharding.spec == P("model", "fsdp")
    assert model.embed.embedding[...].sharding.spec == P("model", "fsdp")
    ops = _grads_match(model, ref, mesh, "fsdp", _parallel_loss(mesh))
    assert any(c.kind == "reduce-scatter" and c.axes == ("fsdp",) for c in ops)


def test_combine_3d_resolves_on_data_fsdp_model():
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "model"), axis_types=(AxisType.Auto,) * 3)
    abstract = nnx.eval_shape(lambda: _gpt(layers=2))
    tp, _ = plans.tensor_parallel(abstract)
    combined = plans.combine(tp, FSDP("fsdp", min_size=64))
    specs = resolve(abstract, mesh, combined).specs()
    assert specs["blocks.0.attn.q.kernel"] == P("fsdp", "model")
    assert specs["blocks.0.attn.o.kernel"] == P("model", "fsdp")
    assert specs["pos.embedding"] == P(None, "fsdp")  # position embedding: FSDP only
    assert all("data" not in str(s) for s in specs.values())  # 'data' only shards the batch
    assert combined[""].batch_axes_for(mesh) == ("data", "fsdp")


def test_combine_with_sequence_parallel_matches_unsharded(kind):
    """SP x FSDP: row layers reduce-scatter onto the sequence over 'model'
    (a real reduce-scatter, from the fused call), FSDP over 'fsdp'."""
    mesh = jax.make_mesh((2, 4), ("fsdp", "model"), axis_types=(kind,) * 2)
    model, ref = _gpt(), _gpt()
    tp, _ = plans.tensor_parallel(model, sequence_parallel=True)
    parallelize(model, mesh, plans.combine(tp, FSDP("fsdp", min_size=64)))
    ops = _grads_match(model, ref, mesh, "fsdp", _parallel_loss(mesh))
    assert any(c.kind == "reduce-scatter" and c.axes == ("model",) for c in ops)
    assert any(c.kind == "reduce-scatter" and c.axes == ("fsdp",) for c in ops)
