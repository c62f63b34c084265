"""`plans.auto`: the plan with the least traffic that fits a per-device memory budget.

Candidates are the layouts the library knows, each compiled once ahead of
time by `estimate` (nothing runs, nothing is allocated):

- 1-D meshes (counting axes of size > 1): data parallel (`Replicated()`), FSDP (`plans.fsdp`), the
  tensor-parallel auto-plan (`plans.tensor_parallel`), ZeRO-1 and ZeRO-2;
- 2-D meshes: data parallel and FSDP over both axes, and FSDP x TP
  (`plans.combine`: TP over `'model'`, or the last axis, FSDP over the other);
- meshes with an `'expert'` axis, for models with Mixture-of-Experts layers
  (`plans.expert_parallel` finds them): expert parallelism alone (`ep`: the
  experts spread over `'expert'`, everything else replicated) and with FSDP
  (`ep x fsdp`, on a 2-D mesh: the other parameters FSDP-sharded over the
  other axis), the batch over every axis;

each also with `Remat()` on the model's repeated blocks (the entries of an
`nnx.List`/`nnx.Dict` that all have the same structure). The choice is the
fitting candidate with the fewest wire bytes per device; ties go to the
lower peak.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from nnx_parallel import _compat
from nnx_parallel.core.graph import walk
from nnx_parallel.core.styles import FSDP, Remat, Replicated, as_styles
from nnx_parallel.errors import ParallelError, PlanError
from nnx_parallel.memory import Estimate, LossFn, default_optimizer, estimate, mean_square
from nnx_parallel.plans._experts import expert_parallel
from nnx_parallel.plans._recipes import combine, fsdp, tensor_parallel
from nnx_parallel.runtime.sharded_init import abstract_copy, abstract_state
from nnx_parallel.views import _text
from nnx_parallel.zero import ZeRO


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One plan `auto` tried, with its compiled figures.

    Attributes:
      name: "dp", "fsdp", "tp", "zero1", "zero2", "fsdp x tp", plus "+remat".
      plan: The plan dict, ready for `parallelize`.
      batch_axes: Mesh axes the batch is split over with this plan.
      peak_bytes: Predicted peak bytes per device of one train step.
      wire_bytes: Bytes each device sends per step.
      fits: `peak_bytes <= budget_bytes`.
      estimate: The full `Estimate`.
    """

    name: str
    plan: dict[str, Any]
    batch_axes: tuple[str, ...]
    peak_bytes: int
    wire_bytes: float
    fits: bool
    estimate: Estimate = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class AutoReport:
    """What `plans.auto` compared and chose; `print(report)` shows the table.

    Attributes:
      candidates: Every candidate that compiled, in the order tried.
      chosen: The fitting candidate with the fewest wire bytes (ties: lower peak).
      budget_bytes: The per-device budget.
      blocks: The patterns `Remat()` went on (the repeated blocks).
      skipped: Candidate name -> why it was not compiled.
    """

    candidates: tuple[Candidate, ...]
    chosen: Candidate | None
    budget_bytes: int
    blocks: tuple[str, ...] = ()
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"budget {self.budget_bytes:,} B ({_text.human(self.budget_bytes)}) per device"]
        rows = [
            [
                c.name,
                f"{c.peak_bytes:,}",
                _text.human(c.peak_bytes),
                f"{c.wire_bytes:,.0f}",
                "yes" if c.fits else "no",
                "<- chosen" if c is self.chosen else "",
            ]
            for c in self.candidates
        ]
        header = ["candidate", "peak B/device", "", "wire B/device", "fits", ""]
        lines += _text.table(header, rows, right={1, 2, 3})
        lines += [f"skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def auto(
    model: nnx.Module | Callable[[], nnx.Module],
    mesh: Mesh,
    batch: Any,
    *,
    budget_bytes: int,
    loss_fn: LossFn | None = None,
    optimizer: optax.GradientTransformation | None = None,
) -> tuple[dict[str, Any], AutoReport]:
    """Picks the plan with the fewest wire bytes whose train step fits `budget_bytes`.

    Every candidate (see the module docstring) is compiled once by
    `estimate`; nothing runs. Figures are cached per model structure, mesh,
    plan, batch shape, loss and optimizer, so asking again with another
    budget compiles nothing.

    Args:
      model: The model (concrete or abstract; not modified) or a factory.
      mesh: A 1-D or 2-D mesh.
      batch: The global batch, as for `estimate`; each candidate lays it out
        over its own batch axes.
      budget_bytes: Bytes one device may use for a train step.
      loss_fn: As for `estimate`; default the mean square of the output.
      optimizer: As for `estimate`; default `optax.adam(1e-3)`.

    Returns:
      `(plan, report)`: the chosen plan dict and an `AutoReport`.

    Raises:
      PlanError: no candidate fits (the message names the smallest peak and
        its candidate), the mesh has more than 2 axes, or `budget_bytes` is
        not a positive, finite number. A candidate whose batch axes do not
        divide the batch is skipped, with the reason in the report.

    Example:
      >>> f = lambda: nnx.Linear(256, 256, rngs=nnx.Rngs(0))
      >>> x = jax.ShapeDtypeStruct((8, 256), jax.numpy.float32)
      >>> plan, report = npx.plans.auto(f, mesh8, x, budget_bytes=10**9)
      >>> [c.name for c in report.candidates]
      ['dp', 'fsdp', 'zero1', 'zero2']
      >>> report.chosen.name, plan[""].axis
      ('fsdp', 'model')
    """
    _check_budget(budget_bytes)
    loss_fn = mean_square if loss_fn is None else loss_fn
    optimizer = default_optimizer() if optimizer is None else optimizer
    abstract = _abstract(model)
    blocks = repeated_blocks(abstract)
    rows, skipped = [], {}
    for name, plan, axes in _with_remat(_candidates(abstract, mesh), blocks):
        misfit = _batch_misfit(batch, mesh, axes)
        if misfit:
            skipped[name] = misfit
            continue
        try:
            est = _cached_estimate(abstract, mesh, name, plan, batch, axes, loss_fn, optimizer)
        except ParallelError as err:
            skipped[name] = str(err)
            continue
        fits = est.peak_bytes <= budget_bytes
        rows.append(Candidate(name, plan, axes, est.peak_bytes, est.wire_bytes, fits, est))
    fitting = [c for c in rows if c.fits]
    chosen = min(fitting, key=lambda c: (c.wire_bytes, c.peak_bytes)) if fitting else None
    report = AutoReport(tuple(rows), chosen, budget_bytes, blocks, skipped)
    if chosen is None:
        raise _no_fit(report)
    return chosen.plan, report


def _check_budget(budget_bytes: Any) -> None:
    ok = isinstance(budget_bytes, (int, float)) and not isinstance(budget_bytes, bool)
    if not ok or not math.isfinite(budget_bytes) or budget_bytes <= 0:
        raise PlanError(
            f"plans.auto(budget_bytes={budget_bytes!r}): the budget must be a positive, finite "
            "number of bytes one device may use, e.g. budget_bytes=16 * 2**30 for 16 GiB."
        )


def _batch_misfit(batch: Any, mesh: Mesh, axes: tuple[str, ...]) -> str:
    """Why `batch` cannot be split over a candidate's batch axes ('' if it can)."""
    size = math.prod(mesh.shape[a] for a in axes)
    for x in batch if isinstance(batch, tuple) else (batch,):
        shape = tuple(getattr(x, "shape", ()))
        if size > 1 and (not shape or shape[0] % size):
            return (
                f"a batch array of shape {shape} does not split over this candidate's batch "
                f"axes {axes} (size {size}). Give plans.auto a batch whose dim 0 is a multiple "
                f"of {size}."
            )
    return ""


def _no_fit(report: AutoReport) -> PlanError:
    if not report.candidates:
        return PlanError(f"no candidate plan compiled for this model and mesh.\n{report}")
    best = min(report.candidates, key=lambda c: c.peak_bytes)
    budget = report.budget_bytes
    return PlanError(
        f"no candidate plan fits budget_bytes={budget:,} ({_text.human(budget)}) per device: the "
        f"smallest peak is {best.peak_bytes:,} B ({_text.human(best.peak_bytes)}), with "
        f"{best.name!r}. Raise the budget to at least {best.peak_bytes:,}, use more devices, or "
        f"a smaller batch.\n{report}"
    )


# Candidates --------------------------------------------------------------------


def _candidates(model: nnx.Module, mesh: Mesh) -> list[tuple[str, dict, tuple[str, ...]]]:
    """(name, plan, batch axes) for each layout that makes sense on `mesh`."""
    # Axes of size 1 (npx.make_mesh(data=8) also makes 'fsdp' and 'model') play no part.
    names = tuple(a for a in mesh.axis_names if mesh.shape[a] > 1) or tuple(mesh.axis_names[:1])
    if len(names) == 1:
        (a,) = names
        out = [("dp", {"": Replicated()}, names), ("fsdp", fsdp(a), names)]
        tp, _ = tensor_parallel(model, a, mesh=mesh)
        if tp:
            out.append(("tp", tp, ()))
        out += [("zero1", {"": ZeRO(1, axis=a)}, names), ("zero2", {"": ZeRO(2, axis=a)}, names)]
        return out + _expert_candidates(model, names)
    if len(names) == 2:
        tp_axis = "model" if "model" in names else names[-1]
        (fsdp_axis,) = (n for n in names if n != tp_axis)
        out = [("dp", {"": Replicated()}, names), ("fsdp", fsdp(names), names)]
        tp, _ = tensor_parallel(model, tp_axis, mesh=mesh)
        if tp and tp_axis != EXPERT_AXIS:
            out.append(("fsdp x tp", combine(tp, FSDP(fsdp_axis)), (fsdp_axis,)))
        return out + _expert_candidates(model, names)
    raise PlanError(
        f"plans.auto plans for 1-D and 2-D meshes; this mesh has {len(names)} axes of size > 1 "
        f"({dict(mesh.shape)}). Build a 1-D or 2-D mesh, or write the plan for it yourself and "
        "check it with npx.estimate."
    )


EXPERT_AXIS = "expert"


def _expert_candidates(model: nnx.Module, names: tuple[str, ...]) -> list:
    """`ep` and `ep x fsdp` where the mesh has an 'expert' axis and the model MoE layers."""
    if EXPERT_AXIS not in names:
        return []
    ep, _ = expert_parallel(model, EXPERT_AXIS)
    if not ep:
        return []
    out = [("ep", dict(ep), names)]
    others = tuple(n for n in names if n != EXPERT_AXIS)
    if others:  # FSDP over the expert axis too would gather the experts back
        out.append(
            ("ep x fsdp", combine(ep, FSDP(others[0] if len(others) == 1 else others)), names)
        )
    return out


def _with_remat(candidates, blocks: tuple[str, ...]):
    for name, plan, axes in candidates:
        yield name, plan, axes
        if blocks:
            remat = dict(plan)
            for pattern in blocks:
                remat[pattern] = (
                    (*as_styles(plan[pattern]), Remat()) if pattern in plan else Remat()
                )
            yield f"{name}+remat", remat, axes


def repeated_blocks(model: nnx.Module) -> tuple[str, ...]:
    """Patterns (`"blocks.*"`) of the `nnx.List`/`nnx.Dict`s whose entries are
    callable modules of one structure (the outermost such containers).

    Example:
      >>> from nnx_parallel.plans._auto import repeated_blocks
      >>> class Net(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.blocks = nnx.List([TinyMLP(rngs=rngs) for _ in range(3)])
      >>> repeated_blocks(nnx.eval_shape(lambda: Net(nnx.Rngs(0))))
      ('blocks.*',)
    """
    modules, _ = walk(model)
    found: list[str] = []
    for path, node in modules.items():
        if not isinstance(node, (nnx.List, nnx.Dict)):
            continue
        children = list(node) if isinstance(node, nnx.List) else list(node.values())
        if len(children) < 2 or not all(
            isinstance(c, nnx.Module) and not isinstance(c, (nnx.List, nnx.Dict)) and callable(c)
            for c in children
        ):
            continue
        if len({_structure(c) for c in children}) == 1:
            found.append(path)
    outermost = [p for p in found if not any(_inside(p, q) for q in found if q != p)]
    return tuple(f"{p}.*" if p else "*" for p in outermost)


def _inside(path: str, parent: str) -> bool:
    return parent == "" or path.startswith(parent + ".")


def _structure(module: nnx.Module):
    """Hashable: the graph, and each Variable's path, shape, dtype and metadata."""
    graphdef, state = nnx.split(module)
    leaves = []
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        meta = repr(sorted(_compat.get_metadata(var).items()))
        leaves.append(
            (path, tuple(getattr(value, "shape", ())), str(getattr(value, "dtype", "")), meta)
        )
    return graphdef, tuple(leaves)


def _abstract(model) -> nnx.Module:
    if isinstance(model, nnx.Module):
        return abstract_copy(model, fresh=True)
    if callable(model):
        return nnx.merge(*abstract_state(model))
    raise PlanError(
        f"plans.auto expects an nnx.Module or a factory, got {type(model).__name__}. Pass the "
        "model, or `lambda: MyModel(rngs=nnx.Rngs(0))`."
    )


# Cache -------------------------------------------------------------------------------

_CACHE: dict[Any, Estimate] = {}
_CACHE_SIZE = 64


def _cached_estimate(model, mesh, name, plan, batch, axes, loss_fn, optimizer) -> Estimate:
    """`estimate(...)`, remembered for the same model structure and inputs."""
    batch = batch if isinstance(batch, tuple) else (batch,)
    shapes = tuple((tuple(x.shape), str(x.dtype)) for x in batch)
    key = (_structure(model), mesh, name, repr(plan), shapes, axes, loss_fn, optimizer)
    if key not in _CACHE:
        plain = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in batch)
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = estimate(
            model, mesh, plan, plain, loss_fn=loss_fn, optimizer=optimizer, batch_axes=axes
        )
    return _CACHE[key]
