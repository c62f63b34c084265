"""FSDP (ZeRO-3): parameters sharded over an axis, gathered per unit call."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat, _specs
from nnx_parallel._specs import AxisNames
from nnx_parallel.core import checks
from nnx_parallel.core.layouts import Gather, ModuleHooks
from nnx_parallel.core.styles.base import ModuleContext, _is_float_dtype, largest_free_dim
from nnx_parallel.errors import PlanError


@dataclasses.dataclass(frozen=True)
class FSDP:
    """Fully shards parameters over `axis` (ZeRO-3), gathered per module call.

    Each parameter of at least `min_size` elements is sharded over `axis` on
    its largest dim that the axis size divides and that no other style
    already shards. Over an axis of size 1 (one device) nothing is sharded
    and nothing gathered. A tensor-parallel style on the same axis as FSDP
    (or its batch axes) raises `PlanError`: use two axes (`plans.combine`).
    When its module is called, the parameter is all-gathered inside a
    `shard_map` over the batch axes, so the backward pass reduce-scatters
    its gradient: Ψ gathered + Ψ scattered per step, the
    optimum, on every backend.

    Args:
      axis: Mesh axis (or tuple of axes; a list becomes a tuple) to shard
        parameters over.
      min_size: Parameters with fewer elements stay replicated.
      batch_axes: Mesh axes the batch (dim 0 of every input) is sharded over;
        default: `axis` plus a `'data'` axis if the mesh has one.
      reshard_after_forward: True (ZeRO-3 memory): free the gathered copy
        after forward and gather again in backward (2 psi all-gathered per
        step, step memory independent of depth). False: keep it (psi
        all-gathered, memory grows with depth by one gathered layer each).
      methods: Methods that read the parameters and get the gather hook.
        Add yours (e.g. `("__call__", "encode", "decode")` for an embedder):
        a parameter read by another method is gathered by GSPMD instead, and
        under Explicit axes an embedding lookup there needs an out_sharding.
      scan_axes: Leading dims that stack layers (`nnx.vmap` + `nnx.scan`)
        and are never sharded. Stacks tagged through `transform_metadata=
        {nnx.PARTITION_NAME: ...}` are found without it (see
        `ModuleContext.stacked`). Params of such a stack that declare no
        `out_sharding` get none (see `param_metadata`).
      prefetch: 0: each module's gather waits for its own input (forward) or
        output cotangent (backward): strictly one module at a time, least
        memory. 1: it waits for the previous hooked call's input (backward:
        for the next one's cotangent), so XLA may run it while that module
        computes, holding one more gathered module.
      param_dtype: Mixed precision (FSDP2's `MixedPrecisionPolicy`): cast
        floating shards to this dtype *before* the all-gather and floating
        inputs before the call, so the module computes in it. Master params
        and optimizer state keep their dtype. None: no cast.
      reduce_dtype: Dtype gradients are reduce-scattered in (then cast back
        to the parameter's dtype). None: the gradient's own dtype.
      units: Which modules gather their subtree's params at once, as FSDP2's
        `fully_shard` units (see `core/units.py`). `"auto"`: each repeated
        block (items of an `nnx.List`, numbered layers, a scanned layer)
        under the matched module, else the matched module itself unless it
        is the root; `"module"`: each matched module; `"leaf"`: every module
        gathers its own params. One unit costs one all-gather per dtype per
        direction and one reduce-scatter per call.

    Raises:
      PlanError: `prefetch` is not 0 or 1, or a dtype is not floating.

    Example:
      >>> mlp = TinyMLP(rngs=nnx.Rngs(0))
      >>> _ = parallelize(mlp, fsdp8, FSDP("fsdp"))
      >>> mlp.up.kernel[...].sharding.spec
      P(None, 'fsdp')
    """

    axis: AxisNames = "fsdp"
    _: dataclasses.KW_ONLY
    min_size: int = 2**10
    batch_axes: tuple[str, ...] | None = None
    reshard_after_forward: bool = True
    methods: tuple[str, ...] = ("__call__", "attend")
    scan_axes: int = 0
    prefetch: int = 0
    param_dtype: Any = None
    reduce_dtype: Any = None
    units: str = "auto"
    subtree = True

    def __post_init__(self) -> None:
        checks.validate(self)  # one rule per field name: see checks.RULES
        if self.prefetch not in (0, 1):
            raise PlanError(
                f"FSDP(prefetch={self.prefetch!r}): prefetch must be 0 (one module at a time) "
                "or 1 (the next module's gather may overlap this module's compute)."
            )
        for field in ("param_dtype", "reduce_dtype"):
            dtype = getattr(self, field)
            if dtype is not None and not _is_float_dtype(dtype):
                raise PlanError(
                    f"FSDP({field}={dtype!r}): not a floating dtype. Use e.g. jnp.bfloat16 "
                    "or jnp.float32, or None to keep each parameter's dtype."
                )

    def _stacked(self, ctx: ModuleContext, name: str) -> int:
        """How many leading dims of `name` stack layers."""
        return max(self.scan_axes, len(ctx.stacked.get(name, ())))

    def _axes(self) -> tuple[str, ...]:
        return _specs.axes_of(self.axis)

    def param_specs(self, ctx: ModuleContext) -> dict[str, P]:
        ctx.check_axes(self, self.axis)
        size = _specs.size(ctx.mesh, self.axis)
        out = {}
        for name, shape in ctx.shapes.items():
            current = ctx.current.get(name)
            out[name] = current if current is not None else _specs.replicated(len(shape))
            if math.prod(shape) < self.min_size or size == 1:
                continue  # size 1: nothing to shard over (a 1-device mesh), so no gather either
            used = _specs.pad(current, len(shape))
            if set(self._axes()) & _specs.spec_axes(used):
                continue  # already sharded over this axis (parallelize called twice)
            stacked = self._stacked(ctx, name)
            if stacked > len(shape):
                raise ctx.fail(
                    self,
                    name,
                    f"scan_axes={stacked} stacks more dims than its shape {shape} has",
                    "scan_axes counts the leading layer-stack dims (1 for one nnx.scan): pass a "
                    "smaller value, or 0 when the stack is tagged with nnx.PARTITION_NAME",
                )
            best = largest_free_dim(shape, used, size, start=stacked)
            if best is not None:
                out[name] = _specs.with_dim(current, len(shape), best, self.axis)
        return out

    def param_metadata(self, ctx: ModuleContext, specs: Mapping[str, P]) -> dict[str, dict]:
        """No `out_sharding` on untagged params of a `scan_axes` stack.

        `nnx.scan(transform_metadata={nnx.PARTITION_NAME: name})` removes
        `name` from every `out_sharding` it finds and fails where it is
        missing; a param that had none cannot tell us the name. Such params
        keep none: the value's sharding and the FSDP hook carry the layout.
        """
        if not self.scan_axes:
            return {}
        return {
            n: {_compat.SHARDING_KEY: None}
            for n in ctx.shapes
            if n not in ctx.declared and n not in ctx.stacked and n in specs
        }

    def batch_axes_for(self, mesh: Mesh) -> tuple[str, ...]:
        if self.batch_axes is not None:
            return tuple(self.batch_axes)
        extra = tuple(a for a in ("data",) if a in mesh.axis_names and a not in self._axes())
        return extra + self._axes()

    def hooks(self, ctx: ModuleContext, specs: Mapping[str, P]) -> ModuleHooks | None:
        axes = set(self._axes())
        gathered = []
        for name, spec in specs.items():
            for d, entry in enumerate(spec):
                if axes & set(_specs.axes_of(entry)):
                    gathered.append((name, d - len(spec)))  # from the end: scan-proof
        if not gathered:
            return None
        methods = tuple(m for m in self.methods if callable(getattr(type(ctx.module), m, None)))
        return ModuleHooks(
            gather=Gather(
                axes=self._axes(),
                batch_axes=self.batch_axes_for(ctx.mesh),
                params=tuple(gathered),
                specs=tuple((n, tuple(s)) for n, s in specs.items()),
                reshard_after_forward=self.reshard_after_forward,
                prefetch=self.prefetch,
                param_dtype=self.param_dtype,
                reduce_dtype=self.reduce_dtype,
            ),
            methods=methods,
        )
