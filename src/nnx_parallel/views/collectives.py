"""The collectives a compiled step runs, parsed from its HLO text.

One implementation serves the tests, the benchmarks and `communication_report`.
Async pairs (`all-gather-start` / `all-gather-done`) count once. Replica groups
are mapped back to mesh axes, so a report can say "all-reduce over 'model'".
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
from jax.sharding import Mesh

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s4": 1,
    "u4": 1,
}
_OP = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.+?)\s+"
    r"(?P<kind>all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    r"(?P<suffix>-start|-done)?\((?P<args>(?:[^()]|\([^()]*\))*)\)(?P<attrs>.*)$"
)
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective op of a compiled program.

    Attributes:
      kind: "all-reduce", "all-gather", "reduce-scatter", "all-to-all" or
        "collective-permute".
      size: Bytes of the full (unsharded) operand: the gathered result of an
        all-gather, the input of a reduce-scatter, the operand of an all-reduce.
      group: Devices per replica group.
      axes: Mesh axes the group spans (empty if unknown).
      shape: The HLO result shape text.
    """

    kind: str
    size: int
    group: int
    axes: tuple[str, ...]
    shape: str

    @property
    def traffic(self) -> float:
        """Bytes each device sends with ring algorithms."""
        n = max(self.group, 1)
        if self.kind == "all-reduce":
            return 2 * self.size * (n - 1) / n
        if self.kind == "collective-permute":
            return float(self.size)
        return self.size * (n - 1) / n


def _last_operand(args: str) -> str:
    """The name of the last operand: `%x` or `(f32[2]{0}, f32[8]{0}) %x` -> `x`."""
    names = re.findall(r"%?([\w.\-]+)\s*$", args.strip())
    return names[0] if names else args.strip()


def _bytes(shape_text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(shape_text):
        if dtype not in _DTYPE_BYTES:
            continue
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += n * _DTYPE_BYTES[dtype]
    return total


# `mesh['axis_0'=2,'axis_1'=4] {'axis_0'}`, optionally with the devices in mesh
# order: `mesh[...], device_ids=([2,4]T(1,0)) {...}` (iota) or an explicit list.
_MESH_GROUPS = re.compile(
    r"replica_groups=mesh\[(?P<axes>[^\]]*)\](?:,\s*device_ids=\((?P<ids>.*?)\))?\s*\{(?P<chosen>[^}]*)\}"
)


def _iota(dims: list[int], perm: list[int] | None) -> np.ndarray:
    ids = np.arange(math.prod(dims)).reshape(dims)
    return ids.transpose(perm) if perm else ids


def _ints(text: str | None) -> list[int]:
    return [int(x) for x in text.split(",")] if text else []


def _device_ids(text: str | None, n: int) -> np.ndarray:
    """Device ids in mesh order: from `[2,4]T(1,0)` (iota), `0,4,1,5`, or none."""
    if not text:
        return np.arange(n)
    m = re.fullmatch(r"\s*\[([\d,]+)\](?:T\(([\d,]+)\))?\s*", text)
    if m:
        return _iota(_ints(m.group(1)), _ints(m.group(2)) or None).reshape(-1)
    return np.array([int(x) for x in re.findall(r"\d+", text)])


def _groups(attrs: str, n_devices: int) -> list[list[int]] | None:
    m = re.search(r"replica_groups=\{(\{[\d,\s]*\}(?:,\s*\{[\d,\s]*\})*)\}", attrs)
    if m:
        return [
            [int(x) for x in g.split(",") if x.strip()]
            for g in re.findall(r"\{([\d,\s]*)\}", m.group(1))
        ]
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if m:
        out_shape = [int(x) for x in m.group(1).split(",")]
        ids = np.arange(math.prod(int(x) for x in m.group(2).split(","))).reshape(
            [int(x) for x in m.group(2).split(",")]
        )
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(out_shape).tolist()
    m = _MESH_GROUPS.search(attrs)
    if m:
        axes = re.findall(r"'([^']+)'=(\d+)", m.group("axes"))
        names = [a for a, _ in axes]
        sizes = [int(s) for _, s in axes]
        chosen = re.findall(r"'([^']+)'", m.group("chosen"))
        ids = _device_ids(m.group("ids"), math.prod(sizes)).reshape(sizes)
        inner = [names.index(c) for c in chosen]
        outer = [i for i in range(len(names)) if i not in inner]
        ids = ids.transpose(outer + inner).reshape(
            -1, math.prod(sizes[i] for i in inner) if inner else 1
        )
        return ids.tolist()
    m = re.search(r"source_target_pairs=\{(.*?)\}\}", attrs)
    if m:
        pairs = re.findall(r"\{(\d+),(\d+)\}", m.group(0))
        return [[int(a), int(b)] for a, b in pairs]
    if "replica_groups={}" in attrs or "replica_groups" not in attrs:
        return [list(range(n_devices))]
    return None


def _axes_of(group: list[int], mesh: Mesh | None) -> tuple[str, ...]:
    if mesh is None or not group:
        return ()
    shape = mesh.devices.shape
    if max(group) >= math.prod(shape):
        return ()
    coords = np.array([np.unravel_index(i, shape) for i in group])
    return tuple(name for d, name in enumerate(mesh.axis_names) if len(set(coords[:, d])) > 1)


def collectives(program: Any, mesh: Mesh | None = None) -> list[Collective]:
    """Every collective in a compiled program.

    Args:
      program: HLO text, or anything with `.as_text()` (a `jax.stages.Compiled`).
      mesh: The mesh the program runs on, to name the axes of each group.

    Returns:
      One `Collective` per op, in program order; async pairs count once.

    Example:
      >>> f = jax.jit(lambda x: x.sum(), in_shardings=jax.NamedSharding(mesh8, P("model")))
      >>> [c.kind for c in collectives(f.lower(jax.numpy.ones(8)).compile(), mesh8)]
      ['all-reduce']
    """
    text = program if isinstance(program, str) else program.as_text()
    n_devices = mesh.devices.size if mesh is not None else 1
    done_shapes = {}
    parsed = []
    for line in text.splitlines():
        m = _OP.match(line)
        if not m:
            continue
        if m.group("suffix") == "-done":
            done_shapes[_last_operand(m.group("args"))] = m.group("shape")
            continue
        parsed.append(m)
    out = []
    for m in parsed:
        shape = m.group("shape")
        if m.group("suffix") == "-start":
            shape = done_shapes.get(m.group("name"), shape)
        groups = _groups(m.group("attrs"), n_devices) or [[]]
        group = groups[0]
        kind = m.group("kind")
        n = len(group) if kind != "collective-permute" else 2
        size = _bytes(shape)
        if kind == "reduce-scatter":
            size *= max(len(group), 1)
        axes = _axes_of(group, mesh)
        out.append(Collective(kind, size, n if kind != "collective-permute" else 2, axes, shape))
    return out


def count_collectives(program: Any, mesh: Mesh | None = None) -> dict[str, int]:
    """Number of ops of each kind (every kind present, zeros included).

    Example:
      >>> count_collectives("%x = f32[8]{0} all-reduce(%y), replica_groups={{0,1}}")["all-reduce"]
      1
    """
    counts = collections.Counter(c.kind for c in collectives(program, mesh))
    return {k: counts.get(k, 0) for k in KINDS}


def bytes_by_kind(ops: Iterable[Collective]) -> dict[str, int]:
    """Total full-operand bytes per kind."""
    totals = collections.Counter()
    for c in ops:
        totals[c.kind] += c.size
    return {k: totals.get(k, 0) for k in KINDS}
