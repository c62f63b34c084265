"""Which layer feeds which: the data flow the tensor-parallel auto-plan pairs by.

A Megatron pair is a layer sharded on its outputs (column) whose output
reaches only the next layer, sharded on its inputs (row), through ops that
never mix features: elementwise ops, pooling, padding, per-channel norms
(`BatchNorm`, a `GroupNorm` whose groups the axis size divides) and
dropout. Between them the activation stays sharded and nothing is sent;
after the row layer one all-reduce sums its output. Names cannot tell that:
the UNet's upsampling conv `up` feeds a concatenation, and a conv called
`conv2` may be the start of one.

How the flow is read, without editing the model: the model is traced once
abstractly (`jax.make_jaxpr` on `ShapeDtypeStruct`s, nothing allocated or
run) on a copy whose leaf layers run inside `jax.named_scope("npx[path]")`.
Every equation of the jaxpr then names the layer it belongs to, and the
jaxpr's variables are the data flow: walking them backward from a layer's
inputs (forward from its outputs) through feature-local ops gives the
layers it reads from (feeds). Calls (`pjit`, `custom_jvp_call`, remat) are
inlined; the body of each `scan` (an `nnx.scan` layer stack) is read on its
own, with its carry as input and output, so a stacked block's pairs are
found once for every layer. This is exact where matching names or shapes
guesses: a residual `add`, a skip `concatenate` or a `reshape` between two
layers is seen as what it is.

The input to trace with is the caller's (`example=`), else guessed from the
layers: int ids for an `Embed`, an image (1, 32, 32, c) for the convs'
smallest input channel count, a vector for a `Linear`. If no guess runs,
there is no flow and the caller falls back to names.

Example:
  >>> flow = trace_flow(TinyMLP(rngs=nnx.Rngs(0)))
  >>> flow.pairs
  {'up': 'down'}
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nnx_parallel.core.graph import walk

# Layers with a weight the plan can shard (compute layers).
COMPUTE = (nnx.Linear, nnx.Conv, nnx.ConvTranspose, nnx.Einsum, nnx.LinearGeneral)
_LEAVES = COMPUTE + (nnx.Embed, nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm)
_LEAVES += (nnx.Dropout,)
# Primitives that compute each feature from the same feature only.
_LOCAL = frozenset(
    "add sub mul div max min neg exp exp2 log log1p tanh logistic erf erfc integer_pow "
    "square sqrt rsqrt pow abs sign select_n convert_element_type stop_gradient copy copy_p "
    "clamp ge gt lt le eq ne and or not broadcast_in_dim reduce_window_max reduce_window_sum "
    "reduce_window_min pad cumsum expm1 sin cos is_finite nextafter".split()
)
_CALLS = ("jaxpr", "call_jaxpr", "fun_jaxpr")  # params holding an inlined callee
_MARK = re.compile(r"npx\[([^\]]*)\]")
IN, OUT, MIX, CARRY, CARRY_OUT = "<input>", "<output>", "<mix>", "<carry>", "<carry-out>"


@dataclasses.dataclass
class Flow:
    """What the trace found.

    Attributes:
      pairs: Column layer path -> the row layer path it alone feeds.
      chains: Stacked layers whose block has no pair: each layer's output
        is the next layer's input (the `nnx.scan` carry).
      feeds: Layer path -> the set of what it feeds (paths, or `<mix>`,
        `<output>`, `<carry-out>`), for every compute layer traced.
      reads: Layer path -> what its input comes from.
      stacked: Compute layers traced inside a `scan` body.
      error: Why nothing was traced (then everything above is empty).
    """

    pairs: dict[str, str] = dataclasses.field(default_factory=dict)
    chains: list[str] = dataclasses.field(default_factory=list)
    feeds: dict[str, set] = dataclasses.field(default_factory=dict)
    reads: dict[str, set] = dataclasses.field(default_factory=dict)
    stacked: set = dataclasses.field(default_factory=set)
    order: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None
    named: Any = None


def trace_flow(model: nnx.Module, example: Any = None, *, local=None, named=None) -> Flow:
    """The data flow between `model`'s layers on one abstract call.

    Args:
      model: Concrete or abstract (`nnx.eval_shape`); not modified.
      example: The positional args of one call (an array, a
        `ShapeDtypeStruct` or a tuple of them); None: guessed.
      local: Extra predicate `module -> bool` for layers that keep
        features apart (e.g. a GroupNorm that fits the mesh).
      named: `(path, role) -> bool`: whether the name of `path` suggests
        `role` ("column" or "row"). Only breaks ties: in a chain A -> B -> C
        where both (A, B) and (B, C) could pair, (B, C) is taken if the
        names suggest it and not (A, B).
    """
    modules = walk(model)[0]
    kinds = {p: _kind(m, local) for p, m in modules.items() if isinstance(m, _LEAVES)}
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    errors = []
    for args in [example] if example is not None else _guesses(modules):
        args = args if isinstance(args, tuple) else (args,)
        try:
            jaxpr = jax.make_jaxpr(_traced_call(graphdef))(state, args)
        except Exception as err:  # noqa: BLE001  a guess that does not fit the model
            errors.append(f"{[getattr(a, 'shape', a) for a in args]}: {type(err).__name__}")
            continue
        n_params = len(jax.tree.leaves(state))
        flow = Flow()
        flow.named = named or (lambda path, role: False)
        _Scope(jaxpr.jaxpr, kinds, set(jaxpr.jaxpr.invars[:n_params]), flow).read()
        return flow
    return Flow(error="no input fits the model (" + "; ".join(errors) + "); pass example=")


def _kind(module, local) -> str:
    if isinstance(module, COMPUTE):
        return "compute"
    if isinstance(module, (nnx.BatchNorm, nnx.Dropout)) or (local and local(module)):
        return "local"
    return "other"


def _traced_call(graphdef):
    def call(state, args):
        model = nnx.merge(graphdef, state)
        for path, module in walk(model)[0].items():
            if isinstance(module, _LEAVES):
                object.__setattr__(module, "__class__", _marked(type(module), path))
        return model(*args)

    return call


_MARKED: dict[tuple[type, str], type] = {}


def _marked(cls: type, path: str) -> type:
    """`cls` whose `__call__` runs inside `jax.named_scope('npx[path]')`."""
    key = (cls, path)
    if key not in _MARKED:
        base = cls.__call__

        def __call__(self, *args, **kwargs):
            with jax.named_scope(f"npx[{path}]"):
                return base(self, *args, **kwargs)

        _MARKED[key] = type(cls.__name__, (cls,), {"__call__": __call__})
    return _MARKED[key]


def _guesses(modules) -> list[tuple]:
    """Inputs to try: token ids, an image for the convs, a vector for a Linear."""
    out = []
    if any(isinstance(m, nnx.Embed) for m in modules.values()):
        out.append((jax.ShapeDtypeStruct((1, 8), jnp.int32),))
    convs = [m for m in modules.values() if isinstance(m, nnx.Conv)]
    if convs:
        conv = min(convs, key=lambda m: m.in_features)
        spatial = (32,) * (len(conv.kernel_size) if conv.kernel_size else 2)
        out.append((jax.ShapeDtypeStruct((1, *spatial, conv.in_features), jnp.float32),))
    linears = [m for m in modules.values() if isinstance(m, nnx.Linear)]
    for width in sorted({m.in_features for m in linears})[:2]:
        out.append((jax.ShapeDtypeStruct((1, width), jnp.float32),))
    return out


@dataclasses.dataclass(eq=False)
class _Eqn:
    """One equation after inlining: its primitive, operands, results and layer."""

    name: str
    ins: list
    outs: list
    layer: str | None


class _Scope:
    """One jaxpr (the whole call, or one `scan` body) flattened and read.

    Inlined callees get fresh variables per call site: JAX caches the jaxpr
    of `relu` and friends, so one callee's variables recur at every call.
    """

    def __init__(self, jaxpr, kinds, neutral, flow: Flow, carry=(), carry_out=(), prefix=""):
        self.kinds, self.flow = kinds, flow
        self.eqns: list[_Eqn] = []
        self.carry, self.neutral = set(carry), set(neutral)
        self.stacked = bool(prefix)
        self._flatten(jaxpr, prefix, {}, inlined=False)
        self.outvars = set(v for v in jaxpr.outvars if not _literal(v))
        self.carry_out = {v for v in carry_out if not _literal(v)}

    def _flatten(self, jaxpr, prefix: str, env: dict, inlined: bool) -> None:
        def get(v):
            return v if _literal(v) else env.get(v, v)

        for eqn in jaxpr.eqns:
            stack = prefix + "/" + str(eqn.source_info.name_stack)
            ins = [get(v) for v in eqn.invars]
            callee = next((eqn.params[k] for k in _CALLS if k in eqn.params), None)
            if eqn.primitive.name != "scan" and callee is not None:
                callee = getattr(callee, "jaxpr", callee)
                inner = dict(zip(callee.invars, ins))
                self._flatten(callee, stack, inner, inlined=True)
                for o, i in zip(eqn.outvars, callee.outvars):
                    env[o] = i if _literal(i) else inner.get(i, i)
                continue
            outs = [object() for _ in eqn.outvars] if inlined else list(eqn.outvars)
            env.update(zip(eqn.outvars, outs) if inlined else ())
            marks = _MARK.findall(stack)
            self.eqns.append(_Eqn(eqn.primitive.name, ins, outs, marks[-1] if marks else None))
            if eqn.primitive.name == "scan":
                self._scan(eqn, ins, stack)

    def _scan(self, eqn, ins, stack: str) -> None:
        """Reads a scan body on its own: consts and xs from params stay params."""
        body = eqn.params["jaxpr"].jaxpr
        consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
        neutral = {b for b, o in zip(body.invars, ins) if self._is_neutral(o)}
        carry = body.invars[consts : consts + n_carry]
        sub = _Scope(body, self.kinds, neutral, self.flow, carry, body.outvars[:n_carry], stack)
        sub.read()

    def _is_neutral(self, v) -> bool:
        return _literal(v) or v in self.neutral

    def read(self) -> None:
        """Fills the flow: what each compute layer reads and feeds, its pairs."""
        self.producer = {}
        self.users: dict = {}
        for i, eqn in enumerate(self.eqns):
            if eqn.ins and all(self._is_neutral(v) for v in eqn.ins):
                self.neutral.update(eqn.outs)  # computed from params only
            for v in eqn.ins:
                if not _literal(v):
                    self.users.setdefault(v, []).append(i)
            for v in eqn.outs:
                self.producer[v] = i
        order = list(dict.fromkeys(e.layer for e in self.eqns if self._compute(e.layer)))
        for layer in order:
            self.flow.reads[layer] = self._reads(layer)
            self.flow.feeds[layer] = self._feeds(layer)
            if self.stacked:
                self.flow.stacked.add(layer)
        self.flow.order += order
        self._pair(order)

    def _compute(self, layer) -> bool:
        return layer is not None and self.kinds.get(layer) == "compute"

    def _local(self, i: int) -> bool:
        eqn = self.eqns[i]
        if eqn.layer is not None and self.kinds.get(eqn.layer) == "local":
            return True
        return eqn.layer is None and eqn.name in _LOCAL

    def _reads(self, layer: str) -> set:
        inputs = {
            v
            for eqn in self.eqns
            if eqn.layer == layer
            for v in eqn.ins
            if not self._is_neutral(v) and self._layer_of(v) != layer
        }
        out, seen, todo = set(), set(), list(inputs)
        while todo:
            v = todo.pop()
            if self._is_neutral(v) or v in seen:
                continue
            seen.add(v)
            i = self.producer.get(v)
            if i is None:
                out.add(CARRY if v in self.carry else IN)
            elif self._compute(self.eqns[i].layer):
                out.add(self.eqns[i].layer)
            elif self._local(i):
                todo += self.eqns[i].ins
            else:
                out.add(MIX)
        return out

    def _layer_of(self, v):
        i = self.producer.get(v)
        return None if i is None else self.eqns[i].layer

    def _feeds(self, layer: str) -> set:
        produced = [v for eqn in self.eqns if eqn.layer == layer for v in eqn.outs]
        out, seen, todo = set(), set(), [(v, False) for v in produced]
        while todo:
            v, via_norm = todo.pop()
            if v in seen:
                continue
            seen.add(v)
            if v in self.carry_out:
                out.add(CARRY_OUT)
            elif v in self.outvars and not via_norm:
                out.add(OUT)
            for i in self.users.get(v, ()):
                lay = self.eqns[i].layer
                if lay == layer:
                    continue
                if self._compute(lay):
                    out.add(lay)
                elif self._local(i):
                    norm = lay is not None and lay != layer
                    todo += [(u, norm) for u in self.eqns[i].outs]
                else:
                    out.add(MIX)
        return out

    def _partner(self, a: str, used: set) -> str | None:
        return _partner_of(self.flow, a, used)

    def _names_favour(self, a: str, b: str) -> bool:
        return self.flow.named(a, "column") or self.flow.named(b, "row")

    def _pair(self, order: list[str]) -> None:
        """Greedy in call order: A feeds only B and B reads only A."""
        flow, used = self.flow, set()
        for a in order:
            b = self._partner(a, used)
            if b is None:
                continue
            c = self._partner(b, used)
            if c is not None and self._names_favour(b, c) and not self._names_favour(a, b):
                a, b = b, c  # the tie-break: names say the pair starts one layer later
            flow.pairs[a] = b
            used |= {a, b}
        for a in order:
            if self.stacked and a not in used:
                if flow.reads[a] <= {CARRY} and flow.feeds[a] <= {CARRY_OUT}:
                    flow.chains.append(a)


def _partner_of(flow: Flow, a: str, used: set) -> str | None:
    """The layer `a` alone feeds, if that layer reads only `a` (both free)."""
    b = _single(flow.feeds.get(a, set()))
    if a in used or b is None or b in used or flow.reads.get(b) != {a}:
        return None
    return b


def _literal(v) -> bool:
    """A jaxpr literal (a constant operand), not a variable."""
    return type(v).__name__ == "Literal"


def _single(feeds: set) -> str | None:
    (only,) = feeds if len(feeds) == 1 else (None,)
    return only if only is not None and not only.startswith("<") else None


# From flow to roles -------------------------------------------------------------------


def flow_roles(flow: Flow, layers) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """(path -> (role, why), path -> why unpaired) for the compute `layers`.

    Pairs become column/row; a stacked layer whose block has no pair and
    whose output is the next layer's input becomes row (the carry stays
    whole: one all-reduce per layer, exact). Everything else is reported.
    """
    roles, unpaired = {}, {}
    rows = {b: a for a, b in flow.pairs.items()}
    for path in layers:
        if path in flow.pairs:
            roles[path] = ("column", f"feeds only {flow.pairs[path]!r} (data flow)")
        elif path in rows:
            roles[path] = ("row", f"reads only {rows[path]!r} (data flow)")
        elif path in flow.chains:
            roles[path] = ("row", "stacked layer: its output is the next layer's input")
        else:
            unpaired[path] = _why_unpaired(flow, path)
    return roles, unpaired


def _why_unpaired(flow: Flow, path: str) -> str:
    feeds, reads = flow.feeds.get(path), flow.reads.get(path, set())
    if feeds is None:
        return "not called in the traced forward pass; left replicated"
    if len(feeds) > 1:
        why = f"its output feeds {len(feeds)} places ({', '.join(sorted(feeds))})"
    elif MIX in feeds:
        why = "its output goes through an op that mixes features (concatenate, reshape, "
        why += "matmul, a norm over features) before the next layer"
    elif feeds <= {OUT, CARRY_OUT}:
        why = "its output leaves the model (or the scanned block)"
    elif len(reads) > 1:
        why = f"its partner {_single(feeds)!r} also reads {', '.join(sorted(reads - {path}))}"
    else:
        why = f"its partner {_single(feeds)!r} is already paired"
    return f"no column/row partner by data flow: {why}; left replicated"
