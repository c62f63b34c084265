"""FSDP units on the GPT of issue 21 (d 256, 8 blocks, 8 heads, vocab 512, sequence
128, batch 32; 8 devices, Auto axes): what a unit costs against DP, asserted
from the compiled programs (FLOPs, collectives and their bytes, temp memory).
`benchmarks/step_time.py` prints the same figures with step times."""

import jax
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import nnx_parallel as npx
from nnx_parallel.views.collectives import collectives
from tests import models

LAYERS, D, VOCAB, SEQ, BATCH = 8, 256, 512, 128, 32
MIN_SIZE = 512  # as benchmarks/step_time.py: norms and biases stay replicated


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def _build(setup, mesh):
    model = models.GPT(VOCAB, D, 8, LAYERS, SEQ, rngs=nnx.Rngs(0))
    dp = setup.startswith("dp")
    plan = {"": npx.Replicated() if dp else npx.FSDP("fsdp", min_size=MIN_SIZE)}
    if setup.endswith("+remat"):
        plan["blocks.*"] = npx.Remat()
    return npx.parallelize(model, mesh, plan)


def _flops(compiled):
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.fixture(scope="module")
def compiled():
    """Per setup: the gradient step (FLOPs) and, for dp and fsdp, the Adam step."""
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
    tokens = jax.random.randint(jax.random.key(0), (BATCH, SEQ + 1), 0, VOCAB)
    tokens = jax.device_put(tokens, NamedSharding(mesh, P("fsdp")))

    def step(model, opt, tokens):
        loss, grads = nnx.value_and_grad(_loss)(model, tokens)
        opt.update(model, grads)
        return loss

    out = {"mesh": mesh}
    for setup in ("dp", "fsdp", "dp+remat", "fsdp+remat"):
        model = _build(setup, mesh)
        with jax.set_mesh(mesh):
            out[setup] = nnx.jit(nnx.grad(_loss)).lower(model, tokens).compile()
            if "+" not in setup:
                opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
                out[setup + " step"] = nnx.jit(step).lower(model, opt, tokens).compile()
        if setup == "fsdp":
            sharded = [
                v.get_value()
                for v in jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=_is_var)
                if any(e is not None for e in v.get_value().sharding.spec)
            ]
            out["psi"] = sum(x.nbytes for x in sharded)
            out["psi matrices"] = sum(x.nbytes for x in sharded if x.ndim >= 2)
    return out


def _is_var(x):
    return isinstance(x, nnx.Variable)


def test_gradient_flops_equal_dp_with_and_without_remat(compiled):
    """Measured: 1.0029x DP's gradient FLOPs, and FSDP + Remat 1.0039x DP + Remat's:
    a unit's backward does not run its forward again."""
    assert _flops(compiled["fsdp"]) <= 1.01 * _flops(compiled["dp"])
    assert _flops(compiled["fsdp+remat"]) <= 1.01 * _flops(compiled["dp+remat"])


def test_three_collectives_per_unit_and_bytes_at_the_limit(compiled):
    """8 blocks, one unit each: 2 all-gathers and 1 reduce-scatter per unit, plus
    the root's own (embeddings, head: 5 all-gathers, 3 reduce-scatters).
    Bytes: all-gathered <= 2 psi (psi: bytes of the params FSDP shards),
    reduce-scattered = the matrices' psi (a sharded vector, fc1's bias, is
    all-reduced with the replicated ones and keeps its chunk)."""
    ops = collectives(compiled["fsdp step"], compiled["mesh"])
    gathers = [o for o in ops if o.kind == "all-gather"]
    scatters = [o for o in ops if o.kind == "reduce-scatter"]
    assert len(gathers) + len(scatters) <= 3 * LAYERS + 8, ops
    assert (len(gathers), len(scatters)) == (2 * LAYERS + 5, LAYERS + 3)
    assert sum(o.size for o in scatters) == compiled["psi matrices"]
    assert sum(o.size for o in gathers) <= 2 * compiled["psi"]


def test_temp_memory_is_dp_activations_plus_the_unit_working_set(compiled):
    """Temp memory of the Adam step against DP's: measured 124,389,664 B (118.6 MiB)
    against 111,281,776 B (106.1 MiB). DP's peak is at the start of backward,
    where its temp holds the forward's activations and no gradient (see
    docs/fsdp_zero.md, "Where FSDP's temp memory goes"); FSDP's adds the
    backward working set of one unit: its flat all-gather buffer, the params
    copied out of it and their gradients before the reduce-scatter. Bound:
    DP plus 5 units' gathered params (one unit: 3 MiB here)."""
    fsdp = compiled["fsdp step"].memory_analysis().temp_size_in_bytes
    dp = compiled["dp step"].memory_analysis().temp_size_in_bytes
    unit = (4 * D * D + 2 * 4 * D * D) * 4  # q, k, v, o and the MLP's two matrices, f32
    assert fsdp <= dp + 5 * unit, (fsdp, dp, unit)
    assert fsdp < 1.15 * dp, (fsdp, dp)
