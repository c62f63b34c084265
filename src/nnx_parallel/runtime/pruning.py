"""Dead-expert pruning for the `experts manual/as-is/as-is` route: each device computes
only the experts it owns.

On `experts manual/as-is/as-is` a loop over experts (`for i in range(E): ... w[i] ...`)
runs on every device with the tokens of all its peers, and without pruning
the E - E/ep experts a device does not own are computed with zero weights:
ep times the useful FLOPs (XLA does not fold a matmul by zeros). Here the
call is traced once to a jaxpr in which each expert's weights (`w[i]`) are
inputs, and evaluated once per device of the expert axis with the experts
that device does not own marked as known zeros: every equation whose result
is then known to be zero (a product or matmul with a zero, a reshape or
slice of one, a sum with one term zero) is dropped instead of computed. A
`lax.switch` on the device's index along the expert axis picks its version.
Live values are computed by exactly the same equations, so results are
bitwise those of the unpruned call.

Calls whose jaxpr holds a collective (a submodule's own FSDP gather inside)
are not pruned: devices would take different branches around it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nnx_parallel import _compat

COLLECTIVES = ("all_gather", "psum", "reduce_scatter", "all_to_all", "ppermute", "pmax", "pmin")


class Zero:
    """A value known to be all zeros, with its abstract shape and dtype."""

    def __init__(self, aval):
        self.aval = aval


# A result is zero if any operand is zero (products, matmuls, divisions of a zero).
_ANY_ZERO = frozenset({"mul", "dot_general", "div"})
# A result is zero if the (first) operand is zero (layout ops, odd functions, sums).
_FIRST_ZERO = frozenset(
    {
        "neg",
        "reshape",
        "broadcast_in_dim",
        "transpose",
        "squeeze",
        "expand_dims",
        "convert_element_type",
        "slice",
        "dynamic_slice",
        "reduce_sum",
        "copy",
        "copy_p",
        "tanh",
        "sin",
        "erf",
        "integer_pow",
        "pvary",
        "pcast",
    }
)
_SUMS = frozenset({"add", "add_any"})
CALLS = frozenset({"pjit", "jit", "closed_call", "core_call"})  # calls inlined by evaluators


def has_collective(jaxpr) -> bool:
    text = str(jaxpr)
    return any(f" {name}[" in text or f" {name} " in text for name in COLLECTIVES)


def _materialize(x):
    if isinstance(x, Zero):
        return jnp.zeros(x.aval.shape, x.aval.dtype)
    return x


def _zero_rule(eqn, invals):
    """The outputs of `eqn` as `Zero`s where known, else None."""
    name = eqn.primitive.name
    zeros = [isinstance(v, Zero) for v in invals]
    outs = [Zero(v.aval) for v in eqn.outvars]
    if name in _ANY_ZERO and (zeros[0] or name != "div" and any(zeros)):
        return outs
    if name in _FIRST_ZERO and zeros[0]:
        return outs
    if name in _SUMS and all(zeros):
        return outs
    if name in _SUMS and any(zeros):
        live = invals[zeros.index(False)]
        return [live] if live.shape == eqn.outvars[0].aval.shape else None
    if name == "sub" and zeros[1]:
        return [invals[0]] if not zeros[0] else outs
    return None


def evaluate(jaxpr, consts, args):
    """`jaxpr` on `args` (arrays or `Zero`s), dropping equations with known-zero results."""
    env = {}

    def read(v):
        is_lit, val = _compat.jaxpr_literal(v)
        return val if is_lit else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if not any(isinstance(x, Zero) for x in invals):
            outs = _compat.bind_eqn(eqn, invals)
        elif eqn.primitive.name in CALLS and "jaxpr" in eqn.params:
            inner = eqn.params["jaxpr"]
            outs = evaluate(inner.jaxpr, inner.consts, invals)
        else:
            outs = _zero_rule(eqn, invals)
            if outs is None:
                outs = _compat.bind_eqn(eqn, [_materialize(x) for x in invals])
        for v, x in zip(eqn.outvars, outs):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def per_device(closed, owned_rows, n_rows: int, axis: str, operands, dead_shapes):
    """`closed` evaluated with rows not owned by this device as zeros: a
    `lax.switch` over the device's index along `axis`.

    `owned_rows(r, operands)` returns, for device `r`, a dict row position ->
    value of the rows it owns; every other row position is a known zero.
    `operands` are the jaxpr's other inputs, in order after the rows.
    """

    def branch(r, operands):
        live = owned_rows(r, operands)
        rows = [live[i] if i in live else Zero(dead_shapes[i]) for i in range(n_rows)]
        flat = list(operands[1])
        outs = evaluate(closed.jaxpr, closed.consts, rows + flat)
        return [_materialize(x) for x in outs]

    size = jax.lax.axis_size(axis)
    index = jax.lax.axis_index(axis)
    branches = [lambda ops, r=r: branch(r, ops) for r in range(size)]
    return jax.lax.switch(index, branches, operands)
