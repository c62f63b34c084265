"""Which buffers are live at the peak of a compiled step: a diagnostic for temp memory.

Run:  python benchmarks/hlo_liveness.py DUMP.cpu_after_optimizations.txt

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


def main(argv=None) -> None:
    path = (argv or sys.argv[1:])[0]
    total, at = peak(open(path).read())
    print(f"peak {total / 2**20:.2f} MiB (estimate: no in-place reuse, no loop bodies)")
    by = collections.Counter()
    for _, op, shape, size in at:
        by[(op, shape.split("{")[0])] += size
    for (op, shape), size in by.most_common(25):
        print(f"{size / 2**20:8.2f} MiB  {op:20s} {shape}")


if __name__ == "__main__":
    main()
