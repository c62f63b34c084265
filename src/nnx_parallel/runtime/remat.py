"""Activation recompute that saves memory on every backend.

`jax.checkpoint` marks what to recompute, but the recompute has no data
dependency on the backward pass. XLA's CPU pipeline drops the optimization
barriers that keep it apart, so the recomputed forward is merged with the
original one (or scheduled early) and its activations live through the whole
step: on CPU it saves nothing.

`recompute_call` wraps one module call in a `custom_vjp`. The forward runs a
`jax.checkpoint` of the call and keeps only what the policy saves (its
inputs, for full recompute). The backward first ties those residuals to the
incoming cotangent (`r + 0 * c`, which no compiler may fold for floats), so
the recompute cannot start before the cotangent exists and cannot be merged
with the forward. (A non-finite cotangent makes the block's gradients NaN;
they would not have been finite anyway.) The tie is elementwise where shapes line up and a local
reduction over trailing dims otherwise, so it adds no collective for
batch-sharded activations.

`Recompute` (core/layouts.py) is the hashable record `ModuleHooks.remat`
holds; the `Remat` plan style makes one, and `runtime/dispatch.py` calls
`recompute_call` around the hooked method.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from nnx_parallel import _compat, _specs
from nnx_parallel.core.layouts import Recompute
from nnx_parallel.runtime import trace
from nnx_parallel.runtime.flat import Flat
from nnx_parallel.runtime.flat import is_array as _is_array


def recompute_call(module: nnx.Module, call: Callable, remat: Recompute, args, kwargs):
    """`call(module, *args, **kwargs)`, recomputed in the backward pass.

    Non-array arguments are static; non-parameter state the call updates
    (batch stats, RNG counts) is written back to `module`.
    """
    flat = Flat.of((args, kwargs))
    if flat.nodes:
        return _checkpoint_call(module, call, remat, args, kwargs)
    # Replicated weights are kept as they are; sharded ones (FSDP, TP) are tied
    # too, so an FSDP gather inside runs again in the backward, not merged
    # with the forward's.
    graphdef, whole, sharded, rest = nnx.split(module, _replicated_param, nnx.Param, ...)

    def pure(whole, sharded, rest, arrays):
        a, kw = flat.splice(arrays)
        inner = nnx.merge(graphdef, whole, sharded, rest)
        out = call(inner, *a, **kw)
        return out, nnx.state(inner, nnx.Not(nnx.Param))

    arrays = flat.arrays
    # Its forward residuals are not saved but recomputed just before its
    # backward, so an FSDP unit inside keeps its gathered params for its own
    # backward instead of gathering them a third time (`runtime/fsdp.py`).
    with trace.flagged("recomputed"):
        out, new_rest = recompute(pure, remat.policy)(whole, sharded, rest, arrays)
    nnx.update(module, new_rest)
    return out


def _replicated_param(path, var) -> bool:
    if not isinstance(var, nnx.Param):
        return False
    spec = _compat.get_declared_spec(var) or ()
    return all(e is None for e in spec)


# XLA:CPU workaround, see docs/xla_cpu.md (remat through custom_vjp).
def recompute(f: Callable, policy: Callable[..., bool] | None = None) -> Callable:
    """`f` whose backward recomputes it after its output cotangent exists.

    `f(params, *inputs)`: `params` are residuals kept as they are (weights
    are needed in the backward anyway); every other saved float array is
    tied to the cotangent before the recompute.

    Example:
      >>> from nnx_parallel.runtime.remat import recompute
      >>> f = lambda w, x: jax.numpy.tanh(x @ w).sum()
      >>> w, x = jax.numpy.ones((4, 4)), jax.numpy.ones((2, 4))
      >>> bool(jax.numpy.allclose(jax.grad(recompute(f))(w, x), jax.grad(f)(w, x)))
      True
    """
    checkpointed = jax.checkpoint(f, policy=policy or jax.checkpoint_policies.nothing_saveable)
    tied: list[tuple[bool, ...]] = []  # per saved leaf: tie it? (set while tracing fwd)

    @jax.custom_vjp
    def run(params, *inputs):
        return f(params, *inputs)

    def fwd(params, *inputs):
        out, vjp_fn = jax.vjp(checkpointed, params, *inputs)
        kept = {id(x) for x in jax.tree.leaves(params)}
        tied.append(tuple(id(x) not in kept for x in jax.tree.leaves(vjp_fn)))
        return out, vjp_fn

    def bwd(vjp_fn, ct):
        leaves, saved = jax.tree.flatten(vjp_fn)
        cts = [c for c in jax.tree.leaves(ct) if _is_float(c) and c.size]
        if cts:
            leaves = [_tie(x, cts[0]) if t else x for x, t in zip(leaves, tied[-1])]
        return jax.tree.unflatten(saved, leaves)(ct)

    run.defvjp(fwd, bwd)
    return run


def _tie(x, c):
    """`x + 0 * (something of c)`: x, made to wait for c, with no collective
    for arrays sharded like c on their leading dims."""
    if not _is_float(x):
        return x
    if x.shape == c.shape and _same_layout(x, c):
        return x + (c * 0).astype(x.dtype)
    lead = 0
    while lead < min(x.ndim, c.ndim) and x.shape[lead] == c.shape[lead]:
        lead += 1
    if lead and _same_layout(x, c, lead):
        zero = jnp.max(c, axis=tuple(range(lead, c.ndim))) * 0 if c.ndim > lead else c * 0
        return x + zero.reshape(zero.shape + (1,) * (x.ndim - lead)).astype(x.dtype)
    return x + (jnp.max(c) * 0).astype(x.dtype)  # one scalar; may cost a tiny all-reduce


def _same_layout(x, c, lead: int | None = None) -> bool:
    """Whether x and c agree on the layout of their first `lead` dims (all if None);
    only Explicit axes put layouts in types, and only they refuse a mismatch."""
    sx, sc = _compat.spec_of(x), _compat.spec_of(c)
    if sx is None or sc is None:
        return True
    n = x.ndim if lead is None else lead
    px, pc = _specs.pad(sx, x.ndim), _specs.pad(sc, c.ndim)
    return px[:n] == pc[:n] and (lead is None or all(e is None for e in px[n:]))


def _checkpoint_call(module, call, remat: Recompute, args, kwargs):
    """Calls passed NNX objects (caches, rngs) go through `nnx.remat`."""
    name = type(module).__name__
    trace.warn_once(
        (name, "remat"),
        f"Remat on {name}: its call is passed NNX objects (Rngs, caches), which the "
        "cotangent-tied recompute cannot carry; using nnx.remat (jax.checkpoint), which "
        "saves no memory on XLA's CPU backend. Keep such objects as module attributes.",
    )
    policy = remat.policy or jax.checkpoint_policies.nothing_saveable
    return nnx.remat(lambda m, a, kw: call(m, *a, **kw), policy=policy)(module, args, kwargs)


def _is_float(x) -> bool:
    return _is_array(x) and jnp.issubdtype(x.dtype, jnp.inexact)
