"""Issue 8: parallelize on models written the way public NNX code is.

Every model comes from `tests/real_models.py` and is used unmodified. Each
test checks that params are sharded and that the forward (and where it says
so, the gradients or the caches) equals the unsharded twin's in f32.
References run outside the mesh context, as a user's single-device code would.
"""

import inspect

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import nnx_parallel as npl
from nnx_parallel.core.layouts import get_hooks
from nnx_parallel.views.collectives import collectives
from tests import real_models as rm
from tests.helpers import assert_trees_close, guard_warning

LLM_METHODS = ("__call__", "encode", "decode")
COL, ROW = npl.ColumnParallel("model"), npl.RowParallel("model")



def _spec(var):
    return var[...].sharding.spec


def _grads(model, f):
    return nnx.jit(lambda m: nnx.grad(lambda m: jnp.mean(f(m) ** 2))(m))(model)


def _batch(x, mesh, axis="fsdp"):
    return jax.device_put(x, jax.NamedSharding(mesh, jax.P(axis)))


def _batch_tree(tree, mesh, axis="fsdp"):
    """Caches laid out like the batch they serve: on Explicit axes this keeps
    the typed path (a replicated cache cannot take a batch-sharded update
    there; the guarded root would trace the call again in `auto_axes`)."""
    return jax.tree.map(lambda x: _batch(x, mesh, axis) if x.ndim else x, tree)


def _tokens(batch=8, seq=8, seed=1):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, 64)


# LLM (Gemma style) ----------------------------------------------------------------


def test_llm_fsdp_gathers_each_param_once(fsdp8):
    """encode/decode hooked; the compiled forward all-gathers module by module:
    one gather per sharded param and call, each no bigger than that param
    (the tied embedding is read by encode and by decode: gathered by each)."""
    tok = _tokens()
    ref, model = rm.TinyLLM(layers=1, rngs=nnx.Rngs(0)), rm.TinyLLM(layers=1, rngs=nnx.Rngs(0))
    npl.parallelize(model, fsdp8, npl.FSDP("fsdp", min_size=64, methods=LLM_METHODS))
    sharded = [v for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if "fsdp" in _spec(v)]
    assert len(sharded) == 7 and "fsdp" in _spec(model.embedder.input_embedding)
    # Hooked methods keep the original signatures.
    assert inspect.signature(type(model.embedder).decode) == inspect.signature(rm.Embedder.decode)
    assert inspect.signature(type(model.layers[0].attn.q_einsum).__call__) == inspect.signature(
        nnx.Einsum.__call__
    )
    with jax.set_mesh(fsdp8):
        forward = nnx.jit(lambda m, t: m(t))
        compiled = forward.lower(model, _batch(tok, fsdp8)).compile()
        out = forward(model, _batch(tok, fsdp8))
    assert_trees_close(out, ref(tok))
    gathers = [c for c in collectives(compiled, fsdp8) if c.kind == "all-gather"]
    assert {c.axes for c in gathers} == {("fsdp",)}
    per_call = [v[...].nbytes for v in sharded] + [model.embedder.input_embedding[...].nbytes]
    assert sorted(c.size for c in gathers) == sorted(per_call)
    assert not [c for c in collectives(compiled, fsdp8) if c.kind == "all-reduce"]


def test_llm_fsdp_cache_segment_ids_dropout_kwargs(fsdp8):
    """cache=, segment_ids=, deterministic=, rngs= pass through the hooks; a
    prefill then a decode step give the reference logits and caches."""
    tok = _tokens()
    seg = jnp.broadcast_to((jnp.arange(8) >= 4).astype(jnp.int32), (8, 8))
    ref, model = rm.TinyLLM(layers=1, rngs=nnx.Rngs(0)), rm.TinyLLM(layers=1, rngs=nnx.Rngs(0))
    npl.parallelize(model, fsdp8, npl.FSDP("fsdp", min_size=64, methods=LLM_METHODS))

    def packed(m, t, seg, rngs):
        return m(t, segment_ids=seg, deterministic=False, rngs=rngs)

    def prefill(m, t, cache):
        return m(t, cache=cache)

    def decode(m, t, pos, cache):
        return m(t, pos, cache=cache)

    expected_packed = packed(ref, tok, seg, nnx.Rngs(dropout=3))
    expected = prefill(ref, tok, ref.init_cache(8, 12))
    expected_step = decode(ref, tok[:, :1], jnp.full((8, 1), 8), expected[1])
    with jax.set_mesh(fsdp8):
        out_packed = nnx.jit(packed)(model, _batch(tok, fsdp8), seg, nnx.Rngs(dropout=3))
        logits, cache = nnx.jit(prefill)(
            model, _batch(tok, fsdp8), _batch_tree(model.init_cache(8, 12), fsdp8)
        )
        step = nnx.jit(decode)(model, _batch(tok[:, :1], fsdp8), jnp.full((8, 1), 8), cache)
    assert_trees_close(out_packed, expected_packed)
    assert_trees_close((logits, cache), expected)
    assert_trees_close(step, expected_step)
    assert int(step[1][0]["end"]) == 9


def test_llm_fsdp_batch_not_divisible(fsdp8):
    """Batch 2 (sequence 7) on an 8-way axis: a FallbackWarning names the
    module and the cost, and the GSPMD gather gives the right answer."""
    tok = _tokens(batch=2, seq=7)
    ref, model = rm.TinyLLM(layers=1, rngs=nnx.Rngs(0)), rm.TinyLLM(layers=1, rngs=nnx.Rngs(0))
    npl.parallelize(model, fsdp8, npl.FSDP("fsdp", min_size=64, methods=LLM_METHODS))
    assert "fsdp" in _spec(model.layers[0].mlp.up.w)
    fallback = r"input \(shape \(2, 7.*\)\) does not split over the batch axes"
    with jax.set_mesh(fsdp8), pytest.warns(npl.FallbackWarning, match=fallback) as record:
        out = nnx.jit(lambda m, t: m(t))(model, tok)
    assert_trees_close(out, ref(tok))
    assert any(
        "FSDP on Dense" in str(w.message) and "full all-reduce" in str(w.message) for w in record
    )


def test_llm_fsdp_grad_through_remat(fsdp8):
    """nnx.grad of the parallelized model's call wrapped in nnx.remat."""
    tok = _tokens()
    ref, model = rm.TinyLLM(layers=1, rngs=nnx.Rngs(0)), rm.TinyLLM(layers=1, rngs=nnx.Rngs(0))
    npl.parallelize(model, fsdp8, npl.FSDP("fsdp", min_size=64, methods=LLM_METHODS))
    call = nnx.remat(lambda m, t: m(t))
    with jax.set_mesh(fsdp8):
        grads = _grads(model, lambda m: call(m, _batch(tok, fsdp8)))
    assert_trees_close(grads, _grads(ref, lambda m: call(m, tok)))
    assert "fsdp" in _spec(grads["layers"][0]["attn"]["kv_einsum"]["kernel"])


def test_llm_tp_fused_kv_einsum(mesh8):
    """Heads-first einsums (q NDH, fused kv CNDH, out NHD) and `w` weights;
    a batch (3) and a sequence (7) no mesh axis divides; nnx.grad through
    nnx.remat around the whole call."""
    tok = _tokens(batch=3, seq=7)
    plan = {
        "layers.*.attn.q_einsum": COL,
        "layers.*.attn.kv_einsum": COL,
        "layers.*.attn.attn_vec_einsum": ROW,
        "layers.*.mlp.gate": COL,
        "layers.*.mlp.up": COL,
        "layers.*.mlp.down": ROW,
    }
    ref, model = rm.TinyLLM(layers=1, rngs=nnx.Rngs(0)), rm.TinyLLM(layers=1, rngs=nnx.Rngs(0))
    npl.parallelize(model, mesh8, plan)
    assert _spec(model.layers[0].attn.kv_einsum.kernel) == jax.P(None, "model", None, None)
    assert _spec(model.layers[0].attn.attn_vec_einsum.kernel) == jax.P("model", None, None)
    assert _spec(model.layers[0].mlp.down.w) == jax.P("model", None)
    call = nnx.remat(lambda m, t: m(t))  # the whole call rematerialized

    @nnx.jit
    def forward_and_grads(m):
        def loss(m):
            out = call(m, tok)
            return jnp.mean(out**2), out

        return nnx.grad(loss, has_aux=True)(m)

    with jax.set_mesh(mesh8):
        grads, out = forward_and_grads(model)
    ref_grads, ref_out = forward_and_grads(ref)
    assert_trees_close(out, ref_out)
    assert_trees_close(grads, ref_grads)
    assert _spec(grads["layers"][0]["attn"]["kv_einsum"]["kernel"])[:2] == (None, "model")
    assert_trees_close(
        model.layers[0].attn.freqs, ref.layers[0].attn.freqs
    )  # plain array untouched


def test_tied_embedding_vocab_parallel(mesh8):
    """nnx.Embed sharded on the vocab: the lookup (an out_sharding under
    Explicit axes) and `attend` for the tied LM head."""
    tok = _tokens()
    ref = rm.TinyLLM(tied_embed=True, layers=1, rngs=nnx.Rngs(0))
    model = rm.TinyLLM(tied_embed=True, layers=1, rngs=nnx.Rngs(0))
    npl.parallelize(model, mesh8, {"embed": npl.ColumnParallel("model", dim=0)})
    assert _spec(model.embed.embedding) == jax.P("model", None)
    with jax.set_mesh(mesh8):
        out = model(tok)
    assert_trees_close(out, ref(tok))


def test_tied_embedding_fsdp_and_norm_called_twice(fsdp8):
    """FSDP gathers the table in both __call__ and attend, and the final norm
    (called twice per step) twice."""
    tok = _tokens()
    ref = rm.TinyLLM(tied_embed=True, layers=1, rngs=nnx.Rngs(0))
    model = rm.TinyLLM(tied_embed=True, layers=1, rngs=nnx.Rngs(0))
    npl.parallelize(model, fsdp8, npl.FSDP("fsdp", min_size=16))
    assert _spec(model.embed.embedding) == jax.P("fsdp", None)
    assert _spec(model.final_norm.scale) == jax.P("fsdp")
    with jax.set_mesh(fsdp8):
        out = nnx.jit(lambda m, t: m(t))(model, _batch(tok, fsdp8))
    assert_trees_close(out, ref(tok))


# ViT -------------------------------------------------------------------------------


def test_vit_fsdp_with_rngs_state(fsdp8):
    """Patch conv, cls token, MultiHeadAttention, an active Dropout: the root
    holds RNG state, so its own params take the GSPMD path, and says so.

    The images come in batch-sharded. On Explicit axes the concatenation of
    the broadcast (so replicated) cls token with the batch-sharded patches
    is refused, with or without nnx_parallel: the guarded root traces the
    call again inside `auto_axes` (`runtime/guard.py`)."""
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
    ref, model = rm.ViT(layers=1, rngs=nnx.Rngs(0)), rm.ViT(layers=1, rngs=nnx.Rngs(0))
    npl.parallelize(model, fsdp8, npl.FSDP("fsdp", min_size=64))
    assert _spec(model.patch_embed.kernel) == jax.P(None, None, None, "fsdp")
    assert "fsdp" in _spec(model.blocks[0].attn.query.kernel)
    explicit = fsdp8.axis_types[0] == jax.sharding.AxisType.Explicit
    with (
        jax.set_mesh(fsdp8),
        pytest.warns(npl.FallbackWarning, match="ViT: it holds or is passed state"),
        guard_warning(explicit),
    ):
        out = nnx.jit(lambda m, x: m(x))(model, _batch(x, fsdp8))
    assert_trees_close(out, ref(x))
    assert int(model.dropout.rngs.count[...]) == int(ref.dropout.rngs.count[...]) == 1


def test_vit_tp_attention_mlp_and_conv(mesh8):
    """TP on MultiHeadAttention's LinearGeneral q/k/v/out, the MLP, the head
    and the patch conv (output gathered, so the cls-token concat sees whole
    features: the conv gets out_sharding= and a reshard after its bias)."""
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
    plan = {
        "blocks.*.attn.query": COL,
        "blocks.*.attn.key": COL,
        "blocks.*.attn.value": COL,
        "blocks.*.attn.out": ROW,
        "blocks.*.fc1": COL,
        "blocks.*.fc2": ROW,
        "head": COL,
        "patch_embed": npl.ColumnParallel("model", output_spec=(None,)),
    }
    ref, model = (
        rm.ViT(heads=8, layers=1, rngs=nnx.Rngs(0)),
        rm.ViT(heads=8, layers=1, rngs=nnx.Rngs(0)),
    )
    npl.parallelize(model, mesh8, plan)
    assert _spec(model.blocks[0].attn.query.kernel) == jax.P(None, "model", None)
    assert _spec(model.blocks[0].attn.out.kernel) == jax.P("model", None, None)
    assert _spec(model.patch_embed.kernel) == jax.P(None, None, None, "model")
    with jax.set_mesh(mesh8):
        out = nnx.jit(lambda m, x: m(x))(model, x)
        # A caller's own out_sharding= wins over the plan's layout for that call.
        feats = jax.random.normal(jax.random.key(1), (8, 32))
        head = model.head(feats, out_sharding=jax.P(None, None))
    assert_trees_close(out, ref(x))
    assert_trees_close(head, ref.head(feats))
    assert head.sharding.spec == jax.P(None, None)


# ResNet ------------------------------------------------------------------------------


def test_resnet_batchnorm_fsdp(fsdp8):
    """Convs under FSDP; BatchNorm's BatchStat updated over the global batch."""
    x = jax.random.normal(jax.random.key(2), (8, 8, 8, 3))
    ref, model = rm.ResNet(blocks=1, rngs=nnx.Rngs(0)), rm.ResNet(blocks=1, rngs=nnx.Rngs(0))
    npl.parallelize(model, fsdp8, npl.FSDP("fsdp", min_size=64))
    assert "fsdp" in _spec(model.blocks[0].conv1.kernel)
    with jax.set_mesh(fsdp8):
        out = nnx.jit(lambda m, x: m(x))(model, x)
    assert_trees_close(out, ref(x))
    assert_trees_close(nnx.state(model, nnx.BatchStat), nnx.state(ref, nnx.BatchStat))


def test_resnet_tp_batchnorm_after_column_conv(mesh8):
    """Channel-sharded convs feed BatchNorm: statistics and outputs equal unsharded (Auto and Explicit)."""
    x = jax.random.normal(jax.random.key(2), (8, 8, 8, 3))
    ref, model = rm.ResNet(blocks=1, rngs=nnx.Rngs(0)), rm.ResNet(blocks=1, rngs=nnx.Rngs(0))
    npl.parallelize(model, mesh8, {"stem": COL, "blocks.*.conv1": COL, "blocks.*.conv2": ROW})
    assert _spec(model.stem.kernel) == jax.P(None, None, None, "model")
    assert _spec(model.blocks[0].conv2.kernel) == jax.P(None, None, "model", None)
    explicit = mesh8.axis_types[0] == jax.sharding.AxisType.Explicit
    # Explicit axes: BatchNorm takes its features whole (its BatchStats are replicated).
    assert (get_hooks(model.bn) is not None) == explicit
    with jax.set_mesh(mesh8):
        out = nnx.jit(lambda m, x: m(x))(model, x)
    assert_trees_close(out, ref(x))
    assert_trees_close(nnx.state(model, nnx.BatchStat), nnx.state(ref, nnx.BatchStat))


# Scanned layer stacks ----------------------------------------------------------------------


def test_scanned_stack_fsdp(fsdp8):
    x = jax.random.normal(jax.random.key(2), (8, 4, 32))
    ref, model = rm.ScannedMLP(rngs=nnx.Rngs(0)), rm.ScannedMLP(rngs=nnx.Rngs(0))
    npl.parallelize(model, fsdp8, npl.FSDP("fsdp", min_size=64, scan_axes=1))
    assert _spec(model.layers.up.kernel) == jax.P(None, None, "fsdp")  # layer axis never sharded
    assert _spec(model.layers.norm.scale) == jax.P(None, "fsdp")
    with jax.set_mesh(fsdp8):
        out = nnx.jit(lambda m, x: m(x))(model, x)
    assert_trees_close(out, ref(x))


def test_scanned_tagged_stack_fsdp_grad_remat(fsdp8):
    """transform_metadata stacks whose biases and norms had no out_sharding
    (nnx.scan used to fail removing 'layers' from them), under jit+grad+remat;
    the compiled forward gathers one layer at a time."""
    x = jax.random.normal(jax.random.key(2), (8, 4, 32))
    make = lambda: rm.ScannedMLP(partition_name="layers", remat=True, rngs=nnx.Rngs(0))  # noqa: E731
    ref, model = make(), make()
    npl.parallelize(model, fsdp8, npl.FSDP("fsdp", min_size=64))
    assert model.layers.norm.scale.get_metadata("out_sharding") == ("layers", "fsdp")
    assert _spec(model.layers.up.bias) == jax.P(None, "fsdp")  # not the layer axis
    assert _spec(model.layers.up.kernel) == jax.P(None, None, "fsdp")
    with jax.set_mesh(fsdp8):
        forward = nnx.jit(lambda m, x: m(x))
        compiled = forward.lower(model, _batch(x, fsdp8)).compile()
        out = forward(model, _batch(x, fsdp8))
        grads = _grads(model, lambda m: m(_batch(x, fsdp8)))
    assert_trees_close(out, ref(x))
    assert_trees_close(grads, _grads(ref, lambda m: m(x)))
    # Inside the scan each step gathers one layer's slice of its matrices, at
    # once (the stacked layer is one FSDP unit); vectors travel by all-reduce.
    ops = collectives(compiled, fsdp8)
    gathers = [c.size for c in ops if c.kind == "all-gather"]
    layer = [v[...] for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert gathers == [sum(v.nbytes // 8 for v in layer if v.ndim >= 3)]
    reduced = sum(c.size for c in ops if c.kind == "all-reduce")
    assert reduced == sum(v.nbytes // 8 for v in layer if v.ndim == 2 and v.shape[1] % 8 == 0)


class EmbedThenStack(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(64, 32, rngs=rngs)
        self.stack = rm.ScannedMLP(partition_name="layers", rngs=rngs)


def test_layer_stacks_found_by_name_and_shape(fsdp8):
    """Pure resolution: untagged params inside the tagged stack get its name;
    params outside it (the embedding) do not."""
    abstract = nnx.eval_shape(lambda: EmbedThenStack(rngs=nnx.Rngs(0)))
    res = npl.resolve(abstract, fsdp8, npl.FSDP("fsdp", min_size=64))
    meta = {path: dict(e.metadata) for path, e in res.params.items()}
    assert meta["stack.layers.norm.scale"]["out_sharding"] == ("layers", "fsdp")
    assert "out_sharding" not in meta["embed.embedding"]
    assert res.specs()["embed.embedding"] == jax.P("fsdp", None)
    # The kernels' own 'model' is reported; the stack name is no unknown axis.
    assert len(res.notes) == 2 and all(
        "(axes ['model'] are not in the mesh)" in n for n in res.notes
    )


def test_scanned_tagged_stack_tp_grad(mesh8):
    x = jax.random.normal(jax.random.key(2), (8, 4, 32))
    make = lambda: rm.ScannedMLP(partition_name="layers", remat=True, rngs=nnx.Rngs(0))  # noqa: E731
    ref, model = make(), make()
    npl.parallelize(model, mesh8, {"layers.up": COL, "layers.down": ROW})
    assert _spec(model.layers.up.kernel) == jax.P(None, None, "model")
    assert _spec(model.layers.down.kernel) == jax.P(None, "model", None)
    assert model.layers.norm.scale.get_metadata("out_sharding") == ("layers", None)
    with jax.set_mesh(mesh8):
        grads = _grads(model, lambda m: m(x))
    assert_trees_close(grads, _grads(ref, lambda m: m(x)))
    assert _spec(grads["layers"]["up"]["kernel"]) == jax.P(None, None, "model")


# Decoding with a mutable cache ----------------------------------------------------------------


def test_decoder_mha_cache_fsdp(fsdp8):
    """nnx.MultiHeadAttention(decode=True) writes its nnx.Cache each call."""
    x = jax.random.normal(jax.random.key(0), (8, 1, 32))
    ref, model = rm.DecoderMHA(rngs=nnx.Rngs(0)), rm.DecoderMHA(rngs=nnx.Rngs(0))
    ref.attn.init_cache((8, 4, 32))
    model.attn.init_cache((8, 4, 32))
    npl.parallelize(model, fsdp8, npl.FSDP("fsdp", min_size=64))
    assert "fsdp" in _spec(model.attn.query.kernel)
    nnx.update(model, _batch_tree(nnx.state(model, nnx.Cache), fsdp8))
    expected = [ref(x * (i + 1)) for i in range(3)]
    with jax.set_mesh(fsdp8):
        step = nnx.jit(lambda m, x: m(x))
        outs = [step(model, _batch(x * (i + 1), fsdp8)) for i in range(3)]
    assert_trees_close(outs, expected)
    assert_trees_close(nnx.state(model, nnx.Cache), nnx.state(ref, nnx.Cache))
    assert int(model.attn.cache_index[...]) == 3


# Models that carry their own sharding metadata -----------------------------------------------


class ForeignMLP(nnx.Module):
    """Kernels annotated with logical names ('embed', 'mlp') no user mesh has."""

    def __init__(self, *, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(
            32, 64, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")), rngs=rngs
        )
        self.down = nnx.Linear(
            64, 32, kernel_init=nnx.with_partitioning(init, ("mlp", "embed")), rngs=rngs
        )

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))


def _foreign():
    with nnx.use_eager_sharding(False):  # as built for a mesh that has those axes
        return ForeignMLP(rngs=nnx.Rngs(0))


@pytest.mark.parametrize("style", ["fsdp", "tp"])
def test_foreign_out_sharding_metadata(fsdp8, style):
    """The plan wins over the model's own out_sharding; names that are no
    mesh axis are reported in the notes (and are no layer stack)."""
    x = jax.random.normal(jax.random.key(0), (8, 32))
    mesh = fsdp8
    if style == "fsdp":
        plan = npl.FSDP("fsdp", min_size=64)
    else:
        plan = {"up": npl.ColumnParallel("fsdp"), "down": npl.RowParallel("fsdp")}
    ref, model = _foreign(), _foreign()
    notes = npl.resolve(model, mesh, plan).notes
    assert any("up.kernel" in n and "'embed', 'mlp'" in n for n in notes)
    npl.parallelize(model, mesh, plan)
    assert _spec(model.up.kernel) == jax.P(None, "fsdp")
    assert _spec(model.down.kernel) == jax.P("fsdp", None)
    with jax.set_mesh(mesh):
        out = nnx.jit(lambda m, x: m(x))(model, _batch(x, mesh) if style == "fsdp" else x)
    assert_trees_close(out, ref(x))
