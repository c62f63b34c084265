"""Plain-text formatting shared by the inspection views."""

from __future__ import annotations

from typing import Any

from jax.sharding import Mesh


def format_spec(spec: Any) -> str:
    """`P(None, 'model')` style text for a PartitionSpec (or spec tuple).

    Example:
      >>> format_spec(jax.P(None, ("data", "model"))), format_spec(()), format_spec((None,))
      ("P(None, ('data', 'model'))", 'P()', 'P(None)')
    """
    entries = tuple(spec) if spec is not None else ()
    return "P(" + ", ".join(entry_text(e) for e in entries) + ")"


def entry_text(entry: Any) -> str:
    if entry is None or isinstance(entry, str):
        return repr(entry)
    return "(" + ", ".join(repr(a) for a in entry) + ")"


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - unreachable


def table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        out = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ]
        return "  ".join(out).rstrip()

    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def mesh_text(mesh: Mesh | None) -> str:
    if mesh is None:
        return "no mesh (1 device)"
    return f"mesh {dict(mesh.shape)} ({mesh.devices.size} devices)"
