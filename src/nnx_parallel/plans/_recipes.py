"""The hand-written plans: FSDP for any model, FSDP around a TP plan, and the
tensor-parallel auto-plan for transformers."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from nnx_parallel._paths import generalize
from nnx_parallel.core.graph import walk
from nnx_parallel.core.layers import einsum_parts, in_out_sizes, weight_name
from nnx_parallel.core.resolve import resolve
from nnx_parallel.core.sequence import SequenceColumnParallel, SequenceParallel, SequenceRowParallel
from nnx_parallel.core.stacks import layer_stacks
from nnx_parallel.core.styles import FSDP, ColumnParallel, Replicated, RowParallel, as_styles
from nnx_parallel.errors import ParallelError, PlanError
from nnx_parallel.plans._flow import flow_roles, trace_flow

# Names public transformer code gives its layers (last path segment, lower case).
COLUMN_NAMES = frozenset(
    {
        "q",
        "k",
        "v",
        "q_proj",
        "k_proj",
        "v_proj",
        "wq",
        "wk",
        "wv",
        "query",
        "key",
        "value",
        "q_einsum",
        "kv_einsum",
        "qkv_einsum",
        "qkv",
        "qkv_proj",
        "wqkv",
        "c_attn",
        "in_proj",
        "query_key_value",
        "to_q",
        "to_k",
        "to_v",
        "to_qkv",
        "up",
        "up_proj",
        "gate",
        "gate_proj",
        "w1",
        "w3",
        "fc1",
        "linear1",
        "c_fc",
        "wi",
        "wi_0",
        "wi_1",
        "fc_in",
        "dense_h_to_4h",
        "gating_einsum",
        "w_in",
        "w_up",
        "w_gate",
    }
)
ROW_NAMES = frozenset(
    {
        "o",
        "o_proj",
        "wo",
        "out",
        "out_proj",
        "proj",
        "attn_out",
        "c_proj",
        "attn_vec_einsum",
        "to_out",
        "dense",
        "down",
        "down_proj",
        "w2",
        "fc2",
        "linear2",
        "fc_out",
        "dense_4h_to_h",
        "w_out",
        "w_down",
        "linear_einsum",
    }
)
FUSED_QKV_NAMES = frozenset(
    {"qkv", "qkv_proj", "wqkv", "c_attn", "in_proj", "query_key_value", "to_qkv"}
)
POSITION_NAMES = ("pos", "wpe", "position")
HEAD_NAMES = frozenset({"head", "lm_head", "unembed", "output", "logits", "out_head", "decoder"})


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


@dataclasses.dataclass
class _Draft:
    """A tensor-parallel plan being written: styles, roles, unclassified, notes."""

    column: type
    row: type
    axis: str
    vocab_parallel: bool
    styles: dict[str, Any] = dataclasses.field(default_factory=dict)
    roles: dict[str, str] = dataclasses.field(default_factory=dict)
    unclassified: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)


_NO_MESH = types.SimpleNamespace(axis_names=())  # layer stacks without a mesh: no axis names


def _flow_roles(model, modules, weighted, example, draft: _Draft, mesh) -> dict:
    """Roles of the conv and stacked layers, by data flow (see `plans._flow`).

    Traced only where the model has convs or layer stacks. Convs are never
    classified by name: without a partner by data flow (or without a
    trace) they stay replicated, with the reason. Stacked Linear/Einsum
    layers the flow leaves unpaired (attention projections, whose partner
    is past the attention's own matmuls) go on to the name rules.
    """
    stacked = layer_stacks(walk(model)[1], mesh or _NO_MESH, modules)
    convs = [p for p in weighted if isinstance(modules[p], (nnx.Conv, nnx.ConvTranspose))]
    governed = convs + [
        p for p in weighted if p not in convs and any(k.startswith(p + ".") for k in stacked)
    ]
    if not governed:
        return {}
    flow = trace_flow(model, example, local=_fits(mesh, draft.axis), named=_named)
    if flow.error is not None:
        for p in convs:
            draft.unclassified[p] = f"no data flow ({flow.error}); left replicated"
        return {}
    roles, unpaired = flow_roles(flow, governed)
    draft.unclassified.update({p: why for p, why in unpaired.items() if p in convs})
    return roles


def _named(path: str, role: str) -> bool:
    """Whether the last segment of `path` is a name public code gives `role`."""
    return path.rpartition(".")[2].lower() in (COLUMN_NAMES if role == "column" else ROW_NAMES)


def _fits(mesh: Mesh | None, axis: str):
    """A GroupNorm keeps channels apart if the axis size divides its groups."""
    size = dict(mesh.shape).get(axis, 1) if mesh is not None else 1

    def local(module) -> bool:
        return isinstance(module, nnx.GroupNorm) and module.num_groups % size == 0

    return local


def _place_embeddings(draft: _Draft, embeds) -> str | None:
    """Positions stay replicated; the token embedding is vocab-parallel. Returns its path."""
    token, positions = _split_embeddings(embeds)
    for path in positions:
        draft.roles[path] = "replicated: position embedding"
    if token is not None and draft.vocab_parallel:
        draft.styles[token] = draft.row(draft.axis)
        draft.roles[token] = "vocab-parallel embedding (rows sharded)"
    elif token is not None:
        draft.roles[token] = "replicated: token embedding (vocab_parallel=False)"
    return token


def _place_projection(draft: _Draft, path: str, module, shapes, role: str, why: str) -> None:
    """The style of one classified projection (head, column or row)."""
    if role == "head":
        if draft.vocab_parallel:
            draft.styles[path] = draft.column(draft.axis)
            draft.roles[path] = f"vocab-parallel LM head (logits sharded on vocab; {why})"
        else:
            draft.roles[path] = "replicated: LM head (vocab_parallel=False)"
        return
    dim = _column_dim(module, shapes[weight_name(shapes)]) if role == "column" else None
    draft.styles[path] = (
        draft.column(draft.axis, dim=dim) if role == "column" else draft.row(draft.axis)
    )
    draft.roles[path] = f"{role}: {why}" + (f" (dim {dim}: heads)" if dim is not None else "")
    fused = path.split(".")[-1].lower() in FUSED_QKV_NAMES
    if role == "column" and fused and not einsum_parts(module):
        draft.notes.append(
            f"{path}: a fused qkv Linear is column-sharded on its 3*d outputs, so each device "
            "holds a mix of q/k/v columns and the split after it reshards. Correct, but an "
            "einsum with a stack dim (or separate q/k/v layers) avoids the extra traffic."
        )


def _sequence_norms(draft: _Draft, modules, own, d_model) -> None:
    """Norms on the residual stream (width `d_model`) get `SequenceParallel`.

    Norms of another width (q/k norms over the head size) run inside
    attention, where the sequence is gathered; they are left alone.
    """
    for path, module in modules.items():
        if not isinstance(module, (nnx.LayerNorm, nnx.RMSNorm)):
            continue
        widths = {shape[-1] for shape in own.get(path, {}).values() if shape}
        if d_model is not None and widths and widths != {d_model}:
            draft.notes.append(
                f"{path}: a norm over {sorted(widths)} features, not the model "
                f"width {d_model}; not sequence-parallel"
            )
            continue
        draft.styles[path] = SequenceParallel(draft.axis)
        draft.roles[path] = "sequence-parallel norm"


def _drop_unfit(draft: _Draft, model, mesh: Mesh) -> None:
    """Moves entries that cannot shard their layer on `mesh` to `unclassified`."""
    for path in list(draft.styles):
        try:
            resolve(model, mesh, {path: draft.styles[path]})
        except ParallelError as err:
            del draft.styles[path]
            draft.roles.pop(path, None)
            draft.unclassified[path] = f"left replicated, it does not fit the mesh: {err}"


def _split_embeddings(embeds: Mapping[str, Mapping[str, tuple]]) -> tuple[str | None, list[str]]:
    """(token embedding path, position embedding paths)."""
    positions = [p for p in embeds if any(k in p.split(".")[-1].lower() for k in POSITION_NAMES)]
    rest = [p for p in embeds if p not in positions]
    if not rest:
        return None, positions
    token = max(rest, key=lambda p: embeds[p]["embedding"][0])
    return token, positions + [p for p in rest if p != token]


def _classify(weighted, modules, vocab, unclassified) -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    for path, shapes in weighted.items():
        module, name = modules[path], path.split(".")[-1].lower()
        io = in_out_sizes(module, shapes[weight_name(shapes)])
        known = (COLUMN_NAMES | ROW_NAMES) - {"out"}  # a bare `out` may be the LM head
        if io is not None and vocab is not None and io[1] == vocab and name not in known:
            out[path] = ("head", f"output size {vocab} = vocab")
        elif vocab is None and name in HEAD_NAMES:
            out[path] = ("head", f"named {name!r}")
        elif name in COLUMN_NAMES:
            out[path] = ("column", f"in-projection named {name!r}")
        elif name in ROW_NAMES:
            out[path] = ("row", f"out-projection named {name!r}")
    # Unnamed d -> f -> d pairs under one parent: an MLP.
    by_parent: dict[str, list[str]] = {}
    for path in weighted:
        if path not in out:
            by_parent.setdefault(path.rpartition(".")[0], []).append(path)
    for parent, paths in by_parent.items():
        pair = _mlp_pair(paths, weighted, modules)
        for path in paths:
            if pair and path in pair:
                out[path] = pair[path]
            else:
                kind = type(modules[path]).__name__
                unclassified[path] = (
                    f"a {kind} with weights {dict(weighted[path])} and a name the planner does not "
                    "know; add a plan entry (ColumnParallel/RowParallel/Replicated) for it"
                )
    return out


def _mlp_pair(paths, weighted, modules) -> dict[str, tuple[str, str]] | None:
    if len(paths) != 2:
        return None
    a, b = paths
    io_a = in_out_sizes(modules[a], weighted[a][weight_name(weighted[a])])
    io_b = in_out_sizes(modules[b], weighted[b][weight_name(weighted[b])])
    if io_a is None or io_b is None or io_a[0] == io_a[1]:
        return None
    if io_a == io_b[::-1]:
        first, second = (a, b) if io_a[1] > io_a[0] else (b, a)
        return {first: ("column", "MLP d -> f by shape"), second: ("row", "MLP f -> d by shape")}
    return None


def _column_dim(module, kernel_shape: tuple) -> int | None:
    """The head dim of an einsum kernel, where the default would pick another."""
    parts = einsum_parts(module)
    if parts is None:
        return None
    x_sub, k_sub, out_sub = parts
    candidates = [c for c in k_sub if c in out_sub and c not in x_sub]
    if len(candidates) < 2:
        return None
    shared = [out_sub.index(c) for c in out_sub if c in x_sub]
    after = [
        c for c in candidates if out_sub.index(c) > max(shared, default=-1)
    ]  # not a q/k/v stack
    after = [c for c in after if c != out_sub[-1]] or after  # not the head size
    chosen = (after or candidates)[0]
    dim = k_sub.index(chosen)
    return None if dim == k_sub.index(candidates[0]) else dim


def _check_pairs(styles: Mapping[str, Any], notes: list[str]) -> None:
    parents_col = {p.rpartition(".")[0] for p, s in styles.items() if isinstance(s, ColumnParallel)}
    parents_row = {p.rpartition(".")[0] for p, s in styles.items() if isinstance(s, RowParallel)}
    for parent in sorted(parents_col - parents_row):
        if parent and any(p.startswith(parent + ".") for p in styles):
            notes.append(
                f"{parent}: column-parallel layers without a row-parallel partner; their sharded "
                "outputs get gathered where they are used."
            )


def _generalize(styles: Mapping[str, Any]) -> dict[str, Any]:
    """Replaces digit segments by `*` where every matching path got the same style."""
    groups: dict[str, list[tuple[str, Any]]] = {}
    for path, style in styles.items():
        groups.setdefault(generalize(path), []).append((path, style))
    plan: dict[str, Any] = {}
    for pattern, items in groups.items():
        if len({repr(s) for _, s in items}) == 1:
            plan[pattern] = items[0][1]
        else:
            plan.update(dict(items))
    return plan
