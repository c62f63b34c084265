"""Issue 8: parallelize on models written the way public NNX code is."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nnx_parallel as npl
from tests import real_models as rm


def _close(a, b, tol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) <= tol


def test_llm_fsdp_encode_decode_and_cache_kwargs(fsdp8):
    tok = jax.random.randint(jax.random.key(1), (8, 8), 0, 64)
    ref, model = rm.TinyLLM(rngs=nnx.Rngs(0)), rm.TinyLLM(rngs=nnx.Rngs(0))
    npl.parallelize(model, fsdp8, npl.FSDP("fsdp", min_size=64, methods=("__call__", "encode", "decode")))
    assert "fsdp" in tuple(model.layers[0].mlp.up.w[...].sharding.spec)
    with jax.set_mesh(fsdp8):
        out = nnx.jit(lambda m, t: m(t))(model, tok)
    _close(out, nnx.jit(lambda m, t: m(t))(ref, tok))


def test_scanned_stack_fsdp(fsdp8):
    x = jax.random.normal(jax.random.key(2), (8, 4, 32))
    ref, model = rm.ScannedMLP(rngs=nnx.Rngs(0)), rm.ScannedMLP(rngs=nnx.Rngs(0))
    npl.parallelize(model, fsdp8, npl.FSDP("fsdp", min_size=64))
    assert model.layers.up.kernel[...].sharding.spec[0] is None  # layer axis never sharded
    with jax.set_mesh(fsdp8):
        _close(model(x), ref(x))


def test_resnet_batchnorm_fsdp(fsdp8):
    x = jax.random.normal(jax.random.key(2), (8, 8, 8, 3))
    ref, model = rm.ResNet(rngs=nnx.Rngs(0)), rm.ResNet(rngs=nnx.Rngs(0))
    npl.parallelize(model, fsdp8, npl.FSDP("fsdp", min_size=64))
    assert "fsdp" in tuple(model.blocks[0].conv1.kernel[...].sharding.spec)
    with jax.set_mesh(fsdp8):
        _close(model(x), ref(x))
    _close(model.bn.mean[...], ref.bn.mean[...])  # batch stats updated over the global batch


def test_llm_tp_fused_kv_einsum(mesh8):
    tok = jax.random.randint(jax.random.key(1), (8, 8), 0, 64)
    col, row = npl.ColumnParallel("model"), npl.RowParallel("model")
    plan = {"layers.*.attn.q_einsum": col, "layers.*.attn.kv_einsum": col, "layers.*.attn.attn_vec_einsum": row,
            "layers.*.mlp.gate": col, "layers.*.mlp.up": col, "layers.*.mlp.down": row}
    ref, model = rm.TinyLLM(rngs=nnx.Rngs(0)), rm.TinyLLM(rngs=nnx.Rngs(0))
    npl.parallelize(model, mesh8, plan)
    assert model.layers[0].attn.kv_einsum.kernel[...].sharding.spec == jax.P(None, "model", None, None)
    with jax.set_mesh(mesh8):
        _close(model(tok), ref(tok))


def _grads(model, x):
    loss = lambda m: jnp.mean(m(x) ** 2)  # noqa: E731
    return nnx.jit(lambda m: nnx.grad(loss)(m))(model)


def test_scanned_tagged_stack_fsdp_grad_remat(fsdp8):
    """transform_metadata stacks whose biases and norms had no out_sharding
    (nnx.scan used to fail removing 'layers' from them), under jit+grad+remat."""
    x = jax.random.normal(jax.random.key(2), (8, 4, 32))
    make = lambda: rm.ScannedMLP(partition_name="layers", remat=True, rngs=nnx.Rngs(0))  # noqa: E731
    ref, model = make(), make()
    npl.parallelize(model, fsdp8, npl.FSDP("fsdp", min_size=64))
    assert model.layers.norm.scale.get_metadata("out_sharding") == ("layers", "fsdp")
    assert model.layers.up.bias[...].sharding.spec == jax.P(None, "fsdp")  # not the layer axis
    assert model.layers.up.kernel[...].sharding.spec == jax.P(None, None, "fsdp")
    with jax.set_mesh(fsdp8):
        _close(model(x), ref(x))
        _close(_grads(model, x), _grads(ref, x))


def test_scanned_tagged_stack_tp(mesh8):
    x = jax.random.normal(jax.random.key(2), (8, 4, 32))
    ref = rm.ScannedMLP(partition_name="layers", rngs=nnx.Rngs(0))
    model = rm.ScannedMLP(partition_name="layers", rngs=nnx.Rngs(0))
    npl.parallelize(model, mesh8, {"layers.up": npl.ColumnParallel("model"), "layers.down": npl.RowParallel("model")})
    assert model.layers.up.kernel[...].sharding.spec == jax.P(None, None, "model")
    assert model.layers.down.kernel[...].sharding.spec == jax.P(None, "model", None)
    assert model.layers.norm.scale.get_metadata("out_sharding") == ("layers", None)
    with jax.set_mesh(mesh8):
        _close(model(x), ref(x))
