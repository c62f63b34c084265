"""The hand-written plans: FSDP for any model, FSDP around a TP plan, and the
tensor-parallel auto-plan for transformers."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from nnx_parallel.core.graph import walk
from nnx_parallel.core.layers import weight_name
from nnx_parallel.core.sequence import SequenceColumnParallel, SequenceRowParallel
from nnx_parallel.core.styles import FSDP, ColumnParallel, Replicated, RowParallel, as_styles
from nnx_parallel.errors import PlanError
from nnx_parallel.plans._classify import (
    _check_pairs,
    _classify,
    _Draft,
    _drop_unfit,
    _flow_roles,
    _generalize,
    _place_embeddings,
    _place_projection,
    _sequence_norms,
)


@dataclasses.dataclass(frozen=True)
class PlanReport:
    """What `tensor_parallel` decided, and what it left alone.

    Attributes:
      roles: Module path -> the role it was given ("column: attention q", ...).
      unclassified: Module path -> why it was left replicated. Look at these:
        a layer the planner does not know may deserve a plan entry.
      notes: Anything worth a second look (fused qkv, unpaired column layers).

    Example:
      >>> class Odd(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.q_proj = nnx.Linear(16, 16, rngs=rngs)
      ...         self.mystery = nnx.Linear(16, 16, rngs=rngs)
      >>> _, report = plans.tensor_parallel(Odd(nnx.Rngs(0)))
      >>> report.roles["q_proj"], list(report.unclassified)
      ("column: in-projection named 'q_proj'", ['mystery'])
    """

    roles: Mapping[str, str]
    unclassified: Mapping[str, str]
    notes: tuple[str, ...] = ()

    def __str__(self) -> str:
        lines = [f"{path or '<root>':40} {role}" for path, role in self.roles.items()]
        lines += [f"{path:40} UNCLASSIFIED: {why}" for path, why in self.unclassified.items()]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def fsdp(
    axis: str | tuple[str, ...] = "fsdp",
    *,
    min_size: int = 2**10,
    batch_axes: tuple[str, ...] | None = None,
    reshard_after_forward: bool = True,
) -> dict[str, FSDP]:
    """A plan that fully shards every parameter of any model (ZeRO-3).

    Args:
      axis: Mesh axis (or axes) to shard parameters over.
      min_size: Parameters with fewer elements stay replicated.
      batch_axes: Mesh axes the batch is sharded over (see `FSDP`).
      reshard_after_forward: Free gathered parameters after forward.

    Returns:
      `{"": FSDP(...)}`: the root pattern, so the whole tree is covered.

    Example:
      >>> mlp = TinyMLP(rngs=nnx.Rngs(0))
      >>> _ = parallelize(mlp, fsdp8, plans.fsdp(min_size=64))
      >>> mlp.up.kernel[...].sharding.spec
      P(None, 'fsdp')
    """
    return {
        "": FSDP(
            axis,
            min_size=min_size,
            batch_axes=batch_axes,
            reshard_after_forward=reshard_after_forward,
        )
    }


def combine(tp_plan: Mapping[str, Any], fsdp: FSDP | None = None) -> dict[str, Any]:
    """Adds FSDP around a tensor-parallel plan, for 2D/3D meshes.

    On a `('fsdp', 'model')` or `('data', 'fsdp', 'model')` mesh, the
    tensor-parallel entries shard over `'model'` and FSDP shards what they
    leave (the other dim of TP weights, norms, embeddings) over `'fsdp'`;
    a `'data'` axis just shards the batch. `Replicated()` entries of the TP
    plan become FSDP entries: replicated over `'model'`, sharded over `'fsdp'`.

    Args:
      tp_plan: A plan dict, e.g. from `tensor_parallel`.
      fsdp: The FSDP style; default `FSDP('fsdp')`.

    Returns:
      A new plan dict; `tp_plan` is not changed.

    Raises:
      PlanError: `tp_plan` is not a dict, `fsdp` is not a subtree style
        (such as `FSDP`), or a plan value is not a style.

    Sequence-parallel plans compose too: a row layer's fused FSDP + TP call
    reduce-scatters its output onto the sequence dim.

    Example:
      >>> mesh = jax.make_mesh((2, 4), ("fsdp", "model"))
      >>> mlp = TinyMLP(rngs=nnx.Rngs(0))
      >>> tp = {"up": ColumnParallel("model"), "down": RowParallel("model")}
      >>> _ = parallelize(mlp, mesh, plans.combine(tp, FSDP("fsdp", min_size=64)))
      >>> mlp.up.kernel[...].sharding.spec
      P('fsdp', 'model')
    """
    if not isinstance(tp_plan, Mapping):
        raise PlanError(
            f"plans.combine: tp_plan must be a dict pattern -> style, got {type(tp_plan).__name__} "
            f"{tp_plan!r:.60}. Pass e.g. plans.tensor_parallel(model) or "
            "{'layers.*.mlp.up': ColumnParallel('model')}."
        )
    if fsdp is not None and not (isinstance(fsdp, FSDP) or getattr(fsdp, "subtree", False)):
        raise PlanError(
            "plans.combine: fsdp must be an FSDP style (or another subtree style), got "
            f"{fsdp!r:.60}. Pass e.g. FSDP('fsdp')."
        )
    fsdp = FSDP("fsdp") if fsdp is None else fsdp
    out: dict[str, Any] = {"": fsdp}
    for pattern, entry in tp_plan.items():
        styles = as_styles(entry)
        if (
            all(isinstance(s, Replicated) for s in styles)
            or pattern == ""
            and all(s.subtree for s in styles)
        ):
            out[pattern] = fsdp
        else:
            out[pattern] = entry
    return out


# Tensor parallel auto-plan --------------------------------------------------------


def tensor_parallel(
    model: nnx.Module,
    axis: str = "model",
    *,
    sequence_parallel: bool = False,
    vocab_parallel: bool = True,
    mesh: Mesh | None = None,
    example: Any = None,
) -> tuple[dict[str, Any], PlanReport]:
    """Writes a Megatron tensor-parallel plan for a transformer.

    Layers are classified by module type, weight shape and the names public
    code uses (`q_proj`, `wq`, `query`, `q_einsum`, fused `qkv`, `up`/`gate`/
    `down`, `w1`/`w2`/`w3`, `fc1`/`fc2`, `linear1`/`linear2`, `o_proj`, `out`,
    `proj`, ...). In-projections get `ColumnParallel`, out-projections
    `RowParallel`: one all-reduce per attention and one per MLP in forward.
    Einsum kernels shard their head letter (`ColumnParallel(dim=...)`), not
    a q/k/v stack letter or the head size. A pair of unnamed layers d -> f -> d
    in one parent is read as an MLP. Layers it cannot place are reported, not
    guessed, and stay replicated.

    Args:
      model: The model (concrete or from `nnx.eval_shape`); not modified.
      axis: The tensor-parallel mesh axis.
      sequence_parallel: Megatron-SP: norms of the model width get
        `SequenceParallel`, in-projections all-gather the sequence first,
        out-projections and the embedding reduce-scatter onto it. (Dropout
        layers are left to you: `SequenceParallel` works on them too.)
      vocab_parallel: Shard the token embedding (`RowParallel`: vocab rows)
        and the LM head (`ColumnParallel`: logits sharded on vocab; use
        `cross_entropy` on them). False leaves both replicated.
      mesh: If given, each entry is checked against it and layers whose
        dims the axis does not divide (e.g. 2 key/value heads on 8 devices)
        are reported as unclassified and left replicated, instead of making
        `parallelize` raise.
      example: Positional args of one model call (arrays or
        `ShapeDtypeStruct`s), traced abstractly to read the data flow of a
        model with convs or layer stacks (see below). None: guessed from
        the layers.

    Conv nets and layer stacks (`nnx.vmap` + `nnx.scan`) are planned by data
    flow, not names: the model is traced once abstractly (nothing runs; see
    `plans._flow`) and a layer whose output reaches only the next layer,
    through elementwise ops, pooling, per-channel norms (`BatchNorm`, a
    `GroupNorm` whose groups the axis divides) or dropout, gets
    `ColumnParallel` (output channels) and that layer `RowParallel` (input
    channels): channel parallelism, one all-reduce per pair. Stacked pairs
    shard the dims after the layer axis; a stacked block with one layer is
    `RowParallel` (its output is the next layer's input). Layers with no
    such partner (a skip concatenation after them, a residual sum before
    their partner) stay replicated and are reported with the reason.

    Returns:
      `(plan, report)`: a plan dict with `*` for layer indices, and a
      `PlanReport` of roles, unclassified layers and notes.

    Example:
      >>> plan, report = plans.tensor_parallel(TinyMLP(rngs=nnx.Rngs(0)))
      >>> {pattern: type(style).__name__ for pattern, style in plan.items()}
      {'down': 'RowParallel', 'up': 'ColumnParallel'}
      >>> _ = parallelize(mlp := TinyMLP(rngs=nnx.Rngs(0)), mesh8, plan)
      >>> mlp.up.kernel[...].sharding.spec, mlp.down.kernel[...].sharding.spec
      (P(None, 'model'), P('model', None))

      A conv net is planned by data flow (channel parallelism):

      >>> rngs = nnx.Rngs(0)
      >>> convs = nnx.Sequential(
      ...     nnx.Conv(3, 16, (3, 3), rngs=rngs), nnx.relu, nnx.Conv(16, 8, (3, 3), rngs=rngs)
      ... )
      >>> image = jax.ShapeDtypeStruct((1, 8, 8, 3), "float32")
      >>> plan, _ = plans.tensor_parallel(convs, example=image)
      >>> {pattern: type(style).__name__ for pattern, style in plan.items()}
      {'layers.0': 'ColumnParallel', 'layers.2': 'RowParallel'}
    """
    if not isinstance(model, nnx.Module):
        raise PlanError(f"tensor_parallel expects an nnx.Module, got {type(model).__name__}.")
    modules, params = walk(model)
    own: dict[str, dict[str, tuple]] = {}
    for _, (owner, name, var) in params.items():
        own.setdefault(owner, {})[name] = tuple(var.get_value().shape)
    draft = _Draft(
        column=SequenceColumnParallel if sequence_parallel else ColumnParallel,
        row=SequenceRowParallel if sequence_parallel else RowParallel,
        axis=axis,
        vocab_parallel=vocab_parallel,
    )
    embeds = {p: own[p] for p, m in modules.items() if isinstance(m, nnx.Embed) and p in own}
    token = _place_embeddings(draft, embeds)
    vocab = embeds[token]["embedding"][0] if token else None
    weighted = {p: shapes for p, shapes in own.items() if p not in embeds and weight_name(shapes)}
    by_flow = _flow_roles(model, modules, weighted, example, draft, mesh)
    rest = {p: s for p, s in weighted.items() if p not in by_flow and p not in draft.unclassified}
    classified = {**_classify(rest, modules, vocab, draft.unclassified), **by_flow}
    for path, (role, why) in classified.items():
        _place_projection(draft, path, modules[path], weighted[path], role, why)
    if token is not None and vocab_parallel and all(r != "head" for r, _ in classified.values()):
        draft.notes.append(
            f"{token}: no LM head layer found; if logits come from {token}.attend (tied "
            "weights) they are vocab-sharded too: use cross_entropy on them."
        )
    if sequence_parallel:
        d_model = embeds[token]["embedding"][1] if token else None
        _sequence_norms(draft, modules, own, d_model)
    if mesh is not None:
        _drop_unfit(draft, model, mesh)
    _check_pairs(draft.styles, draft.notes)
    roles = {p: draft.roles[p] for p in modules if p in draft.roles}
    return _generalize(draft.styles), PlanReport(roles, draft.unclassified, tuple(draft.notes))
