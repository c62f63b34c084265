"""Expert parallelism: the `ExpertParallel` style and how it finds the experts.

A Mixture-of-Experts layer keeps its experts stacked in params of shape
`[E, ...]` (`gate_proj`/`up_proj [E, D, F]`, `down_proj [E, F, D]`, fused
`gate_up [E, D, 2F]`, per-expert biases `[E, F]`), next to a router with E
outputs (an `nnx.Linear` or a raw `[D, E]` param). `ExpertParallel` shards
every such stack over one mesh axis on its expert dim, so each device owns
E / ep experts, and keeps the router replicated. At call time the tokens
move to the experts, never the weights (see `runtime/experts.py`).

Names elsewhere: torchtitan's `ExpertParallel`, MaxText's `expert` mesh axis
(`ici_expert_parallelism`), DeepSpeed's `ep_size`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from nnx_parallel import _specs
from nnx_parallel.core import checks
from nnx_parallel.core.layouts import Experts, ModuleHooks
from nnx_parallel.core.styles import ModuleContext
from nnx_parallel.errors import PlanError

ROUTER_WORDS = ("router", "gating")  # own 2-D params named like these (or "gate") route


def _lead(ctx: ModuleContext, name: str, scan: int = 0) -> int:
    """The index of `name`'s first dim after its layer-stack dims (tagged
    ones, else `scan`: the extra leading dims of the router's kernel)."""
    return len(ctx.stacked[name]) if name in ctx.stacked else scan


def router_sizes(module: Any, shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """Router name -> (its output size, its leading layer-stack dims): child
    layers with a `kernel` (`nnx.Linear`) and own params named like a router
    (`router_kernel`), each 2-D but for the dims of a scanned layer stack.

    Example:
      >>> from tests.moe_models import LoopMoE
      >>> router_sizes(LoopMoE(rngs=nnx.Rngs(0)), {})
      {'router': (8, 0)}
    """
    out = {}
    for name, child in sorted(vars(module).items()):
        kernel = getattr(child, "kernel", None) if isinstance(child, nnx.Module) else None
        if isinstance(kernel, nnx.Param) and len(kernel.get_value().shape) >= 2:
            shape = kernel.get_value().shape
            out[name] = (shape[-1], len(shape) - 2)
    for name, shape in shapes.items():
        low = name.lower()
        if len(shape) >= 2 and (low == "gate" or any(w in low for w in ROUTER_WORDS)):
            out[name] = (shape[-1], len(shape) - 2)
    return out


def expert_params(ctx: ModuleContext, num_experts: int, routers=(), scan: int = 0) -> tuple:
    """The params of `ctx.module` whose first dim after scan axes is `num_experts`."""
    return tuple(
        name
        for name, shape in ctx.shapes.items()
        if name not in routers
        and len(shape) > _lead(ctx, name, scan)
        and shape[_lead(ctx, name, scan)] == num_experts
    )


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """Shards a Mixture-of-Experts layer's stacked experts over `axis`.

    Match the module that owns the stacked expert params (`[E, ...]` on the
    first dim after scan axes). Each of them is sharded over `axis` on that
    dim: every device holds E / ep experts. The router stays replicated.
    When the layer is called, tokens travel to the experts and the weights
    stay put: for code that indexes experts one at a time (`w[i]` in a
    loop) each device runs only its own experts on the tokens gathered over
    `axis` and the outputs are reduce-scattered back (route `experts manual/as-is/as-is`);
    for code that uses whole stacks (`einsum`, `ragged_dot`) GSPMD does the
    same from the shardings (route `experts as-written/as-is/as-is`). Combine with `FSDP` in a
    tuple to shard the experts over the other axes too, and with `Remat`.

    Args:
      axis: The mesh axis the experts are spread over.
      num_experts: E; default: found from the router's output size.
      capacity_factor: None (default): every device gathers the tokens of
        the expert axis and the outputs are reduce-scattered back; exact. A
        number c > 0: each token goes by all-to-all only to the devices
        that own its top-k experts, at most ceil(c * k * T / ep) tokens from
        one device to another per call (T: a device's tokens); a token
        past that gets nothing from that device's experts, and the count is
        reported by `npx.dropped_tokens()`. The top-k is the layer's own
        (found in its code); a layer with no single `top_k` over its E
        experts keeps the gather (see `runtime/experts_a2a.py`).
      batch_axes: Mesh axes the batch (dim 0 of every input) is sharded
        over; default: a `'data'` axis if the mesh has one, then `axis`.

    Raises:
      PlanError: `axis` is not in the mesh, E is not found or not divisible
        by the axis size, or the module has no stacked expert params.

    Example:
      >>> from tests.moe_models import LoopMoE
      >>> mesh = jax.make_mesh((8,), ("expert",))
      >>> moe = parallelize(LoopMoE(rngs=nnx.Rngs(0)), mesh, ExpertParallel("expert"))
      >>> moe.gate_proj[...].sharding.spec, moe.router.kernel[...].sharding.spec
      (P('expert', None, None), P(None, None))
    """

    axis: str = "expert"
    _: dataclasses.KW_ONLY
    num_experts: int | None = None
    capacity_factor: float | None = None
    batch_axes: tuple[str, ...] | None = None
    subtree = False

    def __post_init__(self) -> None:
        checks.validate(self)
        if not isinstance(self.axis, str):
            raise PlanError(
                f"ExpertParallel(axis={self.axis!r}): experts are spread over one mesh axis. "
                "Pass its name, e.g. ExpertParallel('expert'); shard them over more axes by "
                "adding FSDP in a tuple: (ExpertParallel('expert'), FSDP('data'))."
            )
        n = self.num_experts
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise PlanError(f"ExpertParallel(num_experts={n!r}): expected an int >= 1 or None.")
        c = self.capacity_factor
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or c <= 0):
            raise PlanError(
                f"ExpertParallel(capacity_factor={c!r}): expected a number > 0 (e.g. 1.25: "
                "room for 1.25x the tokens an even split sends each device) or None (gather "
                "every token: exact, no all-to-all)."
            )

    def __repr__(self) -> str:
        extra = "".join(
            f", {f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)[1:]
            if getattr(self, f.name) != f.default
        )
        return f"ExpertParallel({self.axis!r}{extra})"

    def experts(self, ctx: ModuleContext) -> tuple[int, tuple[str, ...], int]:
        """(E, the names of the stacked expert params, untagged scan dims)."""
        routers = router_sizes(ctx.module, ctx.shapes)
        scan = max((extra for _, extra in routers.values()), default=0)
        if self.num_experts is not None:
            num = self.num_experts
            return num, expert_params(ctx, num, routers, scan), scan
        found = {n: expert_params(ctx, n, routers, scan) for n, _ in routers.values()}
        found = {n: names for n, names in found.items() if names}
        if len(found) != 1:
            sizes = {k: v[0] for k, v in routers.items()}
            why = (
                f"its routers' output sizes {sizes} match the leading dim of "
                f"{'none' if not found else 'more than one set'} of its params "
                f"{dict(ctx.shapes)}"
                if routers
                else f"it has no router (an nnx.Linear child or a 2-D param named like "
                f"{ROUTER_WORDS}) to read E from"
            )
            fix = f"Pass the number of experts: ExpertParallel({self.axis!r}, num_experts=E)"
            raise ctx.fail(self, None, why, fix)
        num, names = next(iter(found.items()))
        return num, names, scan

    def param_specs(self, ctx: ModuleContext) -> dict[str, P]:
        ctx.check_axes(self, self.axis)
        num, names, scan = self.experts(ctx)
        size = _specs.size(ctx.mesh, self.axis)
        if not names:
            raise ctx.fail(
                self,
                None,
                f"none of its params {dict(ctx.shapes)} has {num} (E) on its first dim after "
                "the layer-stack dims",
                "Match the module that owns the stacked expert params, or pass num_experts=",
            )
        if num % size:
            divisors = [d for d in ctx.mesh.devices.shape if num % d == 0] or [1]
            raise ctx.fail(
                self,
                None,
                f"its {num} experts do not split evenly over mesh axis {self.axis!r} (size {size})",
                f"Make the {self.axis!r} axis a divisor of {num} (e.g. {max(divisors)}) and "
                "put the other devices on a 'data' axis",
            )
        out = {}
        for name, shape in ctx.shapes.items():
            current = ctx.current.get(name)
            out[name] = current if current is not None else _specs.replicated(len(shape))
            if name in names:
                lead = _lead(ctx, name, scan)
                taken = _specs.pad(current, len(shape))[lead]
                if taken is not None and taken != self.axis:
                    raise ctx.fail(
                        self,
                        name,
                        f"its expert dim {lead} is already sharded over {taken!r}",
                        "Put ExpertParallel first in the tuple, before FSDP",
                    )
                out[name] = _specs.with_dim(current, len(shape), lead, self.axis)
        return out

    def batch_axes_for(self, mesh: Mesh) -> tuple[str, ...]:
        if self.batch_axes is not None:
            return tuple(self.batch_axes)
        return tuple(a for a in mesh.axis_names if a in ("data", self.axis))

    def hooks(self, ctx: ModuleContext, specs: Mapping[str, P]) -> ModuleHooks | None:
        num, names, scan = self.experts(ctx)
        dims = tuple((n, _lead(ctx, n, scan) - len(ctx.shapes[n])) for n in names)  # from the end
        return ModuleHooks(
            experts=Experts(
                axis=self.axis,
                num_experts=num,
                params=dims,
                batch_axes=self.batch_axes_for(ctx.mesh),
                capacity_factor=self.capacity_factor,
            )
        )
