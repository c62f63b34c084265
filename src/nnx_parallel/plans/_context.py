"""The context-parallel plan: `ContextParallel` on every attention module."""

from __future__ import annotations

from typing import Any

from flax import nnx

from nnx_parallel._paths import generalize, within
from nnx_parallel.core.context import ContextParallel
from nnx_parallel.core.graph import walk
from nnx_parallel.errors import PlanError
from nnx_parallel.plans._recipes import PlanReport

# Child names of an attention module's projections (last path segment, lower case).
_QUERY = frozenset({"q", "q_proj", "wq", "query", "q_einsum", "to_q"})
_KEY_VALUE = frozenset(
    {"k", "v", "k_proj", "v_proj", "wk", "wv", "key", "value", "kv_einsum", "to_k", "to_v"}
)
_FUSED = frozenset({"qkv", "qkv_proj", "wqkv", "c_attn", "qkv_einsum", "in_proj"})


def _attention_role(path: str, module: Any, children: set[str]) -> str | None:
    if isinstance(module, nnx.MultiHeadAttention):
        return "attention: nnx.MultiHeadAttention (its attention_fn)"
    fused = children & _FUSED
    if fused:
        return f"attention: fused projection {sorted(fused)[0]!r}"
    if children & _QUERY and children & _KEY_VALUE:
        names = sorted(children & (_QUERY | _KEY_VALUE))
        return f"attention: projections {names}"
    return None


def context_parallel(
    model: nnx.Module, axis: str = "context", *, strategy: str = "all_gather"
) -> tuple[dict[str, Any], PlanReport]:
    """Writes a context-parallel plan: `ContextParallel` on every attention module.

    An attention module is an `nnx.MultiHeadAttention`, or a module with a
    query projection child and a key or value one (`q`/`k`/`v`, `q_proj`,
    `wq`, `query`, `to_q`, ...) or a fused one (`qkv`, `c_attn`, ...); the
    outermost such module wins (its projections are not matched again).
    Compose it with `tensor_parallel` (heads over `'model'`: its entries are
    the projections, these are their parents) and FSDP through
    `plans.combine({**tp_plan, **cp_plan}, FSDP('fsdp'))`.

    Args:
      model: The model (concrete or from `nnx.eval_shape`); not modified.
      axis: The mesh axis the sequence is split over.
      strategy: `"all_gather"` or `"ring"` (see `ContextParallel`).

    Returns:
      `(plan, report)`: a plan dict with `*` for layer indices, and a
      `PlanReport` whose roles say why each module was picked.

    Raises:
      PlanError: `model` is not a module, or no attention module was found.

    Example:
      >>> class Block(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.attn = nnx.MultiHeadAttention(4, 32, decode=False, rngs=rngs)
      >>> plan, report = plans.context_parallel(Block(nnx.Rngs(0)))
      >>> plan
      {'attn': ContextParallel(axis='context', strategy='all_gather', seq_dim=-2, load_balance=False)}
    """
    if not isinstance(model, nnx.Module):
        raise PlanError(f"context_parallel expects an nnx.Module, got {type(model).__name__}.")
    modules, _ = walk(model)
    children: dict[str, set[str]] = {}
    for path in modules:
        if path:
            parent, _, name = path.rpartition(".")
            children.setdefault(parent, set()).add(name.lower())
    found = {p: _attention_role(p, m, children.get(p, set())) for p, m in modules.items()}
    found = {p: role for p, role in found.items() if role is not None}
    roles = {
        p: role for p, role in found.items() if not any(a != p and within(p, a) for a in found)
    }
    if not roles:
        raise PlanError(
            "plans.context_parallel: found no attention module (an nnx.MultiHeadAttention, or "
            "a module with q/k/v projection children). Write the plan by hand: "
            f"{{'<path of your attention module>': ContextParallel({axis!r})}}."
        )
    style = ContextParallel(axis, strategy=strategy)
    plan = {generalize(p): style for p in roles}
    return plan, PlanReport(roles, {}, ())
