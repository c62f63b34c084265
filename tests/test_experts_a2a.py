"""The all-to-all expert dispatch (runtime/experts_a2a.py, `ExpertParallel(capacity_factor=c)`)
on the three MoE idioms of tests/moe_models.py: numerics against the unsharded
model, the bytes it moves (from the compiled step), dropped-token counts, the
fallback where a layer has no top-k, and bad capacity factors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import nnx_parallel as npx
from nnx_parallel import ExpertParallel, FallbackWarning, PlanError
from nnx_parallel.runtime import experts_a2a
from nnx_parallel.runtime import routes as R
from nnx_parallel.runtime.dispatch import recording
from nnx_parallel.views.collectives import collectives
from tests import moe_models as mm
from tests.helpers import flat_state as _flat
from tests.test_experts import (
    X,
    _check_local,
    _check_numerics,
    _mesh,
    _run,
    _stacks,
    weight_collectives,
)

CF = 4.0  # C = ceil(4 * 2 * 3 / ep) >= the 3 local tokens: nothing can be dropped


def _plan(mesh):
    return ExpertParallel("expert", capacity_factor=CF)


CASES = [(i, e, "8") for i in ("loop", "ragged", "dense") for e in (False, True)]
CASES += [("loop", True, "2x4")]


@pytest.mark.parametrize(("idiom", "explicit", "mesh_name"), CASES)
def test_all_to_all_equals_unsharded_and_moves_only_tokens(idiom, explicit, mesh_name):
    """Loss, gradients and one Adam step equal the unsharded model's (1e-5);
    expert stacks and their gradients stay 1/ep per device; the expert axis
    carries only the all-to-alls, of exactly these bytes per step (T local
    tokens, k = 2, C slots, D = 16, f32): forward the tokens, a validity row
    per slot and the outputs back ([ep, C, D], [ep, C], [ep, C, D]); backward
    the outputs' cotangent ([ep, C, D]; the input needs none here). That is
    within the issue's 4 k T D bytes c."""
    cls = mm.IDIOMS[idiom]
    mesh, model, compiled, loss, grads, routes = _run(cls, mesh_name, explicit, _plan)
    assert {r for *_, r in routes} == {R.EXPERTS_ALL_TO_ALL.name}
    _check_numerics(cls, model, loss, grads)
    _check_local(model, grads, mesh)
    ops = collectives(compiled, mesh)
    assert weight_collectives(ops, _stacks(model)) == []
    ep = mesh.shape["expert"]
    t = X.shape[0] // mesh.size * X.shape[1]
    slots = experts_a2a.capacity(t, mm.K, ep, CF)
    assert slots == t
    moved = sorted(c.size for c in ops if c.kind == "all-to-all")
    big, mask = ep * slots * mm.D * 4, ep * slots * 4
    assert moved == sorted([big, big, big, mask]), moved
    assert sum(moved) <= 4 * mm.K * t * mm.D * 4 * CF + mask
    assert not [
        c for c in ops if c.axes == ("expert",) and c.kind in ("all-gather", "reduce-scatter")
    ]


def _expected_counts(model, x, ep, slots):
    """Token-device pairs routed and dropped, from the unsharded router and the
    batch split: device s holds x[s], sends each token once to every device
    owning one of its top-k experts, at most `slots` per destination."""
    logits = np.asarray(model.router(x))
    idx = np.argsort(-logits, axis=-1)[..., : mm.K]  # [B, S, k]
    per = mm.E // ep
    routed = dropped = 0
    for s in range(x.shape[0]):
        dest = idx[s] // per  # [S, k]
        for r in range(ep):
            n = int(np.sum(np.any(dest == r, axis=-1)))
            routed += n
            dropped += max(0, n - slots)
    return routed, dropped


def test_capacity_drops_are_counted_and_reported():
    """capacity_factor=0.5: C = 1 slot per device pair; the counts reported
    equal those computed from the unsharded router, and nothing is dropped
    with room for every token."""
    mesh = _mesh("8", False)
    batch = jax.device_put(X, NamedSharding(mesh, P("expert")))
    expected = {}
    for cf in (0.5, CF):
        model = npx.parallelize(
            mm.LoopMoE(rngs=nnx.Rngs(0)), mesh, ExpertParallel("expert", capacity_factor=cf)
        )
        slots = experts_a2a.capacity(3, mm.K, 8, cf)
        expected[cf] = _expected_counts(mm.LoopMoE(rngs=nnx.Rngs(0)), X, 8, slots)
        npx.dropped_tokens(reset=True)
        with jax.set_mesh(mesh):
            jax.block_until_ready(nnx.jit(lambda m, x: m(x))(model, batch))
        jax.effects_barrier()
        got = npx.dropped_tokens(reset=True)["LoopMoE"]
        assert (got["calls"], got["routed"], got["dropped"]) == (1, *expected[cf])
    assert expected[0.5][1] > 0 and expected[CF][1] == 0
    assert npx.dropped_tokens() == {}


class SoftMoE(nnx.Module):
    """Every expert weighted by a dense softmax: no top-k to dispatch by."""

    def __init__(self, d=mm.D, e=mm.E, *, rngs):
        self.router = nnx.Linear(d, e, rngs=rngs)
        self.w = nnx.Param(0.2 * jax.random.normal(rngs.params(), (e, d, d)))

    def __call__(self, x):
        weights = jax.nn.softmax(self.router(x), axis=-1)
        return jnp.einsum("bse,bsd,edf->bsf", weights, x, self.w[...])


def test_a_layer_without_top_k_falls_back_to_the_gather_and_says_so():
    mesh = _mesh("8", False)
    ref = SoftMoE(rngs=nnx.Rngs(0))
    model = npx.parallelize(
        SoftMoE(rngs=nnx.Rngs(0)), mesh, ExpertParallel("expert", capacity_factor=1.25)
    )
    batch = jax.device_put(X, NamedSharding(mesh, P("expert")))
    with (
        jax.set_mesh(mesh),
        recording() as routes,
        pytest.warns(FallbackWarning, match=r"SoftMoE.__call__: no all-to-all.*0 top_k"),
    ):
        out = nnx.jit(lambda m, x: m(x))(model, batch)
    # Taken back: the all-to-all, then the per-device route (whole stacks);
    # what ran is GSPMD's on the sharded stacks.
    assert [r for *_, r in routes] == [R.EXPERTS_AS_WRITTEN.name]
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref(X)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -1.0, True, "1.25"])
def test_bad_capacity_factor_is_refused(bad):
    with pytest.raises(PlanError, match=r"capacity_factor=.*a number > 0"):
        ExpertParallel("expert", capacity_factor=bad)


def test_explain_names_the_route_and_plans_pass_the_factor():
    mesh = _mesh("8", False)
    model = mm.MoEGPT(rngs=nnx.Rngs(0))
    plan, _ = npx.plans.expert_parallel(model, capacity_factor=1.5)
    assert plan == {"blocks.*.moe": ExpertParallel("expert", capacity_factor=1.5)}
    text = npx.explain(model, mesh, plan)
    assert "route experts-a2a manual/as-is/as-is (else" in text


def test_capacity_rounds_up_and_stays_within_the_tokens():
    assert experts_a2a.capacity(64, 2, 8, 1.25) == math.ceil(1.25 * 2 * 64 / 8) == 20
    assert experts_a2a.capacity(3, 2, 8, 0.01) == 1
    assert experts_a2a.capacity(3, 2, 8, 100.0) == 3


@pytest.mark.parametrize("cf", [None, CF])
def test_scanned_stack_without_fsdp_keeps_experts_put(cf):
    """A scanned stack of loop MoE blocks (an untagged `nnx.vmap` stack: inside
    `nnx.scan` its params carry no layout): each device still enters the call
    with its own experts, on the gather route (cf None) and the all-to-all
    (before, the gather route took the whole stack and fell back to GSPMD,
    which moved per-expert slices over the expert axis)."""
    cls = mm.SmallScannedMoE  # E = 4: one expert per device on the 'expert' axis

    def plan(mesh):
        return {"blocks.moe": ExpertParallel("expert", capacity_factor=cf)}

    mesh, model, compiled, loss, grads, routes = _run(cls, "2x4", False, plan)
    route = R.EXPERTS_MANUAL if cf is None else R.EXPERTS_ALL_TO_ALL
    assert {r for *_, r in routes} == {route.name}
    _check_numerics(cls, model, loss, grads)
    ops = collectives(compiled, mesh)
    stacks = {k: v for k, v in _flat(nnx.state(model, nnx.Param)).items() if "proj" in k}
    per_layer = {k: v[0] for k, v in stacks.items()}
    assert not [c for c in weight_collectives(ops, per_layer) if "expert" in c.axes]
    assert not [c for c in ops if c.kind == "collective-permute"]


def test_all_to_all_composes_with_fsdp_and_remat():
    """(ExpertParallel(capacity_factor), FSDP('data'), Remat) on ('data', 'expert'),
    Explicit axes: equal to unsharded; the stacks are gathered over 'data' only."""

    def plan(mesh):
        return (
            ExpertParallel("expert", capacity_factor=CF),
            npx.FSDP("data", min_size=64),
            npx.Remat(),
        )

    mesh, model, compiled, loss, grads, routes = _run(mm.LoopMoE, "2x4", True, plan)
    assert R.EXPERTS_ALL_TO_ALL.name in {r for *_, r in routes}
    _check_numerics(mm.LoopMoE, model, loss, grads)
    ops = collectives(compiled, mesh)
    assert not [c for c in weight_collectives(ops, _stacks(model)) if "expert" in c.axes]
    assert [c for c in ops if c.kind == "all-to-all"]
