"""nnx-parallel: tensor parallelism, FSDP and ZeRO for unmodified Flax NNX models.

Layout: the top-level modules are what users import (`parallelize`, `plans`,
`zero`, `checkpoint`, `reshard`, `data`, `distributed`, `losses`, `mesh`);
`core/` is the pure resolution of plans to specs and hooks, `runtime/` the
only code that mutates models or runs at call time, `views/` inspection.
"""

from nnx_parallel import checkpoint, plans, zero
from nnx_parallel.accumulate import accumulate
from nnx_parallel.checkpoint import CheckpointManager, restore, save
from nnx_parallel.core.context import ContextParallel
from nnx_parallel.core.experts import ExpertParallel
from nnx_parallel.core.layouts import Layout, ModuleHooks
from nnx_parallel.core.resolve import ParamEntry, Resolution, resolve
from nnx_parallel.core.sequence import (
    SequenceColumnParallel,
    SequenceParallel,
    SequenceRowParallel,
)
from nnx_parallel.core.styles import (
    FSDP,
    ColumnParallel,
    ModuleContext,
    Remat,
    Replicated,
    RowParallel,
    Shard,
    Style,
)
from nnx_parallel.data import batch_spec, local_batch_slice, reduce_metrics, shard_batch
from nnx_parallel.decorators import get_declared, sharded
from nnx_parallel.distributed import add_distributed_flags, initialize, initialize_from_args
from nnx_parallel.errors import CheckpointError, MeshAxisError, MeshError, ParallelError, PlanError
from nnx_parallel.losses import cross_entropy
from nnx_parallel.memory import Estimate, estimate
from nnx_parallel.mesh import make_mesh
from nnx_parallel.parallelize import parallelize
from nnx_parallel.reshard import gather, move, reshard
from nnx_parallel.runtime.experts_a2a import dropped_tokens
from nnx_parallel.runtime.sharded_init import (
    InitMemory,
    abstract_parallelize,
    init_memory,
    sharded_init,
)
from nnx_parallel.runtime.trace import FallbackWarning
from nnx_parallel.views import collectives as collectives
from nnx_parallel.views import report as report
from nnx_parallel.views.render import render, treescope_renderer
from nnx_parallel.views.report import CommunicationReport, communication_report
from nnx_parallel.views.summary import explain, summary
from nnx_parallel.xla_flags import gpu_overlap_flags
from nnx_parallel.zero import ShardedOptimizer, ZeRO

__all__ = [
    "accumulate",
    "ExpertParallel",
    "FSDP",
    "ColumnParallel",
    "ContextParallel",
    "FallbackWarning",
    "MeshAxisError",
    "MeshError",
    "ModuleContext",
    "Layout",
    "ModuleHooks",
    "ParallelError",
    "ParamEntry",
    "PlanError",
    "Remat",
    "Replicated",
    "Resolution",
    "RowParallel",
    "SequenceColumnParallel",
    "SequenceParallel",
    "SequenceRowParallel",
    "Shard",
    "Style",
    "CommunicationReport",
    "communication_report",
    "cross_entropy",
    "explain",
    "render",
    "summary",
    "treescope_renderer",
    "plans",
    "ShardedOptimizer",
    "ZeRO",
    "get_declared",
    "make_mesh",
    "add_distributed_flags",
    "gpu_overlap_flags",
    "batch_spec",
    "initialize",
    "initialize_from_args",
    "local_batch_slice",
    "reduce_metrics",
    "shard_batch",
    "parallelize",
    "Estimate",
    "estimate",
    "InitMemory",
    "abstract_parallelize",
    "init_memory",
    "sharded_init",
    "gather",
    "move",
    "reshard",
    "checkpoint",
    "CheckpointManager",
    "CheckpointError",
    "restore",
    "save",
    "resolve",
    "sharded",
    "zero",
    "dropped_tokens",
]
