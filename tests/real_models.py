"""Tiny models written the way public Flax NNX code writes them.

Nothing here knows about nnx_parallel: these are the models a user brings.
Each one reproduces a habit of public NNX code (Gemma, the Flax examples,
MaxText-style scanned stacks) that a sharding library has to survive:

- `TinyLLM`: Gemma-style decoder. An `Embedder` holding `input_embedding`
  with `encode`/`decode` methods, a tied `nnx.Embed` (`attend`) variant,
  heads-first `nnx.Einsum` projections with a fused k/v kernel, RMSNorm
  scales, a gated MLP whose weights are named `w` (`Dense`), RoPE frequencies
  stored as a plain array, Dropout driven by `deterministic=`/`rngs=`, and a
  functional KV cache passed as `cache=` (scalar write index included).
- `ViT`: patch `nnx.Conv`, class token and position embedding parameters,
  Flax's own `nnx.MultiHeadAttention` (LinearGeneral q/k/v/out).
- `ResNet`: Conv + BatchNorm (`BatchStat` running statistics) residual blocks.
- `ScannedMLP`: a layer stack built with `nnx.vmap` and run with `nnx.scan`,
  every parameter with a leading layer axis, optionally tagged through
  `transform_metadata={nnx.PARTITION_NAME: 'layers'}`.
- `DecoderMHA`: `nnx.MultiHeadAttention(decode=True)` with its mutable
  `nnx.Cache` variables written during each call.
"""

import jax
import jax.numpy as jnp
from flax import nnx

# LLM --------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    """Gemma's RMSNorm: a zero-initialised `scale`, applied as 1 + scale."""

    def __init__(self, d: int, *, rngs: nnx.Rngs):
        self.scale = nnx.Param(jax.random.normal(rngs.params(), (d,)) * 0.1)

    def __call__(self, x):
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        scale = (1 + self.scale[...]).reshape((1,) * (x.ndim - 1) + (-1,))
        return x * jax.lax.rsqrt(var + 1e-6) * scale


class Embedder(nnx.Module):
    """Gemma's embedder: one table, `encode` for tokens, `decode` for logits."""

    def __init__(self, vocab: int, d: int, *, rngs: nnx.Rngs):
        self.input_embedding = nnx.Param(jax.random.normal(rngs.params(), (vocab, d)) * 0.1)

    def encode(self, tokens):
        return self.input_embedding[...][(tokens,)] * jnp.sqrt(
            self.input_embedding.shape[1]
        ).astype(jnp.float32)

    def decode(self, x):
        return jnp.dot(x, self.input_embedding[...].T)


class Dense(nnx.Module):
    """A projection whose weight is called `w` (not `kernel`)."""

    def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (din, dout)) / jnp.sqrt(din))

    def __call__(self, x):
        return x @ self.w[...]


class GatedMLP(nnx.Module):
    def __init__(self, d: int, hidden: int, *, rngs: nnx.Rngs):
        self.gate = Dense(d, hidden, rngs=rngs)
        self.up = Dense(d, hidden, rngs=rngs)
        self.down = Dense(hidden, d, rngs=rngs)
        self.dropout = nnx.Dropout(0.2)

    def __call__(self, x, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
        h = jax.nn.gelu(self.gate(x)) * self.up(x)
        h = self.dropout(h, deterministic=deterministic, rngs=rngs)
        return self.down(h)


def rope(x, positions, freqs):
    """Rotary embedding of x (B, T, N, H) at integer positions (B, T)."""
    angles = positions[..., None].astype(jnp.float32) * freqs[None, None]  # B T H/2
    sin, cos = jnp.sin(angles)[:, :, None], jnp.cos(angles)[:, :, None]
    a, b = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


class LLMAttention(nnx.Module):
    """Heads-first einsum kernels: q (N, D, H), fused kv (2, N, D, H), out (N, H, D)."""

    def __init__(self, d: int, heads: int, head_dim: int, *, rngs: nnx.Rngs):
        self.heads, self.head_dim = heads, head_dim
        self.q_einsum = nnx.Einsum("BTD,NDH->BTNH", (heads, d, head_dim), rngs=rngs)
        self.kv_einsum = nnx.Einsum("BSD,CNDH->CBSNH", (2, heads, d, head_dim), rngs=rngs)
        self.attn_vec_einsum = nnx.Einsum("BTNH,NHD->BTD", (heads, head_dim, d), rngs=rngs)
        # A plain array on the module, as RoPE tables often are.
        self.freqs = 1.0 / (10_000 ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))

    def __call__(self, x, positions, *, cache=None, segment_ids=None):
        q = rope(self.q_einsum(x), positions, self.freqs)
        k, v = self.kv_einsum(x)
        k = rope(k, positions, self.freqs)
        q_pos = positions
        k_pos = positions
        if cache is not None:
            end = cache["end"]
            k = jax.lax.dynamic_update_slice(cache["k"], k, (0, end, 0, 0))
            v = jax.lax.dynamic_update_slice(cache["v"], v, (0, end, 0, 0))
            k_pos = jnp.broadcast_to(jnp.arange(k.shape[1]), (k.shape[0], k.shape[1]))
            valid = k_pos < end + x.shape[1]
            cache = {"k": k, "v": v, "end": end + x.shape[1]}
        else:
            valid = jnp.ones(k.shape[:2], bool)
        mask = (k_pos[:, None, :] <= q_pos[:, :, None]) & valid[:, None, :]
        if segment_ids is not None:  # packed training batches (no cache)
            mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
        logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) / jnp.sqrt(self.head_dim).astype(jnp.float32)
        logits = jnp.where(mask[:, None], logits, -1e9)
        out = jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(logits, axis=-1), v)
        return cache, self.attn_vec_einsum(out)


class LLMBlock(nnx.Module):
    def __init__(self, d: int, heads: int, head_dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.pre_attention_norm = RMSNorm(d, rngs=rngs)
        self.attn = LLMAttention(d, heads, head_dim, rngs=rngs)
        self.pre_ffw_norm = RMSNorm(d, rngs=rngs)
        self.mlp = GatedMLP(d, hidden, rngs=rngs)

    def __call__(
        self, x, positions, *, cache=None, segment_ids=None, deterministic=True, rngs=None
    ):
        cache, h = self.attn(
            self.pre_attention_norm(x), positions, cache=cache, segment_ids=segment_ids
        )
        x = x + h
        x = x + self.mlp(self.pre_ffw_norm(x), deterministic=deterministic, rngs=rngs)
        return cache, x


class TinyLLM(nnx.Module):
    """Gemma-style decoder. `tied=True` uses `nnx.Embed` and its `attend`."""

    def __init__(
        self,
        vocab=64,
        d=32,
        heads=8,
        head_dim=8,
        hidden=64,
        layers=2,
        *,
        tied_embed=False,
        rngs: nnx.Rngs,
    ):
        self.tied_embed = tied_embed
        if tied_embed:
            self.embed = nnx.Embed(vocab, d, rngs=rngs)
        else:
            self.embedder = Embedder(vocab, d, rngs=rngs)
        self.layers = nnx.List(
            [LLMBlock(d, heads, head_dim, hidden, rngs=rngs) for _ in range(layers)]
        )
        self.final_norm = RMSNorm(d, rngs=rngs)

    def init_cache(self, batch: int, max_len: int):
        a = self.layers[0].attn
        zeros = jnp.zeros((batch, max_len, a.heads, a.head_dim), jnp.float32)
        return [{"k": zeros, "v": zeros, "end": jnp.int32(0)} for _ in self.layers]

    def __call__(
        self, tokens, positions=None, *, cache=None, segment_ids=None, deterministic=True, rngs=None
    ):
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = self.embed(tokens) if self.tied_embed else self.embedder.encode(tokens)
        new_cache = []
        for i, layer in enumerate(self.layers):
            layer_cache, x = layer(
                x,
                positions,
                cache=None if cache is None else cache[i],
                segment_ids=segment_ids,
                deterministic=deterministic,
                rngs=rngs,
            )
            new_cache.append(layer_cache)
        x = self.final_norm(x)  # the same norm module called again below
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.tied_embed else self.embedder.decode(x)
        return logits if cache is None else (logits, new_cache)


# ViT --------------------------------------------------------------------------


class ViT(nnx.Module):
    def __init__(
        self, image=8, patch=4, channels=3, d=32, heads=4, layers=2, classes=16, *, rngs: nnx.Rngs
    ):
        n = (image // patch) ** 2
        self.patch_embed = nnx.Conv(channels, d, (patch, patch), strides=(patch, patch), rngs=rngs)
        self.cls_token = nnx.Param(jax.random.normal(rngs.params(), (1, 1, d)) * 0.02)
        self.pos_embedding = nnx.Param(jax.random.normal(rngs.params(), (1, n + 1, d)) * 0.02)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.blocks = nnx.List([ViTBlock(d, heads, rngs=rngs) for _ in range(layers)])
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, classes, rngs=rngs)

    def __call__(self, images):
        x = self.patch_embed(images)
        b = x.shape[0]
        x = x.reshape(b, -1, x.shape[-1])
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embedding[...]
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


class ViTBlock(nnx.Module):
    def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(d, rngs=rngs)
        self.fc1 = nnx.Linear(d, 2 * d, rngs=rngs)
        self.fc2 = nnx.Linear(2 * d, d, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x), deterministic=True)
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x))))


# ResNet -----------------------------------------------------------------------


class ResidualBlock(nnx.Module):
    def __init__(self, c: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(c, c, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(c, rngs=rngs)
        self.conv2 = nnx.Conv(c, c, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(c, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.bn1(self.conv1(x)))
        return jax.nn.relu(x + self.bn2(self.conv2(h)))


class ResNet(nnx.Module):
    def __init__(self, channels=3, c=16, blocks=2, classes=8, *, rngs: nnx.Rngs):
        self.stem = nnx.Conv(channels, c, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(c, rngs=rngs)
        self.blocks = nnx.List([ResidualBlock(c, rngs=rngs) for _ in range(blocks)])
        self.fc = nnx.Linear(c, classes, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.fc(jnp.mean(x, axis=(1, 2)))


# Scanned layer stack ------------------------------------------------------------


class ScanBlock(nnx.Module):
    def __init__(self, d: int, *, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, 2 * d, rngs=rngs)
        self.down = nnx.Linear(2 * d, d, rngs=rngs)

    def __call__(self, x):
        return x + self.down(jax.nn.gelu(self.up(self.norm(x))))


class ScannedMLP(nnx.Module):
    """`layers` blocks stacked by `nnx.vmap`, run by `nnx.scan`.

    With `partition_name` set, the stack is built and scanned with
    `transform_metadata={nnx.PARTITION_NAME: partition_name}` on kernels that
    carry their own `out_sharding`, as MaxText-style code does.
    """

    def __init__(
        self, d=32, layers=8, *, partition_name: str | None = None, remat=False, rngs: nnx.Rngs
    ):
        self.meta = {} if partition_name is None else {nnx.PARTITION_NAME: partition_name}
        self.remat = remat

        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata=self.meta)
        def make(rngs):
            block = ScanBlock(d, rngs=rngs)
            if partition_name is not None:
                block.up.kernel.set_metadata(out_sharding=(None, "model"))
                block.down.kernel.set_metadata(out_sharding=("model", None))
            return block

        self.layers = make(rngs)

    def __call__(self, x):
        def step(x, block):
            return block(x)

        if self.remat:
            step = nnx.remat(step)

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata=self.meta)
        def run(x, block):
            return step(x, block)

        return run(x, self.layers)


# Decoding attention with a mutable cache -----------------------------------------


class DecoderMHA(nnx.Module):
    """`nnx.MultiHeadAttention(decode=True)`: each call writes its `nnx.Cache`."""

    def __init__(self, d=32, heads=8, *, rngs: nnx.Rngs):
        self.attn = nnx.MultiHeadAttention(heads, d, decode=True, rngs=rngs)
        self.out = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x):
        return self.out(self.attn(x))


# Deep stacks of one layer kind, for FSDP step memory vs depth -----------------------


class LinearList(nnx.Module):
    """`depth` Linear(d, d) in an `nnx.List`, ReLU between them (unrolled)."""

    def __init__(self, d=512, depth=4, *, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(d, d, rngs=rngs) for _ in range(depth)])

    def __call__(self, x):
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return x


class LinearAttrs(nnx.Module):
    """The same stack with each layer an attribute (`layer0`, `layer1`, ...)."""

    def __init__(self, d=512, depth=4, *, rngs: nnx.Rngs):
        self.depth = depth
        for i in range(depth):
            setattr(self, f"layer{i}", nnx.Linear(d, d, rngs=rngs))

    def __call__(self, x):
        for i in range(self.depth):
            x = jax.nn.relu(getattr(self, f"layer{i}")(x))
        return x


class ScannedLinears(nnx.Module):
    """`depth` Linear(d, d) stacked by `nnx.vmap` and run by `nnx.scan`.

    `partition_name` tags the stack through `transform_metadata` (the Flax
    scan-over-layers pattern); `own_sharding` gives each kernel its own
    `out_sharding` (replicated), which the vmap extends with the name.
    """

    def __init__(self, d=512, depth=4, *, partition_name=None, own_sharding=False, rngs: nnx.Rngs):
        self.meta = {} if partition_name is None else {nnx.PARTITION_NAME: partition_name}

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata=self.meta)
        def make(rngs):
            layer = nnx.Linear(d, d, rngs=rngs)
            if own_sharding:
                layer.kernel.set_metadata(out_sharding=(None, None))
            return layer

        self.layers = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata=self.meta)
        def run(x, layer):
            return jax.nn.relu(layer(x))

        return run(x, self.layers)


class TPBlocks(nnx.Module):
    """`depth` (up: Linear(d, 2d), down: Linear(2d, d)) blocks, for FSDP x TP."""

    def __init__(self, d=256, depth=4, *, rngs: nnx.Rngs):
        self.blocks = nnx.List(
            [
                nnx.Dict(up=nnx.Linear(d, 2 * d, rngs=rngs), down=nnx.Linear(2 * d, d, rngs=rngs))
                for _ in range(depth)
            ]
        )

    def __call__(self, x):
        for block in self.blocks:
            x = x + block["down"](jax.nn.relu(block["up"](x)))
        return x


class Gated(nnx.Module):
    """A module holding a param and a child that holds its own and takes a
    keyword flag: under FSDP the child gathers inside the parent's region."""

    def __init__(self, d=64, *, rngs: nnx.Rngs):
        self.scale = nnx.Param(jnp.ones((d,)))
        self.child = _Negatable(d, rngs=rngs)

    def __call__(self, x):
        return self.child(x * self.scale[...][None], negate=True)


class _Negatable(nnx.Module):
    def __init__(self, d, *, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (d, d)) * 0.1)

    def __call__(self, x, *, negate: bool = False):
        y = jnp.tanh(x @ self.w[...])
        return -y if negate else y


# Issue 14: one tiny model per pattern that Explicit axes used to refuse ----------------
#
# Each is written the way public NNX code writes it; none knows about nnx_parallel.


class MiniGPT(nnx.Module):
    """GPT-2 style: `nnx.Embed` token table, q/k/v/o and up/down `nnx.Linear`,
    LayerNorm, an untied `lm_head` (patterns 1, 5, 6)."""

    def __init__(self, vocab=64, d=32, heads=4, *, rngs: nnx.Rngs):
        self.heads = heads
        self.wte = nnx.Embed(vocab, d, rngs=rngs)
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.q = nnx.Linear(d, d, rngs=rngs)
        self.k = nnx.Linear(d, d, rngs=rngs)
        self.v = nnx.Linear(d, d, rngs=rngs)
        self.o = nnx.Linear(d, d, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, 2 * d, rngs=rngs)
        self.down = nnx.Linear(2 * d, d, rngs=rngs)
        self.lm_head = nnx.Linear(d, vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        x = self.wte(tokens)
        h = self.ln1(x)
        b, t, d = h.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads)  # noqa: E731
        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        logits = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(d // self.heads)
        att = jax.nn.softmax(logits, axis=-1)
        x = x + self.o(jnp.einsum("bhts,bshd->bthd", att, v).reshape(b, t, d))
        x = x + self.down(jax.nn.gelu(self.up(self.ln2(x))))
        return self.lm_head(x)


class TableEmbedder(nnx.Module):
    def __init__(self, vocab: int, d: int, *, rngs: nnx.Rngs):
        self.embedding = nnx.Param(jax.random.normal(rngs.params(), (vocab, d)) * 0.1)


class TableReader(nnx.Module):
    """Pattern 2: the parent reads its child's table with `.at[].get(out_sharding=)`,
    the sharding coming from a config field that is `None` by default."""

    def __init__(self, vocab=64, d=32, *, emb_shd=None, rngs: nnx.Rngs):
        self.emb_shd = emb_shd
        self.embedder = TableEmbedder(vocab, d, rngs=rngs)
        self.up = nnx.Linear(d, 2 * d, rngs=rngs)
        self.down = nnx.Linear(2 * d, d, rngs=rngs)
        self.lm_head = nnx.Linear(d, vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        x = self.embedder.embedding[...].at[(tokens,)].get(out_sharding=self.emb_shd)
        x = x + self.down(jax.nn.gelu(self.up(x)))
        return self.lm_head(x)


class EncodeLM(nnx.Module):
    """Pattern 3: a custom embedder method (`Embedder.encode`, param
    `input_embedding`) and a tied `decode` head."""

    def __init__(self, vocab=64, d=32, *, rngs: nnx.Rngs):
        self.embedder = Embedder(vocab, d, rngs=rngs)
        self.mlp = GatedMLP(d, 2 * d, rngs=rngs)

    def __call__(self, tokens):
        x = self.embedder.encode(tokens)
        return self.embedder.decode(x + self.mlp(x))


class KVCache(nnx.Module):
    """One attention layer's keys, values and write position (`nnx.Cache`,
    created replicated: plain `jnp.zeros`, as public decoding code does)."""

    def __init__(self, batch: int, max_len: int, heads: int, head_dim: int):
        shape = (batch, max_len, heads, head_dim)
        self.k = nnx.Cache(jnp.zeros(shape))
        self.v = nnx.Cache(jnp.zeros(shape))
        self.index = nnx.Cache(jnp.array(0, jnp.int32))


class CachedAttention(nnx.Module):
    """Pattern 4: a KV cache written with `dynamic_update_slice` from the
    projected keys and values; its own (`own_cache`), or passed as `cache=`."""

    def __init__(self, d=32, heads=4, batch=8, max_len=8, *, own_cache=True, rngs: nnx.Rngs):
        self.heads = heads
        self.q_proj = nnx.Linear(d, d, rngs=rngs)
        self.k_proj = nnx.Linear(d, d, rngs=rngs)
        self.v_proj = nnx.Linear(d, d, rngs=rngs)
        self.o_proj = nnx.Linear(d, d, rngs=rngs)
        self.cache = KVCache(batch, max_len, heads, d // heads) if own_cache else None

    def __call__(self, x, cache: KVCache | None = None):
        cache = self.cache if cache is None else cache
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        i = cache.index[...]
        cache.k[...] = jax.lax.dynamic_update_slice(cache.k[...], k, (0, i, 0, 0))
        cache.v[...] = jax.lax.dynamic_update_slice(cache.v[...], v, (0, i, 0, 0))
        cache.index[...] = i + t
        keys, values = cache.k[...], cache.v[...]
        valid = jnp.arange(keys.shape[1]) < i + t
        logits = jnp.einsum("bthd,bshd->bhts", q, keys) / jnp.sqrt(d // self.heads)
        att = jax.nn.softmax(jnp.where(valid, logits, -1e9), axis=-1)
        return self.o_proj(jnp.einsum("bhts,bshd->bthd", att, values).reshape(b, t, d))


class CacheListLM(nnx.Module):
    """Pattern 4, second form: the caller owns the caches, one `KVCache` per
    layer, and passes the list as `cache=`."""

    def __init__(self, d=32, heads=4, layers=2, *, rngs: nnx.Rngs):
        self.heads = heads
        self.layers = nnx.List(
            [CachedAttention(d, heads, own_cache=False, rngs=rngs) for _ in range(layers)]
        )

    def init_cache(self, batch: int, max_len: int) -> list[KVCache]:
        d = self.layers[0].q_proj.in_features
        return [KVCache(batch, max_len, self.heads, d // self.heads) for _ in self.layers]

    def __call__(self, x, cache: list[KVCache]):
        for layer, c in zip(self.layers, cache):
            x = x + layer(x, cache=c)
        return x


class GuideBlock(nnx.Module):
    """Pattern 7, as Flax's GSPMD guide writes it: params annotated with
    `nnx.with_partitioning`, and the layer's own `with_sharding_constraint`
    on its activation (batch axis, model axis); `reshard=True` writes it as
    `jax.sharding.reshard`, as code for Explicit axes does."""

    def __init__(
        self, d: int, hidden: int, *, axes=("data", "model"), reshard=False, rngs: nnx.Rngs
    ):
        init = nnx.initializers.lecun_normal()
        self.axes, self.reshard = axes, reshard
        col = nnx.with_partitioning(init, (None, axes[1]))
        row = nnx.with_partitioning(init, (axes[1], None))
        self.w1 = nnx.Param(col(rngs.params(), (d, hidden)))
        self.b1 = nnx.Param(jnp.zeros((hidden,)))
        self.w2 = nnx.Param(row(rngs.params(), (hidden, d)))

    def __call__(self, x):
        y = jnp.dot(x, self.w1[...]) + self.b1[...].reshape((1,) * (x.ndim - 1) + (-1,))
        spec = jax.P(self.axes[0], None, self.axes[1])
        if self.reshard:
            y = jax.sharding.reshard(y, spec)
        else:
            y = jax.lax.with_sharding_constraint(y, spec)
        y = jax.nn.relu(y)
        return x + jnp.dot(y, self.w2[...])


class GuideStack(nnx.Module):
    """Pattern 7: GuideBlocks stacked by `nnx.vmap(transform_metadata=
    {PARTITION_NAME: None})`, run by a raw `jax.lax.scan` over the module."""

    def __init__(
        self, d=32, hidden=64, layers=2, *, axes=("data", "model"), reshard=False, rngs: nnx.Rngs
    ):
        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
        def make(rngs):
            return GuideBlock(d, hidden, axes=axes, reshard=reshard, rngs=rngs)

        self.layers = make(rngs)

    def __call__(self, x):
        graphdef, state = nnx.split(self.layers)

        def step(x, layer_state):
            return nnx.merge(graphdef, layer_state)(x), None

        return jax.lax.scan(step, x, state)[0]
