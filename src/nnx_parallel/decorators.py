"""`@sharded`: declare a layer's sharding where the layer is defined."""

from __future__ import annotations

from typing import Any, TypeVar

from flax import nnx
from jax.sharding import PartitionSpec as P

from nnx_parallel.core.resolve import SPECS_ATTR
from nnx_parallel.errors import PlanError

T = TypeVar("T")


def sharded(spec: P | None = None, /, **param_specs: P):
    """Declares parameter specs on an `nnx.Module` class or instance.

    A positional spec aligns to the trailing dims of every parameter the
    module owns: `@sharded(P(None, 'model'))` gives an `(in, out)` kernel
    `P(None, 'model')` and an `(out,)` bias `P('model')`. Keyword specs name
    parameters exactly. `parallelize` applies declarations unless a plan
    pattern matches the same module; FSDP from an enclosing pattern fills in.

    Args:
      spec: A spec aligned to trailing dims of every parameter.
      **param_specs: Parameter name -> full spec; overrides `spec`.

    Returns:
      A decorator that marks the class or instance and returns it unchanged.

    Raises:
      PlanError: nothing to declare, a value that is not a PartitionSpec, or
        a target that is not an nnx.Module class or instance.

    Example:
      >>> @sharded(P(None, "model"))
      ... class Up(nnx.Linear):
      ...     pass
      >>> layer = Up(16, 32, rngs=nnx.Rngs(0))
      >>> _ = parallelize(layer, mesh8, {})
      >>> layer.kernel[...].sharding.spec, layer.bias[...].sharding.spec
      (P(None, 'model'), P('model',))
    """
    if spec is None and not param_specs:
        raise PlanError(
            "sharded() needs a spec: @sharded(P(None, 'model')) or @sharded(kernel=P(...))."
        )
    named = ({"<positional>": spec} if spec is not None else {}) | param_specs
    for name, value in named.items():
        if not isinstance(value, P):
            raise PlanError(
                f"sharded({name}={value!r}): expected a PartitionSpec such as P(None, 'model')."
            )
    declared = tuple(sorted((({"*": spec} if spec is not None else {}) | param_specs).items()))

    def apply(target: T) -> T:
        if isinstance(target, type) and issubclass(target, nnx.Module):
            setattr(target, SPECS_ATTR, declared)
        elif isinstance(target, nnx.Module):
            setattr(target, SPECS_ATTR, declared)
        else:
            raise PlanError(
                f"@sharded applies to an nnx.Module subclass or instance, got {target!r}. "
                "Decorate the class, or call sharded(spec)(layer) on an instance."
            )
        return target

    return apply


def get_declared(module: Any) -> dict[str, P] | None:
    """The specs `@sharded` declared on a module (or its class), or None.

    A positional spec is stored under `"*"`; keyword specs under their names.

    Example:
      >>> layer = sharded(P(None, "model"), bias=P(None))(nnx.Linear(4, 8, rngs=nnx.Rngs(0)))
      >>> get_declared(layer)
      {'*': P(None, 'model'), 'bias': P(None,)}
      >>> get_declared(nnx.Linear(4, 8, rngs=nnx.Rngs(0))) is None
      True
    """
    value = getattr(module, SPECS_ATTR, None)
    return dict(value) if value else None
