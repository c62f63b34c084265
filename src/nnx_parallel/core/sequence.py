"""Sequence parallelism (Megatron-SP) as plan entries.

Plain tensor parallelism leaves the activations between blocks replicated
over the model axis: every device runs the same LayerNorm and dropout on the
whole sequence, and each block's output is all-reduced. Megatron-SP shards
those activations on the sequence dim instead. The all-reduce after a
row-parallel layer becomes a reduce-scatter (each device keeps its slice of
the sequence), and the column-parallel layers that follow all-gather the
sequence back. An all-reduce is a reduce-scatter plus an all-gather, so the
traffic is the same, but norms, dropout and residual adds run on `1/n` of the
sequence and their activations take `1/n` of the memory.

Plan entries, all aligned to trailing dims with the sequence at `seq_dim`:

- `SequenceParallel`: norms, dropout: sequence-sharded in, sequence-sharded out.
- `SequenceColumnParallel`: `ColumnParallel` whose input is all-gathered over
  the sequence first.
- `SequenceRowParallel`: `RowParallel` whose output is reduce-scattered onto
  the sequence (also for a vocab-parallel `Embed`).

PyTorch: `SequenceParallel()`, `ColwiseParallel(input_layouts=Shard(1))`,
`RowwiseParallel(output_layouts=Shard(1))`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from jax.sharding import PartitionSpec as P

from nnx_parallel._specs import AxisNames
from nnx_parallel.core import checks
from nnx_parallel.core.layouts import Layout, ModuleHooks
from nnx_parallel.core.styles import ColumnParallel, ModuleContext, RowParallel
from nnx_parallel.errors import PlanError


def _seq_layout(axis: AxisNames | None, seq_dim: int) -> tuple:
    """Trailing layout with `axis` at `seq_dim` (negative) and None after it."""
    if seq_dim >= 0:
        raise PlanError(
            f"seq_dim={seq_dim}: give the sequence dim counted from the end (e.g. -2 for "
            "(batch, seq, features)), so the layout fits inputs with or without a batch dim."
        )
    out = [None] * (-seq_dim)
    out[0] = axis
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
    """Runs a module (norm, dropout) on activations sharded on the sequence dim.

    Parameters stay replicated (or keep what an earlier style gave them); the
    input is laid out sequence-sharded over `axis` and so is the output. Put
    it on every norm between a `SequenceRowParallel` and a
    `SequenceColumnParallel` layer.

    Args:
      axis: Mesh axis (or axes) the sequence dim is sharded over.
      seq_dim: The sequence dim, counted from the end (default -2:
        `(batch, seq, features)`).

    Example:
      >>> norm = nnx.LayerNorm(16, rngs=nnx.Rngs(0))
      >>> _ = parallelize(norm, mesh8, SequenceParallel("model"))
      >>> x = jax.numpy.ones((2, 8, 16))
      >>> with jax.set_mesh(mesh8):
      ...     y = jax.jit(lambda x: norm(x))(x)
      >>> y.sharding.spec
      P(None, 'model')
    """

    axis: AxisNames = "model"
    _: dataclasses.KW_ONLY
    seq_dim: int = -2
    subtree = False

    def __post_init__(self) -> None:
        checks.validate(self)

    def param_specs(self, ctx: ModuleContext) -> dict[str, P]:
        ctx.check_axes(self, self.axis)
        return {
            name: ctx.current.get(name) or P(*([None] * len(shape)))
            for name, shape in ctx.shapes.items()
        }

    def hooks(self, ctx: ModuleContext, specs: Mapping[str, P]) -> ModuleHooks:
        layout = _seq_layout(self.axis, self.seq_dim)
        return ModuleHooks(layout=Layout(input=layout, output=layout))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SequenceColumnParallel(ColumnParallel):
    """`ColumnParallel` whose input arrives sharded on the sequence dim.

    The input is all-gathered over the sequence before the matmul (in
    backward, its gradient is reduce-scattered back). Takes every argument of
    `ColumnParallel` plus `seq_dim`; an explicit `input_spec` wins.

    Example:
      >>> layer = nnx.Linear(16, 32, rngs=nnx.Rngs(0))
      >>> _ = parallelize(layer, mesh8, SequenceColumnParallel("model"))
      >>> layer.kernel[...].sharding.spec
      P(None, 'model')
    """

    seq_dim: int = -2

    def hooks(self, ctx: ModuleContext, specs: Mapping[str, P]) -> ModuleHooks | None:
        if self.input_spec is None:
            gathered = _seq_layout(None, self.seq_dim)
            return ColumnParallel.hooks(dataclasses.replace(self, input_spec=gathered), ctx, specs)
        return ColumnParallel.hooks(self, ctx, specs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SequenceRowParallel(RowParallel):
    """`RowParallel` whose output is reduce-scattered onto the sequence dim.

    Instead of all-reducing its partial sums, the layer leaves each device
    the summed slice of the sequence it owns. Also shards a vocab-parallel
    `Embed` (rows = vocab) and scatters its output over the sequence. Takes
    every argument of `RowParallel` plus `seq_dim`; an explicit
    `output_spec` wins.

    Example:
      >>> layer = nnx.Linear(32, 16, rngs=nnx.Rngs(0))
      >>> _ = parallelize(layer, mesh8, SequenceRowParallel("model"))
      >>> layer.kernel[...].sharding.spec
      P('model', None)
    """

    seq_dim: int = -2

    def hooks(self, ctx: ModuleContext, specs: Mapping[str, P]) -> ModuleHooks | None:
        if self.output_spec is None:
            scattered = _seq_layout(self.axis, self.seq_dim)
            return RowParallel.hooks(dataclasses.replace(self, output_spec=scattered), ctx, specs)
        return RowParallel.hooks(self, ctx, specs)
