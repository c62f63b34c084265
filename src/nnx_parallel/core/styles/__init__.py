"""Plan entries: frozen dataclasses that answer "which spec for this parameter?".

A style implements the small `Style` protocol: `param_specs(ctx)` returns the
PartitionSpec of each parameter a module owns, and `hooks(ctx, specs)` returns
the call-time layout the module needs (or None). `parallelize` never checks
for concrete style types, so a user extends the library by writing one class.

PyTorch names: `ColwiseParallel` -> `ColumnParallel`, `RowwiseParallel` ->
`RowParallel`, `fully_shard` -> `FSDP`, `NoParallel` -> `Replicated`.
"""

from nnx_parallel.core.styles.base import (
    ModuleContext,
    Style,
    as_styles,
    largest_free_dim,
)
from nnx_parallel.core.styles.fsdp import FSDP
from nnx_parallel.core.styles.remat import Remat, resolve_policy
from nnx_parallel.core.styles.tensor import ColumnParallel, Replicated, RowParallel, Shard

__all__ = [
    "FSDP",
    "ColumnParallel",
    "ModuleContext",
    "Remat",
    "Replicated",
    "RowParallel",
    "Shard",
    "Style",
    "as_styles",
    "largest_free_dim",
    "resolve_policy",
]
