"""The tensor-parallel classifier: which projection is column, row, embedding or head,
from data flow first and names second, and where its style goes."""

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
from nnx_parallel.core.sequence import SequenceParallel
from nnx_parallel.core.stacks import layer_stacks
from nnx_parallel.core.styles import ColumnParallel, RowParallel
from nnx_parallel.errors import ParallelError
from nnx_parallel.plans._flow import flow_roles, trace_flow
from nnx_parallel.plans._names import (
    COLUMN_NAMES,
    FUSED_QKV_NAMES,
    HEAD_NAMES,
    POSITION_NAMES,
    ROW_NAMES,
)


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
