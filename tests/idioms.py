"""Test models written in the idioms public Flax code uses (issue 24).

- `Stack`: a block stacked by `nnx.vmap` and run by `nnx.scan`, tagged
  with `transform_metadata={nnx.PARTITION_NAME: ...}` or not, its params
  annotated with `out_sharding` or not, or mixed (the Flax guide's
  scan-over-layers example has a tag and no annotations).
"""

import jax
import jax.numpy as jnp
from flax import nnx


class Block(nnx.Module):
    """`Linear(d, d, use_bias=False)` + relu, optionally a second Linear.

    `annotate`: which of the two kernels get their own (replicated)
    `out_sharding`: "none", "all" or "mixed" (the first only).
    """

    def __init__(self, d, *, two=False, annotate="none", rngs: nnx.Rngs):
        self.linear = nnx.Linear(d, d, use_bias=False, rngs=rngs)
        self.second = nnx.Linear(d, d, rngs=rngs) if two else None
        if annotate in ("all", "mixed"):
            self.linear.kernel.set_metadata(out_sharding=(None, None))
        if annotate == "all" and two:
            self.second.kernel.set_metadata(out_sharding=(None, None))

    def __call__(self, x):
        x = jax.nn.relu(self.linear(x))
        return x if self.second is None else jax.nn.relu(self.second(x))


class Stack(nnx.Module):
    """`depth` Blocks made by `nnx.vmap`, run by `nnx.scan` (both with
    `transform_metadata={nnx.PARTITION_NAME: tag}` unless `tag` is None)."""

    def __init__(self, d=512, depth=4, *, tag="layers", two=False, annotate="none", rngs):
        self.meta = {} if tag is None else {nnx.PARTITION_NAME: tag}

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata=self.meta)
        def make(rngs):
            return Block(d, two=two, annotate=annotate, rngs=rngs)

        self.blocks = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata=self.meta)
        def run(x, block):
            return block(x)

        return run(x, self.blocks)


# Conv nets (channels last, NHWC) ------------------------------------------------------


class Bottleneck(nnx.Module):
    """ResNet-50-style bottleneck: 1x1 reduce, 3x3, 1x1 expand, each with a
    BatchNorm; identity shortcut."""

    def __init__(self, c: int, mid: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(c, mid, (1, 1), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(mid, rngs=rngs)
        self.conv2 = nnx.Conv(mid, mid, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(mid, rngs=rngs)
        self.conv3 = nnx.Conv(mid, c, (1, 1), use_bias=False, rngs=rngs)
        self.bn3 = nnx.BatchNorm(c, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn1(self.conv1(x)))
        h = nnx.relu(self.bn2(self.conv2(h)))
        return nnx.relu(x + self.bn3(self.conv3(h)))


class ResNet(nnx.Module):
    """Stem conv + BatchNorm, bottleneck blocks, global average pool, classifier."""

    def __init__(self, channels=3, c=32, mid=16, blocks=2, classes=10, *, rngs: nnx.Rngs):
        self.stem = nnx.Conv(channels, c, (3, 3), use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(c, rngs=rngs)
        self.layers = nnx.List([Bottleneck(c, mid, rngs=rngs) for _ in range(blocks)])
        self.fc = nnx.Linear(c, classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.stem_bn(self.stem(x)))
        for block in self.layers:
            x = block(x)
        return self.fc(x.mean(axis=(1, 2)))


class VAEResBlock(nnx.Module):
    """Stable-Diffusion-VAE-style block: GroupNorm -> silu -> conv, twice, + x."""

    def __init__(self, c: int, *, groups=8, rngs: nnx.Rngs):
        self.norm1 = nnx.GroupNorm(c, num_groups=groups, rngs=rngs)
        self.conv1 = nnx.Conv(c, c, (3, 3), rngs=rngs)
        self.norm2 = nnx.GroupNorm(c, num_groups=groups, rngs=rngs)
        self.conv2 = nnx.Conv(c, c, (3, 3), rngs=rngs)

    def __call__(self, x):
        h = self.conv1(nnx.silu(self.norm1(x)))
        return x + self.conv2(nnx.silu(self.norm2(h)))


class VAE(nnx.Module):
    """Conv encoder (stride-2 downsampling, mean/log-variance heads) and decoder
    (nearest upsampling + conv), reparameterised with a fixed noise key."""

    def __init__(self, channels=3, c=32, latent=4, *, rngs: nnx.Rngs):
        self.enc_in = nnx.Conv(channels, c, (3, 3), rngs=rngs)
        self.enc_block = VAEResBlock(c, rngs=rngs)
        self.enc_down = nnx.Conv(c, c, (3, 3), strides=2, rngs=rngs)
        self.enc_norm = nnx.GroupNorm(c, num_groups=8, rngs=rngs)
        self.to_moments = nnx.Conv(c, 2 * latent, (1, 1), rngs=rngs)
        self.dec_in = nnx.Conv(latent, c, (3, 3), rngs=rngs)
        self.dec_block = VAEResBlock(c, rngs=rngs)
        self.dec_up = nnx.Conv(c, c, (3, 3), rngs=rngs)
        self.dec_norm = nnx.GroupNorm(c, num_groups=8, rngs=rngs)
        self.dec_out = nnx.Conv(c, channels, (3, 3), rngs=rngs)

    def encode(self, x):
        h = self.enc_down(self.enc_block(self.enc_in(x)))
        mean, logvar = jnp.split(self.to_moments(nnx.silu(self.enc_norm(h))), 2, axis=-1)
        return mean, logvar

    def decode(self, z):
        h = self.dec_block(self.dec_in(z))
        b, hh, ww, c = h.shape
        h = jax.image.resize(h, (b, 2 * hh, 2 * ww, c), method="nearest")
        return self.dec_out(nnx.silu(self.dec_norm(self.dec_up(h))))

    def __call__(self, x):
        mean, logvar = self.encode(x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(jax.random.key(0), mean.shape)
        return self.decode(z)


class DoubleConv(nnx.Module):
    """(conv 3x3 -> BatchNorm -> relu) x 2: the UNet's building block."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(cin, cout, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(cout, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        return nnx.relu(self.bn2(self.conv2(x)))


class Down(nnx.Module):
    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
        self.conv = DoubleConv(cin, cout, rngs=rngs)

    def __call__(self, x):
        return self.conv(nnx.max_pool(x, (2, 2), strides=(2, 2)))


class Up(nnx.Module):
    """Transposed-conv upsampling named `up`, skip concatenation, DoubleConv."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
        self.up = nnx.ConvTranspose(cin, cin // 2, (2, 2), strides=(2, 2), rngs=rngs)
        self.conv = DoubleConv(cin, cout, rngs=rngs)

    def __call__(self, x, skip):
        return self.conv(jnp.concatenate([skip, self.up(x)], axis=-1))


class UNet(nnx.Module):
    """The classic UNet (milesial/Pytorch-UNet layout), `depth` levels deep."""

    def __init__(self, channels=3, classes=2, c=16, depth=2, *, rngs: nnx.Rngs):
        self.inc = DoubleConv(channels, c, rngs=rngs)
        widths = [c * 2**i for i in range(depth + 1)]
        self.downs = nnx.List([Down(a, b, rngs=rngs) for a, b in zip(widths, widths[1:])])
        ups = [Up(b, a, rngs=rngs) for a, b in zip(widths, widths[1:])]
        self.ups = nnx.List(ups[::-1])
        self.outc = nnx.Conv(c, classes, (1, 1), rngs=rngs)

    def __call__(self, x):
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.outc(x)


# Flax's scan-over-layers MLP ---------------------------------------------------------


class GuideBlock(nnx.Module):
    """Linear -> BatchNorm -> Dropout -> gelu, as in Flax's scan guide."""

    def __init__(self, d: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(d, d, rngs=rngs)
        self.bn = nnx.BatchNorm(d, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)

    def __call__(self, x):
        return nnx.gelu(self.dropout(self.bn(self.linear(x))))


class ScannedMLP(nnx.Module):
    """`layers` GuideBlocks made by `nnx.vmap`, run by `nnx.scan` (deterministic
    dropout: the tests compare numbers)."""

    def __init__(self, d=32, layers=4, *, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return GuideBlock(d, rngs=rngs)

        self.blocks = make(rngs)
        self.blocks.dropout.deterministic = True

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(x, block):
            return block(x)

        return run(x, self.blocks)
