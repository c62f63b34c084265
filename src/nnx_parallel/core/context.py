"""Context parallelism as a plan entry: `ContextParallel` on attention modules.

Long sequences split over devices: every activation of the matched attention
module keeps its sequence dim sharded over `axis` (queries included), and
attention, the one op that mixes positions, gets the keys and values of the
whole sequence one of two ways:

- `"all_gather"` (MaxText's default): K and V are all-gathered over `axis`
  where attention is computed (after RoPE and norms, wherever the module's
  code applies them); the scores of a device are `[B, H, S/cp, S]`. Backward
  reduces dK and dV over the axis (an all-reduce on XLA:CPU). Works on any attention module, inline einsum
  attention included (there GSPMD places the gather).
- `"ring"` (ring attention; PyTorch's `context_parallel`): K/V blocks rotate
  around `axis` with `ppermute`, merged by an online softmax in float32; no
  device ever holds the whole K or V, scores are `[B, H, S/cp, S/cp]` per
  step. Needs an attention call it can replace: `nnx.MultiHeadAttention`'s
  `attention_fn`, or `jax.nn.dot_product_attention` /
  `nnx.dot_product_attention` called by the module.

The call-time side is `runtime/context.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from jax.sharding import PartitionSpec as P

from nnx_parallel import _specs
from nnx_parallel.core import checks
from nnx_parallel.core.layouts import ContextAttention, ModuleHooks
from nnx_parallel.core.styles import ModuleContext
from nnx_parallel.errors import PlanError

STRATEGIES = ("all_gather", "ring")


@dataclasses.dataclass(frozen=True)
class ContextParallel:
    """Shards an attention module's sequence over `axis` (context parallelism).

    The module's first input `(batch, seq, features)` is laid out with its
    sequence dim over `axis`, and so are its other array arguments that have
    that sequence length (positions `(B, S)`, masks `(B, 1, S, S)` on their
    query rows); its output leaves sequence-sharded. Parameters stay as other
    styles leave them (replicated by default), so it combines with
    tensor-parallel q/k/v/o entries and FSDP.

    Args:
      axis: Mesh axis the sequence dim is sharded over.
      strategy: `"all_gather"` (K/V gathered where attention runs) or
        `"ring"` (K/V blocks rotated with `ppermute`, online softmax).
      seq_dim: The sequence dim of the first input, counted from the end
        (default -2: `(batch, seq, features)`).
      load_balance: Ring only. Put the sequence in `2 * cp` chunks, device d
        holding chunks d and 2*cp-1-d (PyTorch's head-tail balancer), inside
        the attention call (in and back out, so the module sees its own order
        and a mask built from positions or the sequence length stays right);
        with `is_causal`, chunk pairs wholly above the diagonal are skipped,
        and every device scores the same number. The sequence must split into
        `2 * cp` chunks.

    Raises:
      PlanError: an unknown strategy, a non-negative `seq_dim`, or (at plan
        time) an axis missing from the mesh; at trace time, a sequence the
        axis size does not divide, or `"ring"` on a module that computes
        attention inline.

    Example:
      >>> attn = nnx.MultiHeadAttention(4, 32, decode=False, rngs=nnx.Rngs(0))
      >>> cp4 = jax.make_mesh((2, 4), ("data", "context"))
      >>> _ = parallelize(attn, cp4, ContextParallel("context"))
      >>> x = jax.device_put(jax.numpy.ones((2, 32, 32)), jax.NamedSharding(cp4, P("data", "context")))
      >>> with jax.set_mesh(cp4):
      ...     y = jax.jit(lambda x: attn(x))(x)
      >>> y.sharding.spec
      P('data', 'context', None)
    """

    axis: str = "context"
    _: dataclasses.KW_ONLY
    strategy: str = "all_gather"
    seq_dim: int = -2
    load_balance: bool = False
    subtree = False

    def __post_init__(self) -> None:
        checks.validate(self, {**checks.RULES, "axis": checks.one_axis})
        if self.strategy not in STRATEGIES:
            raise PlanError(
                f"ContextParallel(strategy={self.strategy!r}): unknown strategy. Use "
                "'all_gather' (K/V gathered where attention runs) or 'ring' (K/V rotated)."
            )
        if self.load_balance and self.strategy != "ring":
            raise PlanError(
                f"ContextParallel(strategy={self.strategy!r}, load_balance=True): load balancing "
                "reorders the sequence so that ring attention's causal work is even; all_gather "
                "scores every query row against the whole sequence anyway. Use strategy='ring', "
                "or load_balance=False."
            )

    def param_specs(self, ctx: ModuleContext) -> dict[str, P]:
        ctx.check_axes(self, self.axis)
        return {
            name: ctx.current.get(name) or _specs.replicated(len(shape))
            for name, shape in ctx.shapes.items()
        }

    def hooks(self, ctx: ModuleContext, specs: Mapping[str, P]) -> ModuleHooks:
        ctx.check_axes(self, self.axis)
        return ModuleHooks(
            context=ContextAttention(self.axis, self.strategy, self.seq_dim, self.load_balance)
        )
