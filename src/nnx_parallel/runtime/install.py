"""The class swap: how a module gets its call-time hooks.

NNX has no hook registry, so a hooked module's class is swapped for a
generated subclass of its own class, as PyTorch FSDP2's `fully_shard` turns a
`Linear` into an `FSDPLinear`. The subclass is visible, not disguised:

- its name says what it does (`FSDPLinear`: gathers parameters per call;
  `ParallelLinear`: activation layouts only; see `ModuleHooks.kind`), so
  reprs and tracebacks show that the module is hooked;
- `isinstance(layer, nnx.Linear)` stays true, `base_class(layer)` is the
  user's class, and `type(layer) is nnx.Linear` is false;
- the `ModuleHooks` live on the subclass, so `nnx.split`/`merge`, `nnx.clone`
  and `nnx.jit` carry them with the graph definition;
- one subclass exists per (base class, hooks) pair, kept in `_REGISTRY`
  (`hooked_classes()` lists them), so equal hooks share a class and graph
  definitions compare equal.

Example:
  >>> layer = parallelize(nnx.Linear(16, 64, rngs=nnx.Rngs(0)), fsdp8, FSDP(min_size=16))
  >>> type(layer).__name__, isinstance(layer, nnx.Linear), base_class(layer).__name__
  ('FSDPLinear', True, 'Linear')
"""

from __future__ import annotations

from flax import nnx

from nnx_parallel import _compat
from nnx_parallel.core.layouts import BASE_ATTR, HOOKS_ATTR, ModuleHooks, base_class
from nnx_parallel.runtime import dispatch, unpickle

_compat.register_mesh_pickling()  # metadata and hooks hold the mesh

# (base class, hooks) -> the hooked subclass.
_REGISTRY: dict[tuple[type, ModuleHooks], type] = {}


def hooked_class(base: type, hooks: ModuleHooks) -> type:
    """The subclass of `base` whose `hooks.methods` run through the hooks."""
    key = (base, hooks)
    cls = _REGISTRY.get(key)
    if cls is None:
        name = f"{hooks.kind}{base.__name__}"
        namespace = {
            HOOKS_ATTR: hooks,
            BASE_ATTR: base,
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"{base.__qualname__} with nnx_parallel call-time hooks.\n\n{base.__doc__ or ''}",
        }
        for method in hooks.methods:
            namespace[method] = dispatch.wrap(getattr(base, method), method)
        namespace["__reduce_ex__"] = _reduce_ex
        namespace["__setstate__"] = _setstate
        cls = _REGISTRY[key] = type(name, (base,), namespace)
    return cls


def _reduce_ex(self, protocol):
    """Pickles a hooked module as (its user's class, its hooks) plus its state: the
    generated class has no importable name, so it is rebuilt on unpickling."""
    cls = type(self)
    rv = super(cls, self).__reduce_ex__(protocol)
    if not (isinstance(rv, tuple) and rv and rv[1] and rv[1][0] is cls):
        return rv
    hooks = getattr(cls, HOOKS_ATTR)
    return (_new_hooked, (getattr(cls, BASE_ATTR), hooks, *rv[1][1:]), *rv[2:])


def _setstate(self, state) -> None:
    """Unpickling: the base's `__setstate__`, then the arrays laid out again."""
    super(type(self), self).__setstate__(state)
    unpickle.relayout(self, getattr(type(self), HOOKS_ATTR))


def _new_hooked(base: type, hooks: ModuleHooks, *args):
    cls = hooked_class(base, hooks)
    return cls.__new__(cls, *args)


def hooked_classes() -> tuple[type, ...]:
    """Every hooked subclass created so far in this process."""
    return tuple(_REGISTRY.values())


def install(module: nnx.Module, hooks: ModuleHooks) -> None:
    """Swaps `module`'s class for the hooked subclass of its base class."""
    object.__setattr__(module, "__class__", hooked_class(base_class(module), hooks))


def uninstall(module: nnx.Module) -> None:
    """Gives `module` its user's class back (a no-op if it has no hooks)."""
    object.__setattr__(module, "__class__", base_class(module))
