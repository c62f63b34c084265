"""Ready-made plans: FSDP for any model, tensor parallelism for transformers,
and the layout that fits a memory budget.

`tensor_parallel(model)` reads a model's module tree (types, names, weight
shapes) and writes the Megatron plan a person would write by hand: the
in-projections of attention and MLP (q/k/v, up/gate) column-parallel, the
out-projections (o, down) row-parallel, the token embedding and LM head
vocab-parallel. Conv nets and scanned layer stacks are paired by the data
flow of one abstract trace instead (`_flow.py`): channel parallelism, a conv
sharded on its output channels feeding one sharded on its input channels.
What it cannot classify it lists in the report instead of guessing. The plan
is a plain dict: print it, edit it, pass it to `parallelize`.

`expert_parallel(model)` finds Mixture-of-Experts layers (stacked `[E, ...]`
params next to a router with E outputs) and spreads their experts over an
`'expert'` axis.

`auto(model, mesh, batch, budget_bytes=...)` compiles each candidate layout
ahead of time (data parallel, FSDP, tensor parallel, ZeRO, each with and
without `Remat` on repeated blocks) and picks the one that fits with the
fewest wire bytes.

`context_parallel(model)` puts `ContextParallel` on every attention module
(found by structure); merge it with a tensor-parallel plan and `combine`
it with FSDP for ('data', 'context', 'model') meshes.
"""

from nnx_parallel.plans._auto import AutoReport, Candidate, auto
from nnx_parallel.plans._context import context_parallel
from nnx_parallel.plans._experts import expert_parallel
from nnx_parallel.plans._recipes import PlanReport, combine, fsdp, tensor_parallel

__all__ = [
    "AutoReport",
    "Candidate",
    "PlanReport",
    "auto",
    "combine",
    "context_parallel",
    "expert_parallel",
    "fsdp",
    "tensor_parallel",
]
