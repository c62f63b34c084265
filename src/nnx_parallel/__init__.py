"""nnx-parallel: tensor parallelism, FSDP and ZeRO for unmodified Flax NNX models."""

from nnx_parallel.decorators import get_declared, sharded
from nnx_parallel.errors import MeshError, ParallelError, PlanError
from nnx_parallel.mesh import make_mesh
from nnx_parallel.data import batch_spec, local_batch_slice, reduce_metrics, shard_batch
from nnx_parallel.distributed import add_distributed_flags, initialize, initialize_from_args
from nnx_parallel.hooks import FallbackWarning, ModuleHooks
from nnx_parallel.inspect import explain, render, summary, treescope_renderer
from nnx_parallel.report import CommunicationReport, communication_report
from nnx_parallel import plans
from nnx_parallel.losses import cross_entropy
from nnx_parallel.parallelize import parallelize
from nnx_parallel.memory import Estimate, estimate
from nnx_parallel.init import InitMemory, abstract_parallelize, init_memory, sharded_init
from nnx_parallel.reshard import gather, move, reshard
from nnx_parallel import checkpoint
from nnx_parallel.checkpoint import restore, save
from nnx_parallel.plan import ParamEntry, Resolution, resolve
from nnx_parallel.sequence import SequenceColumnParallel, SequenceParallel, SequenceRowParallel
from nnx_parallel import zero
from nnx_parallel.zero import ShardedOptimizer, ZeRO
from nnx_parallel.styles import (
    FSDP,
    ColumnParallel,
    ModuleContext,
    Remat,
    Replicated,
    RowParallel,
    Shard,
    Style,
)

__all__ = [
    "FSDP",
    "ColumnParallel",
    "FallbackWarning",
    "MeshError",
    "ModuleContext",
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
    "restore",
    "save",
    "resolve",
    "sharded",
    "zero",
]
