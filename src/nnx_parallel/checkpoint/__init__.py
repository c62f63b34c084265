"""Sharded, crash-safe checkpoints on orbax, restorable onto any mesh and plan.

`save` writes each array shard by shard (orbax / TensorStore); nothing is
gathered. `restore` first builds the target, every array a
`jax.ShapeDtypeStruct` carrying the `NamedSharding` the new plan gives it
(`abstract_parallelize`), so each device reads only its own blocks: nothing
is restored replicated and resharded afterwards. Optimizer state leaves
take the sharding of the parameter they mirror (Adam's `mu`/`nu` of
`blocks.0.mlp.up.kernel` are laid out like that kernel).

Everything goes through orbax's `CheckpointManager`: a checkpoint directory
holds one sub-directory per step, written under a temporary name and renamed
once complete (orbax's atomic finalize), so a step is either whole or absent.
One step is one orbax Composite of items:

- `model`, `optimizer`: orbax `StandardSave` trees of `nnx.to_pure_dict(state)`;
- `metadata`: the caller's JSON dict, if any;
- `nnx_parallel`: the manifest, which marks the directory as ours and lists,
  per item and array path, the shape, the dtype and a checksum of the values.

`save(path, ...)` is a manager with one step kept: the new step is complete
on disk before orbax deletes the old one, so a crash at any moment leaves
the old or the new checkpoint, never neither and never a mix.
"""

from nnx_parallel.checkpoint.manager import CheckpointManager, Restored
from nnx_parallel.checkpoint.oneshot import restore, save
from nnx_parallel.errors import CheckpointError

__all__ = ["CheckpointError", "CheckpointManager", "Restored", "restore", "save"]
