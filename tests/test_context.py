"""Context parallelism (`ContextParallel`, runtime/context.py): numerics, HLO, memory, errors.

Every model is tiny (S = 64, d = 32, 4 heads of 8, cp = 4 on a 2x4
('data', 'context') mesh); the memory figures use S = 256. One compile per
case: the same compiled step gives the numerics and the HLO.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import nnx_parallel as npx
from nnx_parallel.core.layouts import get_hooks
from nnx_parallel.runtime import dispatch, trace
from nnx_parallel.runtime import routes as R
from nnx_parallel.views.collectives import collectives
from tests import context_models as cm
from tests.helpers import FWD_TOL, GRAD_TOL, assert_close, guard_warning, hlo_shapes

S, B, CP = 64, 2, 4

MODELS = {
    "mha": (cm.MHALM, "attn"),
    "rope": (cm.RopeLM, "attn"),
    # GQA (2 K/V heads for 4 query heads), causal; the second layer a sliding window.
    "dpa": (functools.partial(cm.DPALM, 2, (None, (8, 0))), "layers.*"),
}


def _mesh(kind):
    return jax.make_mesh((2, CP), ("data", "context"), axis_types=(kind,) * 2)


def _inputs(name, s=S):
    tokens = jax.random.randint(jax.random.key(0), (B, s), 1, cm.VOCAB)
    if name == "dpa":
        return (tokens,)
    tokens = tokens.at[:, -s // 8 :].set(0)  # right padding: masked keys (and, mha, rows)
    if name == "mha":
        return (tokens,)
    return tokens, jnp.broadcast_to(jnp.arange(s), (B, s))


def _step(graphdef):
    """(output, grads of mean(output**2)) as one function of (state, *inputs)."""

    def step(state, *inputs):
        def loss(state):
            y = nnx.merge(graphdef, state)(*inputs)
            return jnp.mean(y**2), y

        (_, y), grads = jax.value_and_grad(loss, has_aux=True)(state)
        return y, grads

    return step


# The rope model also gives the memory figures, at S = 256.
LENGTH = {"mha": S, "rope": 256, "dpa": S}


@functools.cache
def _reference(name):
    model = MODELS[name][0](rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    return jax.jit(_step(graphdef))(state, *_inputs(name, LENGTH[name]))


@functools.cache
def _compiled(name, kind, strategy):
    """The compiled step of `name` with ContextParallel(strategy) on its
    attention (inputs on (batch, sequence)), or, for strategy None, with the
    sequence whole (inputs on batch only); one compile per key per session."""
    mesh = _mesh(kind)
    model = MODELS[name][0](rngs=nnx.Rngs(0))
    plan = _cp_plan(name, strategy) if strategy else npx.Replicated()
    npx.parallelize(model, mesh, plan)
    graphdef, state = nnx.split(model)
    spec = P("data", "context") if strategy else P("data")
    inputs = [NamedSharding(mesh, spec) for _ in _inputs(name, LENGTH[name])]
    inputs = [jax.device_put(x, s) for x, s in zip(_inputs(name, LENGTH[name]), inputs)]
    # The mha caller's padding mask (an outer product of two sequence-sharded
    # arrays) is refused by Explicit types: the root guard runs it in auto_axes.
    with guard_warning(kind == AxisType.Explicit and name == "mha" and strategy is not None):
        with jax.set_mesh(mesh), dispatch.recording() as routes:
            compiled = jax.jit(_step(graphdef)).lower(state, *inputs).compile()
    return compiled, state, inputs, {r for _, _, r in routes}


def _cp_plan(name, strategy):
    if strategy == "ringlb":  # ring with the head-tail load balancer
        return {MODELS[name][1]: npx.ContextParallel("context", strategy="ring", load_balance=True)}
    return {MODELS[name][1]: npx.ContextParallel("context", strategy=strategy)}


CASES = [
    "mha-all_gather", "mha-ring", "rope-all_gather", "dpa-all_gather", "dpa-ring", "dpa-ringlb"
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_equal_to_unsharded(kind, case):
    """Forward and gradients equal the unsharded model's; the output leaves
    sequence-sharded; no [B, H, S, S] scores; ring: no whole-sequence K/V."""
    name, strategy = case.split("-")
    seq = LENGTH[name]
    compiled, state, inputs, routes = _compiled(name, kind, strategy)
    explicit = kind == AxisType.Explicit
    assert R.CONTEXT_AUTO_AXES.name if explicit else R.CONTEXT_CONSTRAIN.name in routes
    y, grads = compiled(state, *inputs)
    y_ref, grads_ref = _reference(name)
    assert_close(y, y_ref, FWD_TOL, "forward")
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        assert_close(g, g_ref, GRAD_TOL, "grad")
    assert tuple(y.sharding.spec)[:2] == ("data", "context")
    shapes = hlo_shapes(compiled)
    # Scores are [B, H, S, S] (GQA: [B, K, G, S, S]); a mask the caller builds
    # from sequence-sharded tokens outside the hooked module can still be a
    # whole [B, S, S] (JAX's types replicate `arange`'s broadcast on Explicit axes).
    assert not [s for s in shapes if len(s) >= 4 and sum(d == seq for d in s) >= 2]
    whole_kv = [s for s in shapes if seq in s and cm.DH in s]  # [.., S, heads, Dh]
    assert bool(whole_kv) == (strategy == "all_gather"), whole_kv  # ring: K/V blocks only


def _kv_bytes(kv_heads):
    """K/V bytes a device receives per layer in forward: 2 S H_kv Dh 4 (cp-1)/cp
    for each of its B/2 batch rows."""
    return 2 * S * kv_heads * cm.DH * 4 * (CP - 1) // CP * (B // 2)


def test_kv_traffic():
    """Forward K/V traffic per layer from the compiled HLO; GQA: only the 2 K/V
    heads move. all_gather: one gather each of K and V. ring: one hop each
    of K and V per step, in a loop of cp - 1 steps (and as many dK/dV hops
    back in backward)."""
    mesh = _mesh(AxisType.Auto)
    ag = collectives(_compiled("dpa", AxisType.Auto, "all_gather")[0], mesh)
    gathered = sum(o.size for o in ag if o.kind == "all-gather" and o.axes == ("context",))
    assert gathered * (CP - 1) // CP == 2 * _kv_bytes(2)  # 2 layers
    compiled = _compiled("dpa", AxisType.Auto, "ring")[0]
    ring = collectives(compiled, mesh)
    hops = [o.size for o in ring if o.kind == "collective-permute"]
    assert len(hops) == 2 * 2 * 2  # K and V, forward and backward, 2 layers
    trips = re.findall(r'known_trip_count":\{"n":"(\d+)"', compiled.as_text())
    assert trips and set(trips) == {str(CP - 1)}
    assert 2 * hops[0] * (CP - 1) == _kv_bytes(2) and len(set(hops)) == 1
    assert not [o for o in ring if o.kind == "all-gather" and o.axes == ("context",)]


def _temp(name, kind, strategy):
    return _compiled(name, kind, strategy)[0].memory_analysis().temp_size_in_bytes


def test_all_gather_memory(kind):
    """Forward + backward temp memory per device at S = 256, cp = 4: at most
    0.35x the whole-sequence run's (same mesh, batch-sharded only)."""
    whole, split = _temp("rope", kind, None), _temp("rope", kind, "all_gather")
    assert split <= 0.35 * whole, (split, whole)


def test_ring_memory_below_all_gather():
    """Ring holds [B, H, S/cp, S/cp] scores per step and K/V blocks only."""
    ag, ring = _temp("dpa", AxisType.Auto, "all_gather"), _temp("dpa", AxisType.Auto, "ring")
    assert ring < 0.6 * ag, (ring, ag)


# Errors and decoding ------------------------------------------------------------


def _traced(model, mesh, *inputs):
    with jax.set_mesh(mesh):
        return nnx.jit(lambda m, *a: m(*a))(model, *inputs)


def test_ring_on_inline_attention_raises():
    model = npx.parallelize(
        cm.RopeLM(rngs=nnx.Rngs(0)), _mesh(AxisType.Auto), _cp_plan("rope", "ring")
    )
    with pytest.raises(npx.PlanError, match="computes attention inline.*all_gather"):
        _traced(model, _mesh(AxisType.Auto), *_inputs("rope"))


def test_sequence_not_divisible_raises():
    mesh = _mesh(AxisType.Auto)
    model = npx.parallelize(cm.DPALM(rngs=nnx.Rngs(0)), mesh, _cp_plan("dpa", "all_gather"))
    tokens = jnp.ones((B, 30), jnp.int32)
    with pytest.raises(npx.PlanError, match="length 30, not divisible by the size 4.* to 32"):
        _traced(model, mesh, tokens)


def test_plan_errors():
    with pytest.raises(npx.PlanError, match="unknown strategy"):
        npx.ContextParallel("context", strategy="ulysses")
    with pytest.raises(npx.PlanError, match="seq_dim=1"):
        npx.ContextParallel("context", seq_dim=1)
    with pytest.raises(npx.PlanError, match="one mesh axis name"):
        npx.ContextParallel(("context", "data"))
    model = cm.DPALM(rngs=nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(model))
    with pytest.raises(npx.PlanError, match="'ctx' is not in the mesh.*Did you mean 'context'"):
        npx.parallelize(model, _mesh(AxisType.Auto), {"layers.*": npx.ContextParallel("ctx")})
    assert get_hooks(model.layers[0]) is None
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)


def test_decode_runs_whole_and_warns_once(kind):
    """A decoding call (KV cache, one token) runs without CP, exact, warned once."""
    mesh = _mesh(kind)
    ref = nnx.MultiHeadAttention(cm.HEADS, cm.D, decode=True, rngs=nnx.Rngs(0))
    model = nnx.MultiHeadAttention(cm.HEADS, cm.D, decode=True, rngs=nnx.Rngs(0))
    for m in (ref, model):
        m.init_cache((B, 8, cm.D))
    npx.parallelize(model, mesh, npx.ContextParallel("context"))
    x = jax.random.normal(jax.random.key(1), (B, 1, cm.D))
    with pytest.warns(npx.FallbackWarning, match="decoding call.*without context parallelism"):
        with jax.set_mesh(mesh), dispatch.recording() as routes:
            y = nnx.jit(lambda m, x: m(x))(model, x)
    assert ("ContextMultiHeadAttention", "__call__", R.CONTEXT_DECODE.name) in routes
    assert_close(y, ref(x), FWD_TOL, "decode step")


def test_static_route():
    mesh = _mesh(AxisType.Auto)
    model = npx.parallelize(cm.DPALM(rngs=nnx.Rngs(0)), mesh, _cp_plan("dpa", "ring"))
    text = str(npx.explain(cm.DPALM(rngs=nnx.Rngs(0)), mesh, _cp_plan("dpa", "ring")))
    assert (
        "layers.0  context  route context as-written/as-is/constrained "
        "(else context as-written/as-is/as-is)"
    ) in text
    layer = model.layers[0]
    assert type(layer).__name__ == "ContextDotProductAttention"
    assert R.route(layer, get_hooks(layer), trace.Trace()) == R.CONTEXT_CONSTRAIN
    explicit = npx.parallelize(
        cm.DPALM(rngs=nnx.Rngs(0)), _mesh(AxisType.Explicit), _cp_plan("dpa", "ring")
    )
    hooks = get_hooks(explicit.layers[0])
    assert R.route(explicit.layers[0], hooks, trace.Trace()) == R.CONTEXT_AUTO_AXES


# plans.context_parallel ----------------------------------------------------------


def test_plan_finds_attention_modules():
    style = npx.ContextParallel("context", strategy="ring")
    for model, pattern in [(cm.MHALM, "attn"), (cm.RopeLM, "attn"), (cm.DPALM, "layers.*")]:
        plan, report = npx.plans.context_parallel(model(rngs=nnx.Rngs(0)), strategy="ring")
        assert plan == {pattern: style}
    assert report.roles == {"layers.0": "attention: projections ['k', 'q', 'v']"}
    with pytest.raises(npx.PlanError, match="found no attention module.*ContextParallel"):
        npx.plans.context_parallel(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
    with pytest.raises(npx.PlanError, match="expects an nnx.Module"):
        npx.plans.context_parallel({"not": "a module"})


def test_composes_with_tensor_parallel_and_fsdp(kind):
    """('fsdp', 'context', 'model') = (2, 2, 2): heads over 'model' (2 K/V heads),
    the sequence over 'context', parameters and batch over 'fsdp'; exact."""
    mesh = jax.make_mesh((2, 2, 2), ("fsdp", "context", "model"), axis_types=(kind,) * 3)
    model, ref = (cm.DPALM(2, (None, (8, 0)), rngs=nnx.Rngs(0)) for _ in range(2))
    tp, _ = npx.plans.tensor_parallel(model)
    strategy = "ring" if kind == AxisType.Auto else "all_gather"
    cp, _ = npx.plans.context_parallel(model, strategy=strategy)
    npx.parallelize(model, mesh, npx.plans.combine({**tp, **cp}, npx.FSDP("fsdp", min_size=64)))
    assert model.layers[0].q.kernel[...].sharding.spec == P("fsdp", "model")
    tokens = _inputs("dpa")[0]
    on_mesh = jax.device_put(tokens, NamedSharding(mesh, P("fsdp", "context")))
    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh):
        y, grads = jax.jit(_step(graphdef))(state, on_mesh)
    y_ref, grads_ref = _reference("dpa")
    assert_close(y, y_ref, FWD_TOL, "forward")
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        assert_close(g, g_ref, GRAD_TOL, "grad")


def test_ring_with_caller_bias_mask_and_scale():
    """Ring attention takes jax.nn's bias, mask (on their query rows) and scale."""
    mesh = _mesh(AxisType.Auto)
    model, ref = (cm.BiasedAttention(rngs=nnx.Rngs(0)) for _ in range(2))
    npx.parallelize(model, mesh, npx.ContextParallel("context", strategy="ring"))
    keys = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(keys[0], (B, S, cm.D))
    bias = jax.random.normal(keys[1], (B, 1, S, S))
    mask = jax.random.bernoulli(keys[2], 0.7, (B, 1, S, S))
    args = (x, bias, mask)
    on_mesh = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in args]
    loss = lambda m, *a: jnp.mean(m(*a) ** 2)  # noqa: E731
    both = nnx.jit(lambda m, *a: (m(*a), nnx.grad(loss)(m, *a)))
    with jax.set_mesh(mesh), dispatch.recording() as routes:
        y, grads = both(model, *on_mesh)
    assert ("ContextBiasedAttention", "__call__", R.CONTEXT_CONSTRAIN.name) in routes
    y_ref, grads_ref = both(ref, *args)
    assert_close(y, y_ref, FWD_TOL, "forward")
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        assert_close(g, g_ref, GRAD_TOL, "grad")
    ring = npx.ContextParallel("context", strategy="ring")
    lengths = npx.parallelize(cm.BiasedAttention(True, rngs=nnx.Rngs(0)), mesh, ring)
    with pytest.raises(npx.PlanError, match=r"does not take arguments \['key_value_seq_lengths'\]"):
        _traced(lengths, mesh, *on_mesh)


def test_load_balance_scores_chunk_pairs_and_skips_those_above_the_diagonal():
    """Ring with load_balance on a causal GQA layer at S = 256, cp = 4: scores
    come in [S/2cp, S/2cp] chunk pairs, pairs above the diagonal sit behind a
    `conditional`, and temp memory falls (benchmarks/context_parallel.py has
    the step times and longer sequences)."""
    seq, c = 256, 256 // (2 * CP)
    mesh = jax.make_mesh((CP,), ("context",), devices=jax.devices()[:CP])
    whole = jax.random.randint(jax.random.key(0), (1, seq), 0, cm.VOCAB)
    y_ref = cm.DPALM(2, (None,), rngs=nnx.Rngs(0))(whole)
    tokens = jax.device_put(whole, NamedSharding(mesh, P(None, "context")))
    out = {}
    for balanced in (False, True):
        model = cm.DPALM(2, (None,), rngs=nnx.Rngs(0))
        style = npx.ContextParallel("context", strategy="ring", load_balance=balanced)
        npx.parallelize(model, mesh, {"layers.*": style})
        graphdef, state = nnx.split(model)
        with jax.set_mesh(mesh):
            compiled = jax.jit(_step(graphdef)).lower(state, tokens).compile()
            y, _ = compiled(state, tokens)
        assert_close(y, y_ref, FWD_TOL, f"forward, load_balance={balanced}")
        out[balanced] = compiled
    balanced, plain = out[True], out[False]
    temp = {k: v.memory_analysis().temp_size_in_bytes for k, v in out.items()}
    assert temp[True] < 0.8 * temp[False], temp
    assert "conditional(" in balanced.as_text() and "conditional(" not in plain.as_text()
    chunk_pairs = [s for s in hlo_shapes(balanced) if len(s) >= 4 and s[-2:] == (c, c)]
    assert chunk_pairs and not [s for s in hlo_shapes(balanced) if s[-2:] == (2 * c, 2 * c)]


def test_load_balance_errors():
    with pytest.raises(npx.PlanError, match="load_balance=True.*Use strategy='ring'"):
        npx.ContextParallel("context", load_balance=True)
    with pytest.raises(npx.PlanError, match="load_balance"):
        npx.ContextParallel("context", strategy="ring", load_balance="yes")
    mesh = _mesh(AxisType.Auto)
    model = cm.DPALM(2, (None,), rngs=nnx.Rngs(0))
    npx.parallelize(
        model,
        mesh,
        {"layers.*": npx.ContextParallel("context", strategy="ring", load_balance=True)},
    )
    tokens = jax.device_put(jnp.ones((2, 36), int), NamedSharding(mesh, P("data")))
    with pytest.raises(npx.PlanError, match=r"not divisible by 2 x the size 4 .* Pad .* to 40"):
        _traced(model, mesh, tokens)
