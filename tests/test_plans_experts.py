"""plans.expert_parallel: MoE layers found by structure, whatever their names."""

import re

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

import nnx_parallel as npx
from nnx_parallel import ExpertParallel, plans
from tests import moe_models as mm
from tests.models import GPT


def _abstract(make):
    return nnx.eval_shape(make)


def test_finds_each_idiom_in_a_gpt_and_a_scanned_stack():
    for idiom, cls in mm.IDIOMS.items():
        model = _abstract(lambda cls=cls: mm.MoEGPT(moe=cls, rngs=nnx.Rngs(0)))
        plan, report = plans.expert_parallel(model)
        assert plan == {"blocks.*.moe": ExpertParallel("expert")}, idiom
        assert set(report.roles) == {"blocks.0.moe", "blocks.1.moe"}
        assert report.roles["blocks.0.moe"].startswith("experts: E=8 in "), idiom
    scanned = _abstract(lambda: mm.ScannedMoE(rngs=nnx.Rngs(0)))
    plan, report = plans.expert_parallel(scanned, "ep")
    assert plan == {"blocks.moe": ExpertParallel("ep")}
    assert "router router" in report.roles["blocks.moe"]


def test_renamed_layers_are_found_and_dense_models_are_left_alone():
    class Mixer(nnx.Module):  # no conventional names at all
        def __init__(self, rngs):
            self.pick = nnx.Linear(16, 4, rngs=rngs)
            self.a = nnx.Param(jax.numpy.zeros((4, 16, 8)))
            self.b = nnx.Param(jax.numpy.zeros((4, 8, 16)))

    plan, report = plans.expert_parallel(Mixer(nnx.Rngs(0)))
    assert plan == {"": ExpertParallel("expert")}
    assert report.roles[""] == "experts: E=4 in a, b; router pick"
    assert plans.expert_parallel(_abstract(lambda: GPT(rngs=nnx.Rngs(0))))[0] == {}


def test_stacks_without_a_router_are_reported_not_guessed():
    class Stacked(nnx.Module):
        def __init__(self):
            self.w1 = nnx.Param(jax.numpy.zeros((4, 16, 8)))
            self.w2 = nnx.Param(jax.numpy.zeros((4, 8, 16)))

    plan, report = plans.expert_parallel(Stacked())
    assert plan == {}
    assert "no single router" in report.unclassified[""]
    assert "ExpertParallel('expert', num_experts=E)" in report.unclassified[""]


def test_composes_with_tensor_parallel_and_fsdp():
    mesh = jax.make_mesh((2, 2, 2), ("data", "expert", "model"))
    model = _abstract(lambda: mm.MoEGPT(rngs=nnx.Rngs(0)))
    tp, _ = plans.tensor_parallel(model)
    ep, _ = plans.expert_parallel(model)
    plan = plans.combine({**tp, **ep}, npx.FSDP("data", min_size=256))
    specs = npx.resolve(model, mesh, plan).specs()
    assert specs["blocks.0.moe.gate_proj"] == P("expert", None, "data")
    assert specs["blocks.0.attn.q.kernel"] == P("data", "model")
    assert "expert" not in str(specs["blocks.0.moe.router.kernel"])  # the router: not spread
    text = npx.explain(model, mesh, plan)
    assert re.search(r"blocks\.0\.moe +gather +route experts manual/as-is/as-is \(else ", text)
