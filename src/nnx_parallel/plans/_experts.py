"""The expert-parallel auto-plan: find Mixture-of-Experts layers by structure."""

from __future__ import annotations

from typing import Any

from nnx_parallel._paths import generalize
from nnx_parallel.core.experts import ExpertParallel, router_sizes
from nnx_parallel.core.graph import walk
from nnx_parallel.plans._recipes import PlanReport


def _moe_layer(module: Any, shapes: dict[str, tuple[int, ...]]) -> tuple[int, list, str] | None:
    """(E, stacked expert params, router) if `module` looks like an MoE layer:
    a router with E outputs next to at least one stack of E matrices."""
    found = []
    for router, (num, scan) in router_sizes(module, shapes).items():
        stacks = [
            n
            for n, s in shapes.items()
            if n != router and len(s) > scan and s[scan] == num and len(s) - scan >= 2
        ]
        if any(len(shapes[n]) - scan >= 3 for n in stacks):
            found.append((num, stacks, router))
    return found[0] if len(found) == 1 else None


def expert_parallel(
    model: Any,
    axis: str = "expert",
    *,
    batch_axes: tuple[str, ...] | None = None,
    capacity_factor: float | None = None,
) -> tuple[dict[str, ExpertParallel], PlanReport]:
    """A plan that spreads every Mixture-of-Experts layer's experts over `axis`.

    An MoE layer is found by structure, whatever its names: a module that
    owns params stacked `[E, ...]` (at least one stack of matrices, after
    any layer-stack dims) next to a router with E outputs (a child layer
    with a kernel, or an own 2-D param named like `router`/`gating`/`gate`).
    Repeated layers share one pattern (`blocks.*.moe`). Compose it with
    other plans by merging dicts, e.g. `plans.combine({**tp, **ep}, FSDP("data"))`.

    Args:
      model: The model (concrete or from `nnx.eval_shape`).
      axis: The mesh axis the experts are spread over.
      batch_axes: Passed to each `ExpertParallel`.
      capacity_factor: Passed to each `ExpertParallel`: a number sends each
        token by all-to-all to its experts' devices only; None gathers.

    Returns:
      `(plan, report)`: the plan dict, and a `PlanReport` whose roles name
      E, the stacked params and the router of each layer found.

    Example:
      >>> from tests.moe_models import MoEGPT
      >>> plan, report = plans.expert_parallel(MoEGPT(rngs=nnx.Rngs(0)))
      >>> plan
      {'blocks.*.moe': ExpertParallel('expert')}
      >>> report.roles["blocks.0.moe"]
      'experts: E=8 in down_proj, gate_proj, up_bias, up_proj; router router'
    """
    modules, params = walk(model)
    own: dict[str, dict[str, tuple[int, ...]]] = {}
    for owner, name, var in params.values():
        own.setdefault(owner, {})[name] = tuple(var.get_value().shape)
    plan: dict[str, ExpertParallel] = {}
    roles: dict[str, str] = {}
    unclassified: dict[str, str] = {}
    for owner, shapes in own.items():
        layer = _moe_layer(modules[owner], shapes)
        if layer is not None:
            num, stacks, router = layer
            plan[generalize(owner)] = ExpertParallel(
                axis, batch_axes=batch_axes, capacity_factor=capacity_factor
            )
            roles[owner] = f"experts: E={num} in {', '.join(stacks)}; router {router}"
        elif sum(len(s) >= 3 for s in shapes.values()) >= 2:
            unclassified[owner] = (
                f"stacked params {sorted(n for n, s in shapes.items() if len(s) >= 3)} but no "
                "single router whose output size is their leading dim; if these are experts, "
                f"add {{'{generalize(owner)}': ExpertParallel({axis!r}, num_experts=E)}}"
            )
    return plan, PlanReport(roles, unclassified)
