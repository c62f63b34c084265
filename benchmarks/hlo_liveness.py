"""Which buffers are live at the peak of a compiled step: a diagnostic for temp memory.

Run:  python benchmarks/hlo_liveness.py DUMP.cpu_after_optimizations.txt

With XLA's own buffer assignment next to the HLO (the `*-buffer-assignment.txt`
and `*-live-range.txt` files `--xla_dump_to` writes beside it), the peak is
XLA's exactly (`xla_peak`): the values of the temp allocation, with XLA's
live ranges over the schedule, summed at each point; the values live at the
peak are split into those the forward made and those backward made (by their
`op_name`, which names `transpose(...)` for backward) plus the all-gathers.

Without those files, an estimate (`peak`):

Reads the scheduled entry computation of an after-optimizations HLO dump
(`XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_as_text`), gives each non-alias
instruction one buffer live from its definition to its last use (bitcasts and
get-tuple-elements extend their source's life; parameters and constants are
not counted), and prints the peak of the sum and the buffers live there, by
op kind and shape. It ignores XLA's in-place reuse of an operand's buffer by
its consumer and the buffers of called computations (while loops), so it is
an estimate of `memory_analysis().temp_size_in_bytes`: on a step without
loops, where it is above XLA's figure, in-place reuse is the difference.
"""

from __future__ import annotations

import collections
import os
import re
import sys

_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1}
_BYTES.update({"f64": 8, "s64": 8, "u64": 8})
_ALIASES = {"bitcast", "get-tuple-element"}
_UNCOUNTED = _ALIASES | {"tuple", "parameter", "constant"}
_LINE = re.compile(r"(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*)")


def nbytes(shape: str) -> int:
    """Bytes of an HLO shape string (tuples summed)."""
    total = 0
    for dtype, dims in re.findall(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\]", shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _BYTES[dtype]
    return total


def entry_lines(hlo: str) -> list[str]:
    body = hlo[hlo.index("\nENTRY") :]
    body = body[body.index("{\n") + 2 : body.index("\n}")]
    return [line.strip() for line in body.split("\n") if " = " in line]


def peak(hlo: str) -> tuple[int, list[tuple[str, str, str, int]]]:
    """(peak bytes, [(name, op, shape, bytes) live at the peak])."""
    insts = [m.groups() for line in entry_lines(hlo) if (m := _LINE.match(line))]
    index = {name: i for i, (name, *_) in enumerate(insts)}
    source, last = {}, {}
    for i, (name, _shape, op, rest) in enumerate(insts):
        operands = re.findall(r"%([\w.\-]+)", rest.split("), ")[0] if op != "tuple" else rest)
        if op in _ALIASES and operands:
            source[name] = operands[0]
        for o in operands:
            last[o] = i

    def root(n):
        while n in source:
            n = source[n]
        return n

    end: dict[str, int] = {}
    for name, *_ in insts:
        r = root(name)
        end[r] = max(end.get(r, 0), last.get(name, index[name]), index[name])
    bufs = [
        (name, op, shape, index[name], end[name], nbytes(shape))
        for name, shape, op, _ in insts
        if op not in _UNCOUNTED and root(name) == name
    ]
    live = [0] * len(insts)
    for *_, a, b, size in bufs:
        for t in range(a, b + 1):
            live[t] += size
    t = max(range(len(insts)), key=live.__getitem__) if insts else 0
    return (live[t] if insts else 0), [(n, o, s, z) for n, o, s, a, b, z in bufs if a <= t <= b]


_VALUE = re.compile(r"value: <\d+ (\S+?)(\{[^}]*\})? @0> \(size=(\d+),offset=\d+\): (\S+)")
_RANGE = re.compile(r"^\s+(\S+?)(\{[^}]*\}):(\d+)-(\d+)$", re.M)
_OP_NAME = re.compile(r"^\s+(?:ROOT )?%(\S+) = .*?op_name=\"([^\"]*)\"", re.M)


def xla_peak(assignment: str, live_range: str, hlo: str = "") -> dict:
    """XLA's temp peak from its buffer assignment and live ranges.

    Returns {"bytes", "time" (schedule position), "forward", "backward"
    (bytes live at the peak made by each; all-gathers count as backward, the
    re-gathers of FSDP), "live": [(name, shape, bytes, start, end)]}.
    """
    temp = assignment[assignment.index("preallocated-temp") :]
    temp = temp.split("\nallocation ")[0]
    ranges = {(n, i): (int(a), int(b)) for n, i, a, b in _RANGE.findall(live_range)}
    values = []
    for name, index, size, shape in _VALUE.findall(temp):
        span = ranges.get((name, index or "{}"))
        if span is not None:
            values.append((name, shape, int(size), *span))
    end = max((v[4] for v in values), default=0) + 1
    usage = [0] * end
    for _, _, size, a, b in values:
        for t in range(a, b + 1):
            usage[t] += size
    t = max(range(end), key=usage.__getitem__)
    live = [v for v in values if v[3] <= t <= v[4]]
    op_names = dict(_OP_NAME.findall(hlo))

    def backward(name):
        return "transpose(" in op_names.get(name, "") or name.startswith("all_gather")

    made = {True: 0, False: 0}
    for name, _, size, *_ in live:
        made[backward(name)] += size
    return {
        "bytes": usage[t],
        "time": t,
        "forward": made[False],
        "backward": made[True],
        "live": live,
    }


def main(argv=None) -> None:
    path = (argv or sys.argv[1:])[0]
    stem = path.removesuffix(".txt")
    if os.path.exists(stem + "-buffer-assignment.txt"):
        found = xla_peak(
            open(stem + "-buffer-assignment.txt").read(),
            open(stem + "-live-range.txt").read(),
            open(path).read(),
        )
        print(
            f"XLA's peak {found['bytes'] / 2**20:.2f} MiB at schedule position "
            f"{found['time']}: made by the forward {found['forward'] / 2**20:.2f} MiB, "
            f"by backward (and gathers) {found['backward'] / 2**20:.2f} MiB"
        )
        for name, shape, size, a, b in sorted(found["live"], key=lambda v: -v[2])[:25]:
            print(f"{size / 2**20:8.2f} MiB  {shape:30s} {name} ({a}-{b})")
        return
    total, at = peak(open(path).read())
    print(f"peak {total / 2**20:.2f} MiB (estimate: no in-place reuse, no loop bodies)")
    by = collections.Counter()
    for _, op, shape, size in at:
        by[(op, shape.split("{")[0])] += size
    for (op, shape), size in by.most_common(25):
        print(f"{size / 2**20:8.2f} MiB  {op:20s} {shape}")


if __name__ == "__main__":
    main()
