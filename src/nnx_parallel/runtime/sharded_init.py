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
import types
from collections.abc import Callable
from typing import Any

import jax
from flax import errors as flax_errors
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from nnx_parallel import _compat, _specs
from nnx_parallel._paths import leaf_path
from nnx_parallel.core.resolve import Resolution, resolve
from nnx_parallel.errors import PlanError
from nnx_parallel.runtime import install
from nnx_parallel.runtime.apply import apply

Factory = Callable[[], nnx.Module]

# XLA's algebraic simplifier folds chains of constant scalings (`normal(key) *
# sqrt(2) * stddev`) that eager mode evaluates one op at a time, changing the
# last bit. Initialisation runs once, so we keep eager numerics instead.
EAGER_NUMERICS = types.MappingProxyType({"xla_disable_hlo_passes": "algsimp"})
# Per-device bytes an init program creates at least (see `_chunks`).
MIN_CHUNK_BYTES = 1 << 16

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

    try:
        state = jax.eval_shape(build)
    except flax_errors.TraceContextError as e:
        raise PlanError(
            f"the factory changed state created outside it ({e}). It is traced, so it must build "
            "everything itself: write `lambda: Model(rngs=nnx.Rngs(0))`, not "
            "`rngs = nnx.Rngs(0); lambda: Model(rngs=rngs)`."
        ) from e
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
            install.uninstall(node)
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


def state_shardings(state: nnx.State, resolution: Resolution) -> list[NamedSharding]:
    """`NamedSharding` per leaf of `state`: planned params as resolved, the rest replicated."""
    mesh = resolution.mesh
    out = []
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        entry = resolution.params.get(leaf_path(keypath))
        spec = entry.spec if entry is not None else _specs.replicated(len(leaf.shape))
        out.append(NamedSharding(mesh, spec))
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
    apply(abstract, resolution)
    return abstract, resolution


@dataclasses.dataclass(frozen=True)
class InitMemory:
    """Per-device bytes of a sharded init, from XLA's compiled memory analysis.

    Attributes:
      output_bytes: The arrays one device ends up holding (all programs).
      peak_bytes: The most one device holds at once: the outputs of the
        programs already run, plus the output and scratch of the current one.
      model_bytes: The whole model (all state), unsharded.
      largest_bytes: The largest single array of the model, unsharded.
      devices: Devices in the mesh.
      programs: How many compiled programs create the model.

    Example:
      >>> mem = init_memory(lambda: TinyMLP(rngs=nnx.Rngs(0)), fsdp8, FSDP(min_size=16))
      >>> isinstance(mem, InitMemory), mem.devices, mem.programs, mem.largest_bytes
      (True, 8, 1, 4096)
    """

    output_bytes: int
    peak_bytes: int
    model_bytes: int
    largest_bytes: int
    devices: int
    programs: int


def init_memory(
    factory: Factory, mesh: Mesh, plan: Any, *, strict: bool = True, chunk_bytes: int | None = None
) -> InitMemory:
    """Compiles the sharded init of `factory` and reads its per-device memory.

    Nothing is allocated: the programs are lowered and compiled, never run.

    Example:
      >>> mem = init_memory(lambda: TinyMLP(rngs=nnx.Rngs(0)), fsdp8, FSDP(min_size=16))
      >>> mem.model_bytes, mem.output_bytes >= 8512 // 8, mem.peak_bytes < 8512
      (8512, True, True)
    """
    programs, state, _ = _prepare(factory, mesh, plan, strict, chunk_bytes)
    sizes = [_specs.nbytes(x.shape, x.dtype) for x in jax.tree.leaves(state)]
    done = peak = 0
    for _, lowered in programs:
        analysis = lowered.compile().memory_analysis()
        peak = max(peak, done + analysis.output_size_in_bytes + analysis.temp_size_in_bytes)
        done += analysis.output_size_in_bytes
    return InitMemory(
        output_bytes=int(done),
        peak_bytes=int(peak),
        model_bytes=sum(sizes),
        largest_bytes=max(sizes, default=0),
        devices=mesh.size,
        programs=len(programs),
    )


def _chunks(state, shardings, chunk_bytes: int | None) -> list[list[int]]:
    """Consecutive leaf indices, each group at most `chunk_bytes` per device.

    XLA keeps scratch for every array a program creates until it finishes
    (about one more shard each), so one program for a whole model needs far
    more scratch than the largest parameter. The default budget, a quarter
    of the largest array, keeps output plus scratch under that array's size;
    below `MIN_CHUNK_BYTES` scratch is negligible and compile time is not.
    """
    leaves = jax.tree.leaves(state)
    local = [_specs.nbytes(s.shard_shape(x.shape), x.dtype) for x, s in zip(leaves, shardings)]
    full = [_specs.nbytes(x.shape, x.dtype) for x in leaves]
    if chunk_bytes is None:
        chunk_bytes = max(max(full, default=0) // 4, max(local, default=0), MIN_CHUNK_BYTES)
    budget = chunk_bytes
    groups: list[list[int]] = []
    size = 0
    for i, n in enumerate(local):
        if not groups or size + n > budget:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += n
    return groups


def _prepare(factory, mesh, plan, strict, chunk_bytes=None):
    """Lowered init programs, each creating a group of leaves, plus the context."""
    graphdef, state = abstract_state(factory)
    resolution = resolve(nnx.merge(graphdef, state), mesh, plan, strict=strict)
    shardings = state_shardings(state, resolution)
    values = init_fn(factory, jax.tree.structure(state))
    programs = []
    for group in _chunks(state, shardings, chunk_bytes):

        def pick(group=group):
            leaves = values()
            return [leaves[i] for i in group]  # XLA drops the other leaves as dead code

        out = [shardings[i] for i in group]
        programs.append(
            (group, jax.jit(pick, out_shardings=out, compiler_options=EAGER_NUMERICS).lower())
        )
    return programs, state, (graphdef, resolution)


def sharded_init(
    factory: Factory, mesh: Mesh, plan: Any, *, strict: bool = True, chunk_bytes: int | None = None
) -> nnx.Module:
    """Builds `factory()` directly in its shards; no device holds the whole model.

    `parallelize(factory, mesh, plan)` calls this. The plan is resolved on
    abstract shapes, then `jax.jit(factory, out_shardings=...)` creates each
    array already laid out as planned (params per the plan, everything else,
    such as batch stats and RNG keys, replicated), and the hooks are
    installed as `parallelize` installs them. The arrays are created a group
    at a time (each group one compiled program, the rest of the factory
    dead code) so the scratch memory of init stays below the largest array.

    Args:
      factory: Zero-argument callable returning an `nnx.Module`. It is
        traced (under `jax.jit`), never run eagerly, so it must not read
        array values on the host.
      mesh: The mesh the plan's styles refer to.
      plan: As for `parallelize`.
      strict: If True, a pattern that matches no module raises `PlanError`.
      chunk_bytes: Per-device bytes each init program creates at most;
        default a quarter of the largest array (at least 64 KiB). Larger:
        fewer compiles, more scratch.

    Returns:
      A new, parallelized model with the same values as `factory()`.

    Example:
      >>> mlp = parallelize(lambda: TinyMLP(rngs=nnx.Rngs(0)), fsdp8, FSDP(min_size=16))
      >>> mlp.down.kernel[...].sharding.spec
      P('fsdp', None)
      >>> bool((mlp.down.kernel[...] == TinyMLP(rngs=nnx.Rngs(0)).down.kernel[...]).all())
      True
    """
    programs, state, (graphdef, resolution) = _prepare(factory, mesh, plan, strict, chunk_bytes)
    created: list = [None] * len(jax.tree.leaves(state))
    for group, lowered in programs:
        for i, value in zip(group, lowered.compile()()):
            created[i] = value
    model = nnx.merge(graphdef, jax.tree.unflatten(jax.tree.structure(state), created))
    apply(model, resolution)
    return model


def init_fn(factory: Factory, treedef: Any) -> Callable[[], list]:
    """The leaves of `factory()`'s state, as a function `jax.jit` can trace.

    `sharded_init` jits it (a group of leaves at a time) with
    `out_shardings`; lower it yourself to read compiled memory:
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
