"""Moving a parallelized model to another plan or mesh, device to device.

`jax.device_put(x, sharding)` is the obvious tool, but when the target's
blocks are not blocks the source already holds it fetches the whole array
to the host and scatters it again; and a compiled identity with new
`out_shardings` needs one device set and may replicate the whole array on
every device first ("involuntary full rematerialization"). `move` instead
builds each target shard on its device from the pieces of the source shards
that overlap it: only those pieces travel, device to device, whatever the
two meshes are.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, Sharding
from jax.sharding import PartitionSpec as P

from nnx_parallel import _specs
from nnx_parallel._compat import host_copy
from nnx_parallel._paths import leaf_path
from nnx_parallel.core.graph import walk
from nnx_parallel.core.resolve import resolve
from nnx_parallel.errors import ParallelError
from nnx_parallel.parallelize import refuse_under_trace
from nnx_parallel.runtime.apply import apply, transaction
from nnx_parallel.runtime.sharded_init import abstract_copy, forget
from nnx_parallel.zero import OPT_KEY

# Moving arrays ------------------------------------------------------------------


def move(x: Any, sharding: Sharding) -> jax.Array:
    """Lays `x` out as `sharding`, moving only overlapping pieces device to device.

    For each device of `sharding`, the source shards that overlap its block
    are sliced on the device that holds them (one copy per distinct block,
    preferring one already on the target device), copied to the target
    device and assembled there. No host transfer, no device holds more than
    its old and new shards, and any two meshes work (other devices, sizes,
    orders, Auto or Explicit axes).

    Args:
      x: A `jax.Array` (anything else is placed with `jax.device_put`).
      sharding: The target layout.

    Returns:
      `x` laid out as `sharding`, bit-identical.

    Raises:
      ParallelError: `sharding` is not a `jax.sharding.Sharding` (e.g. a bare
        PartitionSpec, which has no mesh).

    Example:
      >>> x = jax.device_put(jax.numpy.arange(16.0).reshape(8, 2), jax.NamedSharding(fsdp8, P("fsdp")))
      >>> mesh4 = jax.make_mesh((2, 2), ("data", "model"), devices=jax.devices()[4:])
      >>> y = move(x, jax.NamedSharding(mesh4, P("data", "model")))
      >>> y.sharding.spec, sorted(d.id for d in y.devices()), bool((jax.device_get(y) == jax.device_get(x)).all())
      (P('data', 'model'), [4, 5, 6, 7], True)
    """
    if not isinstance(sharding, Sharding):
        spec = isinstance(sharding, P)
        raise ParallelError(
            "move: expected a jax.sharding.Sharding, got "
            f"{'a PartitionSpec' if spec else type(sharding).__name__} {sharding!r:.60}. "
            + (
                "A spec needs its mesh: pass jax.NamedSharding(mesh, spec)."
                if spec
                else "Pass e.g. jax.NamedSharding(mesh, P(...))."
            )
        )
    if not isinstance(x, jax.Array) or not x.is_fully_addressable or x.size == 0:
        return jax.device_put(x, sharding)
    if (
        x.sharding.is_equivalent_to(sharding, x.ndim)
        and x.sharding.device_set == sharding.device_set
    ):
        return jax.device_put(x, sharding)  # same blocks on the same devices: no data moves
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        data = move(jax.random.key_data(x), _widen(sharding, x.ndim))
        return jax.device_put(jax.random.wrap_key_data(data, impl=impl), sharding)
    sources = _source_blocks(x)
    shards = []
    for device, index in sharding.addressable_devices_indices_map(x.shape).items():
        target = _bounds(index, x.shape)
        shards.append(_assemble(x, target, device, sources))
    return jax.make_array_from_single_device_arrays(x.shape, sharding, shards)


def _widen(sharding: Sharding, ndim: int) -> Sharding:
    """The sharding of a key array's data (one trailing, unsharded dim)."""
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim - len(tuple(sharding.spec)) + 1)
        return NamedSharding(sharding.mesh, P(*spec))
    return sharding


def _bounds(index: tuple, shape: tuple) -> tuple[tuple[int, int], ...]:
    out = []
    for i, n in zip(tuple(index) + (slice(None),) * (len(shape) - len(index)), shape):
        start, stop, _ = i.indices(n)
        out.append((start, stop))
    return tuple(out)


def _source_blocks(x: jax.Array) -> dict[tuple, list]:
    """Distinct source block bounds -> the single-device arrays holding it."""
    blocks: dict[tuple, list] = {}
    for shard in x.addressable_shards:
        blocks.setdefault(_bounds(shard.index, x.shape), []).append(shard.data)
    return blocks


def _assemble(x, target, device, sources) -> jax.Array:
    """The block `target` of `x`, on `device`, from overlapping source pieces."""
    shape = tuple(b - a for a, b in target)
    pieces = []
    for block, holders in sources.items():
        overlap = tuple((max(a, c), min(b, d)) for (a, b), (c, d) in zip(target, block))
        if any(a >= b for a, b in overlap):
            continue
        data = next((h for h in holders if h.devices() == {device}), holders[0])
        if overlap != block:  # dynamic starts: one compiled slice per piece shape
            starts = [a - c for (a, _), (c, _) in zip(overlap, block)]
            data = jax.lax.dynamic_slice(data, starts, [b - a for a, b in overlap])
        pieces.append((overlap, jax.device_put(data, device)))
        if overlap == target:
            return pieces[-1][1]
    out = jnp.zeros(shape, x.dtype, device=device)
    for overlap, piece in pieces:
        out = jax.lax.dynamic_update_slice(
            out, piece, [a - t for (a, _), (t, _) in zip(overlap, target)]
        )
    return out


# Models ---------------------------------------------------------------------------


def reshard(
    model: nnx.Module,
    mesh: Mesh,
    plan: Any,
    *,
    strict: bool = True,
    optimizer: nnx.Pytree | None = None,
) -> nnx.Module:
    """Moves a model to another plan and/or mesh, in place.

    Unlike a second `parallelize` (which only composes), this forgets the
    old plan: its hooks are removed and the new plan is resolved on the
    model's shapes as if it had never been parallelized. Every array then
    moves device to device (see `move`): params to their new layout,
    everything else replicated on the new mesh. Values are bit-identical.
    Pass the model's `optimizer` to move its state too: leaves that mirror
    a parameter (Adam's `mu`/`nu`) take that parameter's new sharding, the
    rest are replicated.

    Args:
      model: A module, parallelized or not; modified in place.
      mesh: The new mesh (it may use other devices than the old one).
      plan: The new plan, as for `parallelize`.
      strict: If True, a pattern that matches no module raises `PlanError`.
      optimizer: An `nnx.Optimizer` of `model` whose state moves along, in place.

    Raises:
      ParallelError: `optimizer` is not optimizer state (an optax transform),
        or its state is laid out for another model's parameters (another
        architecture, devices or layout). Nothing is moved.

    Returns:
      The same `model`, for chaining.

    Example:
      >>> mlp = parallelize(TinyMLP(rngs=nnx.Rngs(0)), fsdp8, FSDP(min_size=16))
      >>> _ = reshard(mlp, mesh2x4, {"up": ColumnParallel(), "down": RowParallel()})
      >>> mlp.up.kernel[...].sharding.spec, mlp.down.kernel[...].sharding.mesh.shape["data"]
      (P(None, 'model'), 2)
    """
    refuse_under_trace(model, "reshard")
    _check_optimizer(model, optimizer)
    resolution = resolve(abstract_copy(model, fresh=True), mesh, plan, strict=strict)
    with transaction() as undo:
        for _, node in [*nnx.iter_graph(model), *nnx.iter_graph(optimizer or [])]:
            if isinstance(node, nnx.Module):
                undo.save_class(node)
            elif isinstance(node, nnx.Variable):
                undo.save_variable(node)
        forget(model)
        _move_state(model, resolution)
        apply(model, resolution, undo)
        if optimizer is not None:
            _move_optimizer(optimizer, resolution)
    return model


def _check_optimizer(model: nnx.Module, optimizer: Any) -> None:
    """Raises unless `optimizer` is NNX optimizer state laid out for `model`'s parameters.

    Nothing links an `nnx.Optimizer` to its model, so this checks what can be
    seen: each state leaf that mirrors a parameter (its path ends with the
    parameter's path, same shape) sits on that parameter's devices, with its
    layout. Another model's optimizer with the same architecture and layout
    cannot be told apart.
    """
    if optimizer is None:
        return
    if not isinstance(optimizer, nnx.Pytree):
        what = "an optax transform" if isinstance(optimizer, tuple) else type(optimizer).__name__
        raise ParallelError(
            f"reshard(optimizer=...) got {what}, not optimizer state: there is nothing to move. "
            "Pass the nnx.Optimizer built for this model, e.g. "
            "opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param); reshard(..., "
            "optimizer=opt). Nothing was moved."
        )
    params = {tuple(p.split(".")): v for p, (_, _, v) in walk(model)[1].items()}
    leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(optimizer)))[0]
    arrays = [(kp, x) for kp, x in leaves if np.ndim(x) > 0]
    mirrored = [(kp, x, v) for kp, x in arrays if (v := _mirrored(kp, x, params)) is not None]
    if arrays and params and not mirrored:
        raise ParallelError(
            f"reshard(optimizer=...): no state leaf of this {type(optimizer).__name__} mirrors a "
            f"parameter of the model (e.g. {leaf_path(arrays[0][0])!r} of shape "
            f"{np.shape(arrays[0][1])}): it is the optimizer of another model. Pass the "
            "optimizer built for this model. Nothing was moved."
        )
    for keypath, leaf, var in mirrored:
        if not _laid_out_like(leaf, var):
            raise ParallelError(
                f"reshard(optimizer=...): {leaf_path(keypath)!r} is laid out as "
                f"{_layout(leaf)}, but the parameter it mirrors is {_layout(var.get_value())}"
                ": this is the optimizer of another model (or one built before the model was "
                "parallelized). Pass the optimizer built for this model, after parallelize. "
                "Nothing was moved."
            )


def _mirrored(keypath, leaf, params: dict) -> nnx.Variable | None:
    keys = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in keypath)
    for start in range(len(keys)):
        var = params.get(keys[start:])
        if var is not None and np.shape(var.get_value()) == np.shape(leaf):
            return var
    return None


def _layout(x) -> str:
    sharding = getattr(x, "sharding", None)
    spec = getattr(sharding, "spec", None)
    devices = len(getattr(sharding, "device_set", ()))
    return f"{spec if spec is not None else type(sharding).__name__} on {devices} device(s)"


def _laid_out_like(leaf, var: nnx.Variable) -> bool:
    """Same devices as the parameter, and its spec (or ZeRO's optimizer spec) where named."""
    a, b = getattr(leaf, "sharding", None), getattr(var.get_value(), "sharding", None)
    if a is None or b is None:
        return True
    if a.device_set != b.device_set:
        return False
    if not (hasattr(a, "spec") and hasattr(b, "spec")):
        return True
    want = var.get_metadata().get(OPT_KEY) or b.spec
    ndim = np.ndim(leaf)
    return _specs.pad(a.spec, ndim) == _specs.pad(want, ndim)


def _move_state(model: nnx.Module, resolution) -> None:
    """Moves every array of `model` to its new sharding before `apply` runs.

    `apply` would `jax.device_put` them, which can go through the host.
    """
    _, state = nnx.split(model)
    mesh = resolution.mesh
    moved = []
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        entry = resolution.params.get(leaf_path(keypath))
        spec = entry.spec if entry is not None else _specs.replicated(len(np.shape(leaf)))
        moved.append(move(leaf, NamedSharding(mesh, spec)))
    nnx.update(model, jax.tree.unflatten(jax.tree.structure(state), moved))


def _move_optimizer(optimizer: nnx.Pytree, resolution) -> None:
    state = nnx.state(optimizer)
    moved = jax.tree_util.tree_map_with_path(
        lambda keypath, x: move(x, mirror_sharding(keypath, x.shape, resolution)),
        nnx.to_pure_dict(state),
    )
    nnx.replace_by_pure_dict(state, moved)
    nnx.update(optimizer, state)


def mirror_sharding(keypath, shape: tuple, resolution) -> NamedSharding:
    """The sharding of an optimizer leaf: its parameter's, if it mirrors one.

    A leaf mirrors a parameter when its path ends with the parameter's path
    and it has the parameter's shape (`opt_state.0.mu.up.kernel` mirrors
    `up.kernel`); it takes the parameter's optimizer layout (`ZeRO`'s
    `optimizer_sharding`) if the plan gives one, else the parameter's spec.
    Anything else (step counts) is replicated.

    Example:
      >>> res = resolve(nnx.eval_shape(lambda: TinyMLP(rngs=nnx.Rngs(0))), mesh8, {"up": ColumnParallel()})
      >>> keypath = [jax.tree_util.DictKey(k) for k in ("opt_state", 0, "mu", "up", "kernel")]
      >>> mirror_sharding(keypath, (16, 64), res).spec
      P(None, 'model')
    """
    keys = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in keypath)
    by_path = {tuple(p.split(".")): e for p, e in resolution.params.items()}
    for start in range(len(keys)):
        entry = by_path.get(keys[start:])
        if entry is not None and tuple(entry.shape) == tuple(shape):
            spec = dict(entry.metadata).get(OPT_KEY) or entry.spec
            return NamedSharding(resolution.mesh, P(*spec))
    return NamedSharding(resolution.mesh, _specs.replicated(len(shape)))


def gather(model: nnx.Module | nnx.State) -> nnx.State:
    """A host (numpy) copy of a model's whole state, for export.

    This materialises every array, unsharded, in host memory: for a model
    larger than one host, save a sharded checkpoint instead. Typed PRNG keys
    become their raw `uint32` key data. Under `jax.distributed`, arrays that
    span processes are all-gathered across them (`process_allgather`): every
    process must call `gather`, and each gets the whole copy.

    Args:
      model: A module (parallelized or not) or an `nnx.State`.

    Returns:
      An `nnx.State` with the same structure whose leaves are `np.ndarray`s.

    Example:
      >>> mlp = parallelize(TinyMLP(rngs=nnx.Rngs(0)), fsdp8, FSDP(min_size=16))
      >>> host = gather(mlp)
      >>> type(host["up"]["kernel"][...]).__name__, host["up"]["kernel"][...].shape
      ('ndarray', (16, 64))
    """
    state = model if isinstance(model, nnx.State) else nnx.state(model)

    def to_host(x):
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return host_copy(x)

    return jax.tree.map(to_host, state)
