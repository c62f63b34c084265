"""Remat: recompute a module's call in the backward pass."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flax import nnx
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat
from nnx_parallel.core.layouts import ModuleHooks, Recompute
from nnx_parallel.core.styles.base import ModuleContext
from nnx_parallel.errors import PlanError, did_you_mean


def resolve_policy(policy: Any) -> Recompute:
    """A `Recompute` for `Remat(policy)`; raises PlanError for an unknown name.

    Example:
      >>> from nnx_parallel.core.styles import resolve_policy
      >>> resolve_policy(None).name, resolve_policy("dots_saveable").name
      ('full', 'dots_saveable')
    """
    if policy is None:
        return Recompute()
    policies = _compat.checkpoint_policies()
    if callable(policy):
        names = [n for n, p in policies.items() if p is policy]
        return Recompute(policy, names[0] if names else getattr(policy, "__name__", repr(policy)))
    if not isinstance(policy, str):
        raise PlanError(
            f"Remat(policy={policy!r}): expected None, a policy name or a jax.checkpoint_policies "
            "policy. Write Remat() for full recompute or Remat('dots_saveable')."
        )
    if policy in policies:
        return Recompute(policies[policy], policy)
    if policy in _compat.CHECKPOINT_POLICY_FACTORIES:
        raise PlanError(
            f"Remat(policy={policy!r}): {policy!r} builds a policy from names, it is not one. "
            f"Pass the policy it builds: Remat(jax.checkpoint_policies.{policy}('my_name'))."
        )
    raise PlanError(
        f"Remat(policy={policy!r}): no checkpoint policy is called {policy!r}."
        f"{did_you_mean(policy, policies)} Known names: {sorted(policies)}."
    )


@dataclasses.dataclass(frozen=True)
class Remat:
    """Recomputes the matched module's call in the backward pass.

    Activations inside the call are not kept for the backward pass; the
    call runs again there, after the gradient of its output exists, so this
    saves memory on every backend (plain `jax.checkpoint` saves nothing on
    XLA's CPU backend; see `nnx_parallel.runtime.remat`). Parameters keep whatever
    layout other styles give them: combine it with them in a tuple
    (`{"blocks.*": (FSDP("fsdp"), Remat())}`) or give it its own pattern
    (`{"": FSDP("fsdp"), "blocks.*": Remat()}`).

    Args:
      policy: None recomputes everything (only the call's inputs are
        saved). A `jax.checkpoint_policies` policy, or the name of one
        (`"dots_saveable"`, `"dots_with_no_batch_dims_saveable"`, ...),
        saves what it allows and recomputes the rest.

    Raises:
      PlanError: `policy` names no checkpoint policy.

    Example:
      >>> mlp = TinyMLP(rngs=nnx.Rngs(0))
      >>> _ = parallelize(mlp, mesh8, {"": Replicated(), "up": Remat("dots_saveable")})
      >>> npx.core.layouts.get_hooks(mlp.up).remat.name
      'dots_saveable'
    """

    policy: Any = None
    subtree = False

    def __post_init__(self):
        resolve_policy(self.policy)  # fail at construction, not at call time

    def param_specs(self, ctx: ModuleContext) -> dict[str, P]:
        return {n: s for n, s in ctx.current.items() if s is not None}

    def hooks(self, ctx: ModuleContext, specs: Mapping[str, P]) -> ModuleHooks | None:
        if isinstance(ctx.module, (nnx.List, nnx.Dict)) or not callable(ctx.module):
            inside = f"{ctx.path}.*" if ctx.path else "*"
            raise PlanError(
                f"{self!r} matched {ctx.path or '<root>'!r} (pattern {ctx.pattern!r}), a "
                f"{type(ctx.module).__name__}, which is never called, so there is no call to "
                f"recompute. Match the modules it holds instead: {inside!r}."
            )
        return ModuleHooks(remat=resolve_policy(self.policy))
