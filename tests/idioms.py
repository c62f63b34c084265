"""Test models written in the idioms public Flax code uses (issue 24).

- `Stack`: a block stacked by `nnx.vmap` and run by `nnx.scan`, tagged
  with `transform_metadata={nnx.PARTITION_NAME: ...}` or not, its params
  annotated with `out_sharding` or not, or mixed (the Flax guide's
  scan-over-layers example has a tag and no annotations).
"""

import jax
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
