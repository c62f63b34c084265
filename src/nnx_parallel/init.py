"""Sharded initialisation: create a model directly in its shards.

`parallelize(model, ...)` needs a model that already exists, and so one
device (or the host) must first hold all of it. For a model larger than a
device, hand `parallelize` a factory instead (`lambda: Model(rngs=...)`):
the plan is resolved on `nnx.eval_shape` shapes, and one `jax.jit` of the
factory with `out_shardings` creates every array in its final layout. XLA
partitions the initialisers (JAX's random bits are partitionable), so each
device computes only its own shard; values match eager init bit for bit.

`abstract_parallelize` stops before allocating: it returns the abstract
model with a `NamedSharding` on every `jax.ShapeDtypeStruct`, and the
`Resolution`, whose `bytes_per_device` previews the memory.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat, hooks
from nnx_parallel.errors import PlanError
from nnx_parallel.plan import Resolution, join, resolve

Factory = Callable[[], nnx.Module]

# XLA's algebraic simplifier folds chains of constant scalings (`normal(key) *
# sqrt(2) * stddev`) that eager mode evaluates one op at a time, changing the
# last bit. Initialisation runs once, so we keep eager numerics instead.
EAGER_NUMERICS = {"xla_disable_hlo_passes": "algsimp"}

_NOT_A_MODULE = (
    "{what} returned {type}, not an nnx.Module. Pass a zero-argument callable that builds "
    "the model, e.g. `lambda: MyModel(rngs=nnx.Rngs(0))`."
)


# Abstract models ----------------------------------------------------------------


def abstract_state(factory: Factory) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and `ShapeDtypeStruct` state of `factory()`; allocates nothing.

    Unlike `nnx.eval_shape`, plain array attributes (not wrapped in a
    Variable) come back as `ShapeDtypeStruct`s too, not as leaked tracers.
    """
    box: list[nnx.GraphDef] = []

    def build():
        model = factory()
        if not isinstance(model, nnx.Module):
            raise PlanError(_NOT_A_MODULE.format(what="the factory", type=type(model).__name__))
        graphdef, state = nnx.split(model)
        box.append(graphdef)
        return state

    state = jax.eval_shape(build)
    _check_no_static_arrays(box[0])
    return box[0], state


def _check_no_static_arrays(graphdef: nnx.GraphDef) -> None:
    # Flax files an array attribute assigned under a trace as static, so it
    # would leak the tracer; `nnx.data(...)` marks it as state.
    for name, attr in getattr(graphdef, "attributes", ()):
        if isinstance(getattr(attr, "value", None), jax.core.Tracer):
            raise PlanError(
                f"attribute {name!r} holds a plain array, which Flax treats as static while "
                "the factory is traced, so it cannot be created sharded. Wrap it as state: "
                f"`self.{name} = nnx.data(jnp.ones(...))` or `nnx.Variable(...)`."
            )


def abstract_copy(model: nnx.Module, *, fresh: bool = False) -> nnx.Module:
    """A `ShapeDtypeStruct` copy of a (concrete or abstract) model.

    With `fresh`, the copy forgets an earlier `parallelize`: hooks are
    removed and the sharding metadata nnx_parallel wrote is stripped, so a
    new plan resolves as on a model that was never parallelized.
    """
    graphdef, state = nnx.split(model)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    copy = nnx.merge(graphdef, shapes)
    if fresh:
        forget(copy)
    return copy


def forget(model: nnx.Module) -> None:
    """Removes hooks and our sharding metadata in place (keeps non-mesh names)."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module):
            hooks.uninstall(node)
        elif isinstance(node, nnx.Variable):
            meta = _compat.get_metadata(node)
            if _compat.SOURCE_KEY not in meta:
                continue
            mesh = meta.get("mesh")
            axes = set(getattr(mesh, "axis_names", ()))
            old = _compat.get_declared_spec(node, raw=True) or ()
            # Names that are no mesh axis (nnx.scan's PARTITION_NAME) stay.
            kept = tuple(e if isinstance(e, str) and e not in axes else None for e in old)
            for key in (_compat.SOURCE_KEY, "mesh", _compat.SHARDING_KEY):
                if key in meta:
                    node.del_metadata(key)
            if any(e is not None for e in kept):
                node.set_metadata(**{_compat.SHARDING_KEY: kept})


def leaf_path(keypath) -> str:
    """Dotted path of a state leaf (`blocks.0.mlp.up.kernel`), as `resolve` keys it."""
    keys = [k.key for k in keypath if isinstance(k, jax.tree_util.DictKey)]
    return join(tuple(keys))


def state_shardings(state: nnx.State, resolution: Resolution) -> list[NamedSharding]:
    """`NamedSharding` per leaf of `state`: planned params as resolved, the rest replicated."""
    mesh = resolution.mesh
    out = []
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        entry = resolution.params.get(leaf_path(keypath))
        out.append(NamedSharding(mesh, entry.spec if entry is not None else P(*([None] * len(leaf.shape)))))
    return out


def _with_shardings(state: nnx.State, shardings: list[NamedSharding]) -> nnx.State:
    leaves, treedef = jax.tree.flatten(state)
    sds = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for x, s in zip(leaves, shardings)]
    return jax.tree.unflatten(treedef, sds)


# Public API ---------------------------------------------------------------------


def abstract_parallelize(
    model: nnx.Module | Factory, mesh: Mesh, plan: Any, *, strict: bool = True
) -> tuple[nnx.Module, Resolution]:
    """Previews `parallelize` without allocating anything on any device.

    Args:
      model: A zero-argument factory returning the model, an abstract model
        (from `nnx.eval_shape`), or a concrete model (only its shapes are
        read; it is not modified).
      mesh: The mesh the plan's styles refer to.
      plan: As for `parallelize`.
      strict: If True, a pattern that matches no module raises `PlanError`.

    Returns:
      `(abstract_model, resolution)`: a copy whose every array is a
      `jax.ShapeDtypeStruct` carrying its `NamedSharding` (with the metadata
      and hooks `parallelize` would set), and the `Resolution`, from which
      `sum(e.bytes_per_device(mesh) for e in resolution.params.values())` is
      the parameter memory each device will hold.

    Example:
      >>> abstract, res = abstract_parallelize(lambda: TinyMLP(rngs=nnx.Rngs(0)), fsdp8, FSDP(min_size=16))
      >>> abstract.up.kernel.get_value().sharding.spec
      P(None, 'fsdp')
      >>> sum(e.bytes_per_device(fsdp8) for e in res.params.values())
      1064
    """
    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(abstract_copy(model))
    elif callable(model):
        graphdef, state = abstract_state(model)
    else:
        raise PlanError(_NOT_A_MODULE.format(what="the model argument", type=type(model).__name__))
    resolution = resolve(nnx.merge(graphdef, state), mesh, plan, strict=strict)
    abstract = nnx.merge(graphdef, _with_shardings(state, state_shardings(state, resolution)))
    from nnx_parallel.parallelize import apply

    apply(abstract, resolution)
    return abstract, resolution


@dataclasses.dataclass(frozen=True)
class InitMemory:
    """Per-device bytes of a sharded init, from XLA's compiled memory analysis.

    Attributes:
      output_bytes: The arrays one device ends up holding.
      temp_bytes: Scratch one device needs while creating them.
      model_bytes: The whole model (all state), unsharded.
      largest_bytes: The largest single array of the model, unsharded.
      devices: Devices in the mesh.
    """

    output_bytes: int
    temp_bytes: int
    model_bytes: int
    largest_bytes: int
    devices: int

    @property
    def peak_bytes(self) -> int:
        """Output plus temp: what one device needs at most during init."""
        return self.output_bytes + self.temp_bytes


def init_memory(factory: Factory, mesh: Mesh, plan: Any, *, strict: bool = True) -> InitMemory:
    """Compiles the sharded init of `factory` and reads its per-device memory.

    Nothing is allocated: the program is lowered and compiled, never run.

    Example:
      >>> mem = init_memory(lambda: TinyMLP(rngs=nnx.Rngs(0)), fsdp8, FSDP(min_size=16))
      >>> mem.model_bytes, mem.output_bytes >= 8512 // 8
      (8512, True)
    """
    compiled, state, _ = _prepare(factory, mesh, plan, strict)
    analysis = compiled.compile().memory_analysis()
    sizes = [math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state)]
    return InitMemory(
        output_bytes=int(analysis.output_size_in_bytes),
        temp_bytes=int(analysis.temp_size_in_bytes),
        model_bytes=sum(sizes),
        largest_bytes=max(sizes, default=0),
        devices=mesh.size,
    )


def _prepare(factory, mesh, plan, strict):
    graphdef, state = abstract_state(factory)
    resolution = resolve(nnx.merge(graphdef, state), mesh, plan, strict=strict)
    shardings = state_shardings(state, resolution)
    values = init_fn(factory, jax.tree.structure(state))
    lowered = jax.jit(values, out_shardings=shardings, compiler_options=EAGER_NUMERICS).lower()
    return lowered, state, (graphdef, resolution)


def sharded_init(factory: Factory, mesh: Mesh, plan: Any, *, strict: bool = True) -> nnx.Module:
    """Builds `factory()` directly in its shards; no device holds the whole model.

    `parallelize(factory, mesh, plan)` calls this. The plan is resolved on
    abstract shapes, then a single `jax.jit(factory, out_shardings=...)`
    creates each array already laid out as planned (params per the plan,
    everything else, such as batch stats and RNG keys, replicated), and the
    hooks are installed as `parallelize` installs them.

    Args:
      factory: Zero-argument callable returning an `nnx.Module`. It runs
        under `jax.jit`, so it must be traceable (no host reads of values).
      mesh: The mesh the plan's styles refer to.
      plan: As for `parallelize`.
      strict: If True, a pattern that matches no module raises `PlanError`.

    Returns:
      A new, parallelized model with the same values as `factory()`.

    Example:
      >>> mlp = parallelize(lambda: TinyMLP(rngs=nnx.Rngs(0)), fsdp8, FSDP(min_size=16))
      >>> mlp.down.kernel[...].sharding.spec
      P('fsdp', None)
      >>> bool((mlp.down.kernel[...] == TinyMLP(rngs=nnx.Rngs(0)).down.kernel[...]).all())
      True
    """
    lowered, state, (graphdef, resolution) = _prepare(factory, mesh, plan, strict)
    created = lowered.compile()()
    model = nnx.merge(graphdef, jax.tree.unflatten(jax.tree.structure(state), created))
    from nnx_parallel.parallelize import apply

    apply(model, resolution)
    return model


def init_fn(factory: Factory, treedef: Any) -> Callable[[], list]:
    """The function `sharded_init` jits: the leaves of `factory()`'s state.

    Lower it yourself to read the compiled memory of sharded init:
    `jax.jit(init_fn(f, treedef), out_shardings=...).lower().compile().memory_analysis()`.
    """

    def values() -> list:
        leaves, got = jax.tree.flatten(nnx.split(factory())[1])
        if got != treedef:
            raise PlanError(
                "the factory built a different model on its second call (its state structure "
                "changed). Make the factory deterministic: build everything from its own arguments."
            )
        return leaves

    return values
