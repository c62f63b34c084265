"""`communication_report`: the collectives and memory of one compiled step.

The same parser (`nnx_parallel.views.collectives`) serves this report, the tests
and the benchmarks: one implementation of "what does this step send".
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from nnx_parallel import _specs
from nnx_parallel.views import _text
from nnx_parallel.views.collectives import KINDS, Collective, collectives


@dataclasses.dataclass(frozen=True)
class CommStats:
    """Totals over a group of collectives.

    Attributes:
      count: Number of ops.
      bytes: Full-operand bytes (`Collective.size`), summed.
      traffic: Bytes each device sends with ring algorithms, summed.
    """

    count: int = 0
    bytes: int = 0
    traffic: float = 0.0

    def add(self, op: Collective) -> CommStats:
        """These totals plus one op.

        Example:
          >>> from nnx_parallel.views.collectives import Collective
          >>> CommStats().add(Collective("all-reduce", 64, 8, ("model",), "f32[16]"))
          CommStats(count=1, bytes=64, traffic=112.0)
        """
        return CommStats(self.count + 1, self.bytes + op.size, self.traffic + op.traffic)


@dataclasses.dataclass(frozen=True)
class CommunicationReport:
    """The collectives and memory of one compiled program.

    Attributes:
      collectives: Every collective op, in program order (async pairs once).
      by_kind: Kind -> totals, every kind present (zeros included).
      by_axis: Mesh axes (a tuple; `()` if unknown) -> totals.
      by_kind_and_axis: `(kind, axes)` -> totals.
      argument_bytes, output_bytes, temp_bytes, generated_code_bytes,
        alias_bytes: Per-device figures from `compiled.memory_analysis()`
        (None where the backend gives none).
      mesh: The mesh used to name axes.
      routes: `(class, method, route)` of every hooked call traced while
        lowering (which path each module took, e.g. `experts manual/as-is/as-is` for an
        MoE layer); empty for an already compiled program.

    Example:
      >>> hlo = "%ar = f32[16]{0} all-reduce(%x), replica_groups=[2,4]<=[8], to_apply=%add"
      >>> report = CommunicationReport.from_compiled(hlo, mesh2x4)
      >>> report.count("all-reduce", "model"), report.by_axis[("model",)]
      (1, CommStats(count=1, bytes=64, traffic=96.0))
    """

    collectives: tuple[Collective, ...]
    by_kind: dict[str, CommStats]
    by_axis: dict[tuple[str, ...], CommStats]
    by_kind_and_axis: dict[tuple[str, tuple[str, ...]], CommStats]
    argument_bytes: int | None = None
    output_bytes: int | None = None
    temp_bytes: int | None = None
    generated_code_bytes: int | None = None
    alias_bytes: int | None = None
    mesh: Mesh | None = None
    routes: tuple[tuple[str, str, str], ...] = ()

    @classmethod
    def from_compiled(cls, compiled: Any, mesh: Mesh | None = None) -> CommunicationReport:
        """Builds a report from a `jax.stages.Compiled` (or HLO text)."""
        ops = tuple(collectives(compiled, mesh))
        by_kind = {k: CommStats() for k in KINDS}
        by_axis: dict = collections.defaultdict(CommStats)
        both: dict = collections.defaultdict(CommStats)
        for op in ops:
            by_kind[op.kind] = by_kind[op.kind].add(op)
            by_axis[op.axes] = by_axis[op.axes].add(op)
            both[(op.kind, op.axes)] = both[(op.kind, op.axes)].add(op)
        stats = None if isinstance(compiled, str) else compiled.memory_analysis()
        get = lambda name: None if stats is None else int(getattr(stats, name))  # noqa: E731
        return cls(
            ops,
            by_kind,
            dict(by_axis),
            dict(both),
            argument_bytes=get("argument_size_in_bytes"),
            output_bytes=get("output_size_in_bytes"),
            temp_bytes=get("temp_size_in_bytes"),
            generated_code_bytes=get("generated_code_size_in_bytes"),
            alias_bytes=get("alias_size_in_bytes"),
            mesh=mesh,
        )

    def count(self, kind: str | None = None, axes: tuple[str, ...] | str | None = None) -> int:
        """Number of ops of `kind` (any if None) over exactly `axes` (any if None)."""
        axes = None if axes is None else _specs.axes_of(axes)
        return sum(
            1
            for c in self.collectives
            if (kind is None or c.kind == kind) and (axes is None or c.axes == axes)
        )

    @property
    def total(self) -> CommStats:
        out = CommStats()
        for op in self.collectives:
            out = out.add(op)
        return out

    def __str__(self) -> str:
        lines = [f"communication on {_text.mesh_text(self.mesh)}: {self.total.count} collectives"]
        rows = [
            [kind, "+".join(axes) or "?", str(s.count), f"{s.bytes:,}", f"{s.traffic:,.0f}"]
            for (kind, axes), s in sorted(self.by_kind_and_axis.items())
        ]
        t = self.total
        rows.append(["total", "", str(t.count), f"{t.bytes:,}", f"{t.traffic:,.0f}"])
        lines += _text.table(
            ["kind", "axes", "count", "bytes", "traffic/device"], rows, right={2, 3, 4}
        )
        memory = [
            ("arguments", self.argument_bytes),
            ("outputs", self.output_bytes),
            ("temp", self.temp_bytes),
            ("generated code", self.generated_code_bytes),
            ("aliased", self.alias_bytes),
        ]
        known = [(name, n) for name, n in memory if n is not None]
        if known:
            lines.append("memory per device: " + ", ".join(f"{name} {n:,} B" for name, n in known))
        taken = dict.fromkeys(f"{c}.{m}: {r}" for c, m, r in self.routes if r != "plain")
        if taken:
            lines.append("routes: " + ", ".join(taken))
        return "\n".join(lines)


def _find_mesh(tree: Any) -> Mesh | None:
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        sharding = getattr(value, "sharding", None)
        if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh):
            return sharding.mesh
    return None


def communication_report(
    jitted_fn: Any, *args: Any, mesh: Mesh | None = None, **kwargs: Any
) -> CommunicationReport:
    """Compiles `jitted_fn(*args, **kwargs)` and reports its collectives and memory.

    Works for `jax.jit` and `nnx.jit` functions (anything with `.lower`), and
    for an already compiled program (`jax.stages.Compiled`, no args).

    Args:
      jitted_fn: The jitted function, or a compiled program.
      *args: Its arguments (arrays, modules, optimizers, ShapeDtypeStructs).
      mesh: The mesh to lower under (`jax.set_mesh`) and to name axes with;
        default: the current mesh, else the mesh of the first sharded argument.
      **kwargs: Its keyword arguments.

    Returns:
      A `CommunicationReport`; `print(report)` shows a table.

    Example:
      >>> mlp = parallelize(TinyMLP(rngs=nnx.Rngs(0)), mesh8, {"up": ColumnParallel(), "down": RowParallel()})
      >>> report = communication_report(nnx.jit(lambda m, x: m(x)), mlp, jax.numpy.ones((4, 16)), mesh=mesh8)
      >>> report.count("all-reduce", "model"), report.by_kind["all-reduce"].bytes
      (1, 256)
    """
    if not hasattr(jitted_fn, "lower"):
        if args or kwargs:
            raise TypeError(
                "a compiled program takes no arguments; pass the jitted function instead."
            )
        return CommunicationReport.from_compiled(jitted_fn, mesh)
    if mesh is None:
        current = jax.sharding.get_mesh()
        mesh = (
            current
            if isinstance(current, Mesh) and not current.empty
            else _find_mesh((args, kwargs))
        )
    from nnx_parallel.runtime import dispatch  # views sit above the runtime

    with dispatch.recording() as routes:
        if mesh is not None:
            with jax.set_mesh(mesh):
                compiled = jitted_fn.lower(*args, **kwargs).compile()
        else:
            compiled = jitted_fn.lower(*args, **kwargs).compile()
    report = CommunicationReport.from_compiled(compiled, mesh)
    return dataclasses.replace(report, routes=tuple(routes))
