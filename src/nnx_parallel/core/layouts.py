"""What a module does at call time, as data: `Layout`, `Gather`, `ModuleHooks`.

Styles return these from `hooks(ctx, specs)`; the runtime (`runtime/`) reads
them when a hooked module is called. They are frozen and hashable, so the
hooked class that carries them can be cached and `nnx.split`/`merge` keep
them with the graph definition. Exported for users' own styles.

Example:
  >>> hooks = ModuleHooks(layout=Layout(output=("model",)))
  >>> hooks.merge(ModuleHooks(gather=Gather(("fsdp",), ("fsdp",), (("kernel", -1),)))).methods
  ('__call__',)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from jax.sharding import Mesh

from nnx_parallel import _specs


@dataclasses.dataclass(frozen=True)
class Layout:
    """Activation layouts around a call, each aligned to trailing dims.

    `input` lays out the first positional argument before the call, `output`
    every array the call returns. Leading dims stay as they are (Auto axes)
    or keep the input's batch layout (Explicit axes). `rank_delta` is the
    output rank minus the input rank (Embed: +1).
    """

    input: tuple | None = None
    output: tuple | None = None
    rank_delta: int = 0
    force_auto: bool = False
    # Row-style layers: the output is a partial sum over these axes, and these
    # parameters (biases) are added once, after the sum.
    reduce: tuple[str, ...] = ()
    post: tuple[str, ...] = ()
    # For each output dim, the input dim it comes from (None: new), when the
    # layer says (einsums); otherwise leading dims match position by position.
    out_from: tuple[int | None, ...] | None = None

    @property
    def axes(self) -> tuple[str, ...]:
        """Every mesh axis the layout names (input, output, then reduce), once each."""
        entries = (*(self.input or ()), *(self.output or ()), *self.reduce)
        return tuple(dict.fromkeys(a for e in entries for a in _specs.axes_of(e)))


@dataclasses.dataclass(frozen=True)
class Gather:
    """FSDP: all-gather `params` ((name, dim) pairs) over `axes` per call."""

    axes: tuple[str, ...]
    batch_axes: tuple[str, ...]
    params: tuple[tuple[str, int], ...]
    # FSDP's `reshard_after_forward`: gather again in backward (False: keep
    # the forward's gathered copy until backward).
    reshard_after_forward: bool = True
    # See FSDP: prefetch depth, and the mixed-precision policy.
    prefetch: int = 0
    param_dtype: Any = None
    reduce_dtype: Any = None
    # (name, full spec) of each param the module owns: its layout where its own
    # metadata is gone (`nnx.update` with another model's state).
    specs: tuple[tuple[str, tuple], ...] = ()


@dataclasses.dataclass(frozen=True)
class Experts:
    """Expert parallelism (`ExpertParallel`): `params` ((name, dim from the
    end) pairs) hold `num_experts` experts on that dim, sharded over `axis`;
    the batch (dim 0 of the inputs) is sharded over `batch_axes`."""

    axis: str
    num_experts: int
    params: tuple[tuple[str, int], ...]
    batch_axes: tuple[str, ...]
    # Not None: tokens go to their experts by all-to-all with this capacity
    # factor (`runtime/experts_a2a.py`); None: the token gather.
    capacity_factor: float | None = None


@dataclasses.dataclass(frozen=True)
class Recompute:
    """What a module's backward recomputes: all of it (`policy` None) or
    what `policy` (a `jax.checkpoint_policies` policy) does not save."""

    policy: Callable[..., bool] | None = None
    name: str = "full"


@dataclasses.dataclass(frozen=True)
class ContextAttention:
    """Context parallelism (`ContextParallel`): the call's sequence dim (of its
    first input, `seq_dim` from the end) is sharded over `axis`; attention
    gathers K/V (`"all_gather"`) or rotates them around the axis (`"ring"`).
    See `runtime/context.py`."""

    axis: str
    strategy: str = "all_gather"
    seq_dim: int = -2
    # Ring only: the sequence in 2 x cp chunks in head-tail order (see
    # `runtime/ring.balanced_order`), so causal work is the same on each device.
    load_balance: bool = False


@dataclasses.dataclass(frozen=True)
class ModuleHooks:
    """Everything a module does at call time, merged from all its styles."""

    layout: Layout | None = None
    gather: Gather | None = None
    methods: tuple[str, ...] = ("__call__",)
    mesh: Mesh | None = None
    # Recompute `__call__` in the backward pass (from the `Remat` style).
    remat: Recompute | None = None
    # The root of a model on a mesh with Explicit axes: a call that JAX's
    # sharding-in-types refuses is traced again inside `auto_axes`
    # (`runtime/regions.py`, `runtime/dispatch.py`).
    guard: bool = False
    # Context-parallel attention (the `ContextParallel` style).
    context: ContextAttention | None = None
    # Stacked experts sharded over an axis: the call moves tokens, not
    # weights (`runtime/experts.py`).
    experts: Experts | None = None

    def merge(self, other: ModuleHooks | None) -> ModuleHooks:
        """These hooks with `other`'s fields taking precedence where set."""
        if other is None:
            return self
        return ModuleHooks(
            layout=other.layout or self.layout,
            gather=other.gather or self.gather,
            methods=tuple(dict.fromkeys(self.methods + other.methods)),
            mesh=other.mesh or self.mesh,
            remat=other.remat or self.remat,
            guard=self.guard or other.guard,
            context=other.context or self.context,
            experts=other.experts or self.experts,
        )

    @property
    def guard_only(self) -> bool:
        """Only the Explicit-axes guard of a root: the call runs as written."""
        return (
            self.guard
            and self.layout is None
            and self.gather is None
            and self.remat is None
            and self.context is None
            and self.experts is None
        )

    @property
    def kind(self) -> str:
        """The prefix of the hooked class's name: `FSDP` where parameters are
        gathered per call, `Parallel` with activation layouts, `Remat` with a
        recompute only, `Guarded` for a root that only has the Explicit-axes guard."""
        if self.experts is not None:
            return "Expert"
        if self.gather is not None:
            return "FSDP"
        if self.guard_only:
            return "Guarded"
        if self.context is not None:
            return "Context"
        return "Parallel" if self.layout is not None or self.remat is None else "Remat"


# Reading installed hooks: the runtime swaps a module's class for a subclass
# that carries these two attributes (see runtime/install.py).

HOOKS_ATTR = "__nnx_parallel_hooks__"
BASE_ATTR = "__nnx_parallel_base__"


def get_hooks(module: Any) -> ModuleHooks | None:
    """The hooks installed on `module`, or None if it has none."""
    return getattr(type(module), HOOKS_ATTR, None)


def base_class(module: Any) -> type:
    """The user's class of a (possibly hooked) module."""
    return getattr(type(module), BASE_ATTR, type(module))
