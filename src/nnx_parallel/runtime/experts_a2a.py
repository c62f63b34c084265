"""The `experts-a2a manual/as-is/as-is` route: each token travels to the devices of
its top-k experts by all-to-all, with a capacity (`ExpertParallel(capacity_factor=c)`).

In a `shard_map` manual over the batch axes (which include the expert axis),
each device holds T local tokens (the leading dims of the call's first input,
flattened) and E / ep experts.

1. Routing, read from the layer's own code: the call is traced once and the
   one `top_k` over the E experts in it is found; only the equations it
   depends on (the router) run, on the local tokens, giving each token's k
   experts and so the devices that own them. Whatever the code does before
   `top_k` (softmax, a bias, sigmoid) is its own: the selection is exactly
   the one the layer makes. A call with no such `top_k` (or several) cannot
   take this route (`NotLocal`, and the route falls back to the token
   gather).
2. Dispatch: a token goes once to every device that owns one of its
   experts, into that device's next free slot of C = ceil(c * k * T / ep)
   (a token-device pair past C is dropped: counted, see
   `dropped_tokens`). Every batched input (the first and, e.g., a
   `router_input=`) is sent the same way: one `all_to_all` of
   [ep, C, ...] each.
3. Each device runs the layer's own call on the ep * C rows it received
   (a row is a token, a length-1 sequence of the input's rank), with its own
   experts: the loop idiom computes only them (`runtime/pruning.py`),
   whole-stack idioms see a stack with zeros for the experts owned elsewhere.
   The rows' outputs are the sums of this device's experts' terms.
4. Combine: one `all_to_all` brings each row's output back, and a token's
   output is the sum over the devices it went to.

Bytes per layer per step (forward, and the same in backward): 2 * ep * C * D
* bytes per device, of which (ep - 1) / ep leave it; with C = c k T / ep that is
4 c k T D bytes (ep - 1) / ep forward and backward together, against the
gather route's 4 ep T D bytes (ep - 1) / ep. Exact (nothing dropped) where
C >= the most tokens any device sends one peer; `capacity_factor=None` keeps
the gather route, which is exact always.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat, _specs
from nnx_parallel.core.layouts import ModuleHooks, base_class
from nnx_parallel.runtime import experts, layout, pruning

_STATS: dict[str, dict[str, int]] = {}


def dropped_tokens(reset: bool = False) -> dict[str, dict[str, int]]:
    """Token counts of the all-to-all dispatch since the last reset, per MoE
    layer class: `{"calls", "routed", "dropped"}`, summed over its layers,
    calls and devices. `routed` counts token-device pairs (a token sent to
    two devices counts twice), `dropped` those past capacity. Recorded by a
    `jax.debug.callback` when a step runs (call `jax.effects_barrier()`
    first to see the latest step's). `reset=True` clears them after reading.

    Example:
      >>> dropped_tokens(reset=True) is not None
      True
    """
    out = {k: dict(v) for k, v in _STATS.items()}
    if reset:
        _STATS.clear()
    return out


def capacity(tokens: int, k: int, ep: int, factor: float) -> int:
    """Slots per destination device: ceil(factor * k * tokens / ep), in [1, tokens].

    Example:
      >>> capacity(64, 2, 8, 1.25)
      20
    """
    return max(1, min(tokens, math.ceil(factor * k * tokens / ep)))


def dispatch_call(module, method, hooks: ModuleHooks, args, kwargs):
    """The route's call; `NotLocal` where it cannot run (see the module docstring)."""
    try:
        return _dispatch_call(module, method, hooks, args, kwargs)
    except (TypeError, ValueError) as e:
        raise experts.NotLocal(f"{type(e).__name__}: {e}") from e


def _dispatch_call(module, method, hooks: ModuleHooks, args, kwargs):
    ex, mesh = hooks.experts, hooks.mesh
    graphdef, pstate, flat, treedef, where, batched, entry, manual = experts._plan(
        module, hooks, args, kwargs
    )
    if entry is None:
        raise experts.NotLocal("the batch does not split over the expert axis")
    dims = dict(ex.params)
    specs = jax.tree_util.tree_map_with_path(
        lambda path, var: experts.stack_spec(path, var, dims, ex.axis), pstate, is_leaf=_is_var
    )
    param_in = jax.tree.map(lambda s: _specs.keep_axes(s, manual), specs)
    arrays = [flat[i] for i in where]
    arg_in = [P(entry) if bat else P() for bat in batched]
    if layout.explicit_here(mesh):
        arrays = [experts._to_manual(x, s, manual, mesh) for x, s in zip(arrays, arg_in)]

    def body(pstate, arrays):
        pstate = experts._gather_params(pstate, specs, dims, ex.axis, manual)
        lead = arrays[0].shape[:-1]
        for a, bat in zip(arrays, batched):
            if bat and a.shape[: len(lead)] != lead:
                raise experts.NotLocal("a batched input's leading dims differ from the first's")
        call = functools.partial(experts._own_experts, graphdef, method, dims, ex)
        inputs, run = _callers(call, flat, where, treedef)
        idx = _routing(functools.partial(run, stack=_padded), (pstate, arrays), ex.num_experts)
        slots = _Slots(idx.reshape(math.prod(lead), idx.shape[-1]), lead, ex)
        ones = (1,) * (len(lead) - 1)
        got = [
            slots.send(a).reshape(slots.rows, *ones, *a.shape[len(lead) :]) if bat else a
            for a, bat in zip(arrays, batched)
        ]
        out = _own_call(call, run, ex, pstate, inputs(got), got)
        if not layout.is_array(out) or out.shape[: len(lead)] != (slots.rows, *ones):
            raise experts.NotLocal("the output is not one row per token")
        return slots.back(out.reshape(slots.rows, *out.shape[len(lead) :])), slots.counts(manual)

    mapped = _compat.shard_map(
        body,
        mesh=layout.context_mesh(mesh),
        in_specs=(param_in, arg_in),
        out_specs=(P(entry), P()),
        axis_names=set(manual),
    )
    out, counts = mapped(pstate, arrays)
    jax.debug.callback(functools.partial(_record, experts_name(module)), counts)
    return out


def _callers(call, flat, where, treedef):
    """`inputs(arrays)`: the call's (args, kwargs) with `arrays` in place of its
    array leaves; `run(pstate, arrays, stack)`: the call on fresh variables."""

    def inputs(arrs):
        leaves = list(flat)
        for i, a in zip(where, arrs):
            leaves[i] = a
        return jax.tree.unflatten(treedef, leaves)

    def fresh(pstate):  # the call sets stack values on its variables
        return jax.tree.map(lambda v: v.replace(v.get_value()), pstate, is_leaf=_is_var)

    def run(pstate, arrs, stack):
        a, kw = inputs(arrs)
        return call(fresh(pstate), a, kw, stack)

    return inputs, run


class _Slots:
    """Where each of a device's tokens goes (inside the shard_map).

    `idx` [t, k] are the tokens' experts. A token is sent once to each device
    owning one of them (`wants` [t, ep]), into that device's next free slot
    (`slot`, C = `capacity(...)`: past it, not sent: `keep` false).
    """

    def __init__(self, idx, lead: tuple, ex):
        t, k = idx.shape
        self.axis, self.lead, self.t = ex.axis, lead, t
        self.ep = ep = jax.lax.axis_size(ex.axis)
        self.slots = capacity(t, k, ep, ex.capacity_factor)
        self.rows = ep * self.slots
        dest = idx // (ex.num_experts // ep)
        self.wants = jnp.any(dest[:, :, None] == jnp.arange(ep)[None, None], axis=1)
        pos = jnp.cumsum(self.wants, axis=0) - 1
        self.keep = self.wants & (pos < self.slots)
        self.slot = jnp.where(self.keep, pos, self.slots)  # out of range: not written
        self.device = jnp.broadcast_to(jnp.arange(ep), (t, ep))
        self.valid = self.send(jnp.ones(lead, jnp.float32)).reshape(self.rows)

    def send(self, z):
        """[*lead, ...] -> [ep, C, ...]: row (s, c) is what device s put in slot c for us."""
        rows = z.reshape(self.t, *z.shape[len(self.lead) :])
        feat = rows.shape[1:]
        buf = jnp.zeros((self.ep, self.slots, *feat), z.dtype)
        copies = jnp.broadcast_to(rows[:, None], (self.t, self.ep, *feat))
        buf = buf.at[self.device, self.slot].set(copies, mode="drop")
        return jax.lax.all_to_all(buf, self.axis, 0, 0, tiled=True)

    def back(self, rows):
        """The received rows' outputs [ep C, ...] -> each own token's sum [*lead, ...]."""
        feat = rows.shape[1:]
        rows = rows * self.valid.reshape(-1, *(1,) * len(feat)).astype(rows.dtype)
        back = jax.lax.all_to_all(
            rows.reshape(self.ep, self.slots, *feat), self.axis, 0, 0, tiled=True
        )
        picked = back[self.device, jnp.minimum(self.slot, self.slots - 1)]  # [t, ep, ...]
        weight = self.keep.reshape(self.t, self.ep, *(1,) * len(feat)).astype(picked.dtype)
        return jnp.sum(picked * weight, axis=1).reshape(*self.lead, *feat)

    def counts(self, manual):
        """[routed, dropped] token-device pairs, summed over the manual axes."""
        pairs = [jnp.sum(self.wants), jnp.sum(self.wants & ~self.keep)]
        return jax.lax.psum(jnp.stack(pairs).astype(jnp.int32), tuple(manual))


def experts_name(module) -> str:
    return base_class(module).__name__


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _record(name: str, counts) -> None:
    routed, dropped = (int(c) for c in counts)
    stats = _STATS.setdefault(name, {"calls": 0, "routed": 0, "dropped": 0})
    stats["calls"] += 1
    stats["routed"] += routed
    stats["dropped"] += dropped


def _own_call(call, run, ex, pstate, inputs, got):
    """The call on the received rows with this device's experts: only its own
    experts where the code indexes them one by one (`runtime/pruning.py`),
    else with whole stacks that hold zeros for the experts owned elsewhere."""
    a, kw = inputs
    try:
        out = experts._pruned(call, ex, pstate, a, kw)
        return run(pstate, got, experts.LocalStack) if out is None else out
    except (experts.NotLocal, TypeError, ValueError):  # JAX refuses a LocalStack operand
        return run(pstate, got, _padded)


def _padded(local, num_experts: int, axis: str, name: str):
    """This device's experts in a whole stack of `num_experts`, zeros elsewhere."""
    n = local.shape[0]
    full = jnp.zeros((num_experts, *local.shape[1:]), local.dtype)
    return jax.lax.dynamic_update_slice_in_dim(full, local, jax.lax.axis_index(axis) * n, 0)


# Routing: the layer's own top-k, evaluated alone ---------------------------------------


def _routing(run, operands, num_experts: int):
    """The expert indices the call's own `top_k` over `num_experts` picks for
    `run(*operands)`, computed by only the equations it depends on."""
    closed = jax.make_jaxpr(run)(*operands)
    eqns: list = []
    consts: dict = {}
    counter = itertools.count()
    keys = [next(counter) for _ in closed.jaxpr.invars]
    _flatten(closed.jaxpr, closed.consts, keys, eqns, consts, counter)
    tops = [
        e for e in eqns
        if e[0].primitive.name == "top_k" and e[0].invars[0].aval.shape[-1] == num_experts
    ]  # fmt: skip
    if len(tops) != 1:
        raise experts.NotLocal(
            f"found {len(tops)} top_k over the {num_experts} experts in the call, not one"
        )
    want = {tops[0][2][1]}
    needed = []
    for e in reversed(eqns[: eqns.index(tops[0]) + 1]):
        if want & set(e[2]):
            needed.append(e)
            want |= {k for k in e[1] if isinstance(k, int)}
    env = dict(consts)
    env.update(zip(keys, jax.tree.leaves(operands)))
    for eqn, ins, outs in reversed(needed):
        vals = [k.val if isinstance(k, _Lit) else env[k] for k in ins]
        env.update(zip(outs, _compat.bind_eqn(eqn, vals)))
    return env[tops[0][2][1]]


class _Lit:
    def __init__(self, val):
        self.val = val


def _flatten(jaxpr, consts, in_keys, eqns: list, const_env: dict, counter) -> list:
    """Appends `jaxpr`'s equations to `eqns` as (eqn, in keys, out keys), inner
    jits inlined, every value under a fresh integer key."""
    env: dict = {}

    def key(v):
        is_lit, val = _compat.jaxpr_literal(v)
        return _Lit(val) if is_lit else env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = next(counter)
        const_env[env[v]] = c
    env.update(zip(jaxpr.invars, in_keys))
    for eqn in jaxpr.eqns:
        ins = [key(v) for v in eqn.invars]
        if eqn.primitive.name in pruning.CALLS and "jaxpr" in eqn.params:
            inner = eqn.params["jaxpr"]
            outs = _flatten(inner.jaxpr, inner.consts, ins, eqns, const_env, counter)
        else:
            outs = [next(counter) for _ in eqn.outvars]
            eqns.append((eqn, ins, outs))
        env.update(zip(eqn.outvars, outs))
    return [key(v) for v in jaxpr.outvars]
