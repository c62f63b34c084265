"""Construction-time checks of style fields: one rule per field name.

Every style dataclass calls `validate(self)` from `__post_init__`, so a bad
argument fails where it is written, with a `PlanError` naming the style,
the field and the fix, not later inside `resolve` as a raw Python error.
A rule may also normalize a value: lists of axis names become tuples (a
frozen style must be hashable). A new field gets its rule by adding one
line to `RULES`; fields without a rule are not checked.

Example:
  >>> FSDP(axis=["fsdp", "data"]).axis
  ('fsdp', 'data')
  >>> try:
  ...     FSDP(min_size="big")
  ... except PlanError as e:
  ...     print(e)
  FSDP(min_size='big'): expected an int >= 0. Pass a plain Python int.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from jax.sharding import PartitionSpec as P

from nnx_parallel.errors import PlanError


class _Bad(Exception):
    """A rule's verdict: (what was expected, how to write it)."""


def _int(minimum: int | None = None, maximum: int | None = None) -> Callable[[Any], Any]:
    lo = "" if minimum is None else f" >= {minimum}"
    hi = "" if maximum is None else f" <= {maximum}"

    def rule(value):
        bad = isinstance(value, bool) or not isinstance(value, int)
        bad = bad or (minimum is not None and value < minimum)
        if bad or (maximum is not None and value > maximum):
            raise _Bad(f"expected an int{lo}{hi}", "Pass a plain Python int.")
        return value

    return rule


def _optional(rule: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else rule(value)


def _bool(value):
    if not isinstance(value, bool):
        raise _Bad("expected True or False", "Pass a bool.")
    return value


def _str(value):
    if not isinstance(value, str) or not value:
        raise _Bad("expected a non-empty string", "Pass a name such as 'kernel'.")
    return value


def _names(value):
    """A tuple of strings (a list is converted); a lone string is refused."""
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        raise _Bad("expected a tuple of strings", "Write a tuple, e.g. ('data',) or ('__call__',).")
    if not all(isinstance(v, str) and v for v in value):
        raise _Bad("every entry must be a non-empty string", "Write e.g. ('data', 'fsdp').")
    return tuple(value)


def _axis(value):
    """A mesh axis name or a tuple (or list) of them."""
    if isinstance(value, str) and value:
        return value
    try:
        axes = _names(value)
    except _Bad:
        raise _Bad(
            "expected a mesh axis name or a tuple of names",
            "Write e.g. 'model' or ('fsdp', 'data').",
        ) from None
    if not axes:
        raise _Bad("expected at least one mesh axis", "Write e.g. 'model'.")
    return axes


def one_axis(value):
    """A single mesh axis name (for styles that take exactly one axis)."""
    if not isinstance(value, str) or not value:
        raise _Bad("expected one mesh axis name", "Write e.g. 'data'.")
    return value


def _layout(value):
    """An activation layout: a tuple (or list, or PartitionSpec) of entries."""
    if isinstance(value, P):
        return tuple(value)
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        raise _Bad(
            "expected a tuple of per-dim entries aligned to trailing dims",
            "Write e.g. (None, 'model') or P(None, 'model').",
        )
    return tuple(tuple(v) if isinstance(v, list) else v for v in value)


def _seq_dim(value):
    _int()(value)
    if value >= 0:
        raise _Bad(
            "the sequence dim is counted from the end",
            "Pass a negative dim, e.g. -2 for (batch, seq, features).",
        )
    return value


def _choice(*allowed: str) -> Callable[[Any], Any]:
    def rule(value):
        if value not in allowed:
            raise _Bad(f"expected one of {allowed}", f"Pass {allowed[0]!r} (the default).")
        return value

    return rule


RULES: dict[str, Callable[[Any], Any]] = {
    "axis": _axis,
    "param": _optional(_str),
    "dim": _optional(_int()),
    "shard_bias": _bool,
    "load_balance": _bool,
    "input_spec": _optional(_layout),
    "output_spec": _optional(_layout),
    "min_size": _int(0),
    "batch_axes": _optional(_names),
    "reshard_after_forward": _bool,
    "methods": _names,
    "scan_axes": _int(0),
    "seq_dim": _seq_dim,
    "units": _choice("auto", "module", "leaf"),
}


def validate(style: Any, rules: dict[str, Callable[[Any], Any]] | None = None) -> None:
    """Checks (and normalizes, in place) every dataclass field of `style` with a rule.

    Args:
      style: A (frozen) style dataclass instance.
      rules: Field name -> rule; default `RULES`.

    Raises:
      PlanError: a field's value breaks its rule; the message names the
        style, the field and how to write it.
    """
    rules = RULES if rules is None else rules
    for field in dataclasses.fields(style):
        rule = rules.get(field.name)
        if rule is None:
            continue
        value = getattr(style, field.name)
        try:
            fixed = rule(value)
        except _Bad as bad:
            why, fix = bad.args
            where = f"{type(style).__name__}({field.name}={value!r})"
            raise PlanError(f"{where}: {why}. {fix}") from None
        if fixed is not value:
            object.__setattr__(style, field.name, fixed)
