"""Expert parallelism (core/experts.py, runtime/experts.py) on the MoE idioms
of tests/moe_models.py: specs, errors, numerics against the unsharded model,
and, from the compiled train step, that tokens move and weights do not."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import nnx_parallel as npx
from nnx_parallel import ExpertParallel, PlanError
from nnx_parallel.runtime import routes as R
from nnx_parallel.runtime.dispatch import recording
from nnx_parallel.views.collectives import collectives
from tests import moe_models as mm
from tests.helpers import assert_close
from tests.helpers import flat_state as _flat

MESHES = {"8": ((8,), ("expert",)), "2x4": ((2, 4), ("data", "expert"))}
X = jax.random.normal(jax.random.key(1), (8, 3, 16))  # T = 24 tokens, D = 16


def _mesh(name, explicit):
    shape, names = MESHES[name]
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(names))


def _loss(model, x):
    return jnp.mean(model(x) ** 2)


def _step(model, opt, x):
    loss, grads = nnx.value_and_grad(_loss)(model, x)
    opt.update(model, grads)
    return loss, grads


_REF: dict = {}


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def _reference(cls):
    """Loss, grads, params after one Adam step, and FLOPs of the unsharded step (cached)."""
    if cls not in _REF:
        ref = cls(rngs=nnx.Rngs(0))
        opt = nnx.Optimizer(ref, optax.adam(1e-3), wrt=nnx.Param)
        graphdef, state = nnx.split((ref, opt))

        def pure(state, x):
            m, o = nnx.merge(graphdef, state)
            loss, grads = _step(m, o, x)
            return loss, grads, nnx.state((m, o))

        compiled = jax.jit(pure).lower(state, X).compile()
        loss, grads, state = compiled(state, X)
        nnx.update((ref, opt), state)
        _REF[cls] = (loss, _flat(grads), _flat(nnx.state(ref, nnx.Param)), _flops(compiled))
    return _REF[cls]


def _stacks(model, num=mm.E):
    params = _flat(nnx.state(model, nnx.Param))
    return {k: v for k, v in params.items() if v.shape[0] == num and "router" not in k}


def weight_collectives(ops, stacks):
    """Collectives that carry an expert stack or one expert's matrix (any dim order)."""
    shapes = set()
    for v in stacks.values():
        shapes.add(tuple(sorted(v.shape)))
        if v.ndim >= 3:
            shapes.add(tuple(sorted(v.shape[1:])))
    biggest = max(v.nbytes for v in stacks.values())
    moving = []
    for c in ops:
        if c.kind == "all-reduce":
            continue  # gradient sums over data replicas; a stack is never gathered by them
        if c.size >= biggest:  # e.g. FSDP's flat buffer holding the stacks
            moving.append(c)
            continue
        for part in c.shape.split("]")[:-1]:
            dims = tuple(sorted(int(d) for d in part.split("[")[-1].split(",") if d))
            if dims in shapes:
                moving.append(c)
    return moving


def _run(cls, mesh_name, explicit, plan_for=lambda m: ExpertParallel("expert")):
    """One compile of the sharded train step; its HLO, loss and grads."""
    mesh = _mesh(mesh_name, explicit)
    model = npx.parallelize(cls(rngs=nnx.Rngs(0)), mesh, plan_for(mesh))
    batch = jax.device_put(X, NamedSharding(mesh, P(mesh.axis_names)))
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))

    def pure(state, x):
        m, o = nnx.merge(graphdef, state)
        loss, grads = _step(m, o, x)
        return loss, grads, nnx.state((m, o))

    with jax.set_mesh(mesh), recording() as routes:
        compiled = jax.jit(pure).lower(state, batch).compile()
        loss, grads, state = compiled(state, batch)
    nnx.update((model, opt), state)
    return mesh, model, compiled, loss, grads, routes


def _check_numerics(cls, model, loss, grads):
    loss_ref, grads_ref, params_ref, _ = _reference(cls)
    assert_close(loss, loss_ref, 1e-5, "loss (forward)")
    got = _flat(grads)
    assert got.keys() == grads_ref.keys()
    for k in got:
        assert_close(got[k], grads_ref[k], 1e-5, f"grad of {k}")
    for k, v in _flat(nnx.state(model, nnx.Param)).items():
        assert_close(v, params_ref[k], 1e-5, f"{k} after one Adam step")


def _check_local(model, grads, mesh):
    """Per device: 1/ep of every expert stack and of its gradient."""
    ep = mesh.shape["expert"]
    stacks, g = _stacks(model), _flat(grads)
    assert stacks
    for k, v in stacks.items():
        for arr, what in ((v, "param"), (g[k], "grad")):
            assert arr.addressable_shards[0].data.shape[0] == mm.E // ep, f"{what} {k}"
            assert arr.sharding.spec[0] == "expert", f"{what} {k}: {arr.sharding.spec}"


ROUTE = {
    ("loop", False): R.EXPERTS_MANUAL.name,
    ("loop", True): R.EXPERTS_MANUAL.name,
    ("ragged", False): R.EXPERTS_AS_WRITTEN.name,
    (
        "ragged",
        True,
    ): R.EXPERTS_AUTO_AXES_GSPMD.name,  # ragged_dot/argsort refused on Explicit types
    ("dense", False): R.EXPERTS_AS_WRITTEN.name,
    ("dense", True): R.EXPERTS_AUTO_AXES_GSPMD.name,
}


CASES = [("loop", e, m) for e in (False, True) for m in ("8", "2x4")]
CASES += [(i, False, "8") for i in ("ragged", "dense")]
CASES += [(i, True, "2x4") for i in ("ragged", "dense")]


@pytest.mark.parametrize(("idiom", "explicit", "mesh_name"), CASES)
def test_train_step_equals_unsharded_and_moves_no_weights(idiom, explicit, mesh_name):
    cls = mm.IDIOMS[idiom]
    mesh, model, compiled, loss, grads, routes = _run(cls, mesh_name, explicit)
    assert {r for *_, r in routes} == {ROUTE[idiom, explicit]}
    _check_numerics(cls, model, loss, grads)
    _check_local(model, grads, mesh)
    ops = collectives(compiled, mesh)
    assert weight_collectives(ops, _stacks(model)) == []
    assert not [c for c in ops if c.kind == "collective-permute"]
    if idiom == "loop":  # tokens: all-gather x, reduce-scatter y, all-gather dy
        dp = mesh.size // mesh.shape["expert"]
        token_bytes = X.size // dp * 4
        moved = [c for c in ops if c.axes == ("expert",) and c.kind != "all-reduce"]
        on_expert = sorted((c.kind, c.size) for c in moved)
        assert on_expert == [("all-gather", token_bytes)] * 2 + [("reduce-scatter", token_bytes)]
        # Each device computes only its own experts (runtime/pruning.py): on the
        # gathered T/dp tokens, E/ep experts; unpruned it would be all E (ratio ~ 1/dp).
        ratio = _flops(compiled) / _reference(cls)[3]
        assert ratio < 1.6 / mesh.size, f"per-device FLOPs {ratio:.3f} of the unsharded step"


def test_weight_collective_finder_sees_a_gathered_stack():
    """The assertion above can fail: plain FSDP over the expert axis gathers stacks."""
    mesh = _mesh("8", False)
    model = npx.parallelize(mm.LoopMoE(rngs=nnx.Rngs(0)), mesh, npx.FSDP("expert", min_size=64))
    batch = jax.device_put(X, NamedSharding(mesh, P("expert")))
    with jax.set_mesh(mesh):
        f = nnx.jit(lambda m, x: m(x))
        ops = collectives(f.lower(model, batch).compile(), mesh)
    assert weight_collectives(ops, _stacks(model))


def test_specs_for_each_idiom_and_a_scanned_stack():
    mesh = _mesh("8", False)
    expected = {
        "loop": {"router.kernel": P(None, None), "gate_proj": P("expert", None, None)},
        "ragged": {"router_kernel": P(None, None), "gate_up": P("expert", None, None)},
        "dense": {"router.bias": P(None), "gate_up_bias": P("expert", None)},
    }
    for idiom, cls in mm.IDIOMS.items():
        abstract = nnx.eval_shape(lambda cls=cls: cls(rngs=nnx.Rngs(0)))
        specs = npx.resolve(abstract, mesh, ExpertParallel("expert")).specs()
        assert {k: specs[k] for k in expected[idiom]} == expected[idiom], idiom
    scanned = nnx.eval_shape(lambda: mm.ScannedMoE(rngs=nnx.Rngs(0)))
    specs = npx.resolve(scanned, mesh, {"blocks.moe": ExpertParallel("expert")}).specs()
    assert specs["blocks.moe.down_proj"] == P(None, "expert", None, None)
    assert specs["blocks.moe.up_bias"] == P(None, "expert", None)
    assert specs["blocks.moe.router.kernel"] == P(None, None, None)


def test_num_experts_given_and_composed_with_fsdp_specs():
    mesh = _mesh("2x4", False)
    abstract = nnx.eval_shape(lambda: mm.LoopMoE(rngs=nnx.Rngs(0)))
    plan = (ExpertParallel("expert", num_experts=8), npx.FSDP("data", min_size=256))
    specs = npx.resolve(abstract, mesh, plan).specs()
    assert specs["gate_proj"] == P("expert", None, "data")
    assert specs["down_proj"] == P("expert", "data", None)
    assert specs["up_bias"] == P("expert", "data")
    assert specs["router.kernel"] == P(None, None)  # 128 elements: under min_size


def test_scanned_stack_with_fsdp_and_remat(explicit=True):
    """A scanned stack of loop MoE blocks, experts also FSDP-sharded over
    'data' and recomputed in backward: equal to unsharded, no stack moves
    over the expert axis."""
    cls = mm.SmallScannedMoE  # E = 4: one expert per device on the 'expert' axis

    def plan(mesh):
        styles = (ExpertParallel("expert"), npx.FSDP("data", min_size=512), npx.Remat())
        return {"blocks.moe": styles}

    mesh, model, compiled, loss, grads, routes = _run(cls, "2x4", explicit, plan)
    assert {r for c, _, r in routes if c.startswith("Expert")} == {R.REMAT, R.EXPERTS_MANUAL.name}
    assert "expert" not in str(model.blocks.moe.router.kernel.get_value().sharding.spec)
    _check_numerics(cls, model, loss, grads)
    ops = collectives(compiled, mesh)
    stacks = {k: v for k, v in _flat(nnx.state(model, nnx.Param)).items() if "proj" in k}
    per_layer = {k: v[0] for k, v in stacks.items() if "bias" not in k}
    assert not [c for c in weight_collectives(ops, per_layer) if "expert" in c.axes]
    spec = model.blocks.moe.gate_proj.get_value().sharding.spec
    assert tuple(spec)[:3] == (None, "expert", None) and "data" in tuple(spec)


def _fail(model, mesh, style, match):
    before = jax.tree.map(lambda x: x, nnx.state(model))
    with pytest.raises(PlanError, match=match):
        npx.parallelize(model, mesh, style)
    assert jax.tree.all(jax.tree.map(lambda a, b: a is b, before, nnx.state(model)))


def test_errors_name_the_module_and_the_fix():
    mesh = _mesh("8", False)
    model = mm.LoopMoE(rngs=nnx.Rngs(0))
    _fail(model, mesh, ExpertParallel("experts"), r"'experts' is not in the mesh.*Use one of")
    six = nnx.eval_shape(lambda: mm.LoopMoE(e=6, rngs=nnx.Rngs(0)))
    with pytest.raises(PlanError, match=r"module '<root>'.*6 experts do not split.*divisor of 6"):
        npx.resolve(six, mesh, ExpertParallel("expert"))
    with pytest.raises(PlanError, match=r"none of its params"):
        npx.resolve(model, mesh, ExpertParallel("expert", num_experts=5))
    linear = nnx.eval_shape(lambda: nnx.Linear(8, 8, rngs=nnx.Rngs(0)))
    with pytest.raises(PlanError, match=r"no router.*num_experts=E"):
        npx.resolve(linear, mesh, ExpertParallel("expert"))
    with pytest.raises(PlanError, match="one mesh axis"):
        ExpertParallel(("expert", "data"))
    with pytest.raises(PlanError, match="num_experts=0"):
        ExpertParallel("expert", num_experts=0)
    taken = (npx.Shard(gate_proj=P("data", None, None)), ExpertParallel("expert"))
    with pytest.raises(PlanError, match="already sharded over 'data'.*ExpertParallel first"):
        npx.resolve(model, _mesh("2x4", False), taken)


def test_explain_and_communication_report_name_the_route():
    mesh = _mesh("8", False)
    model = mm.DenseMoE(rngs=nnx.Rngs(0))
    text = npx.explain(model, mesh, ExpertParallel("expert"))
    assert (
        "route experts manual/as-is/as-is (else experts auto-axes/as-is/resharded, "
        "experts as-written/as-is/as-is, experts auto-axes/constrained/resharded)"
    ) in text
    npx.parallelize(model, mesh, ExpertParallel("expert"))
    batch = jax.device_put(X, NamedSharding(mesh, P("expert")))
    report = npx.communication_report(nnx.jit(lambda m, x: m(x)), model, batch, mesh=mesh)
    assert report.routes == (("ExpertDenseMoE", "__call__", R.EXPERTS_AS_WRITTEN.name),)
    assert "routes: ExpertDenseMoE.__call__: experts as-written/as-is/as-is" in str(report)


def test_expert_internal_tensor_parallel_explicit():
    """Experts over 'expert', each expert's F dim over 'model' (Shard after
    ExpertParallel): equal to unsharded, no stack moves, 'model' stays GSPMD's."""
    MESHES["expert_model"] = ((2, 4), ("expert", "model"))
    tp = npx.Shard(
        gate_proj=P("expert", None, "model"),
        up_proj=P("expert", None, "model"),
        up_bias=P("expert", "model"),
        down_proj=P("expert", "model", None),
    )
    run = _run(mm.LoopMoE, "expert_model", True, lambda m: (ExpertParallel("expert"), tp))
    mesh, model, compiled, loss, grads, routes = run
    # Explicit types refuse the matmul over the 'model'-sharded F dim inside:
    # the local route runs again inside auto_axes.
    assert [r for *_, r in routes] == [R.EXPERTS_AUTO_AXES.name, R.EXPERTS_MANUAL.name]
    _check_numerics(mm.LoopMoE, model, loss, grads)
    assert model.gate_proj.get_value().addressable_shards[0].data.shape == (4, 16, 8)
    ops = collectives(compiled, mesh)
    assert weight_collectives(ops, _stacks(model)) == []
    assert any(c.kind == "all-reduce" and c.axes == ("model",) for c in ops)  # row-parallel down
