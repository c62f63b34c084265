"""Memory, communication, FLOPs and step time of DP, FSDP and expert
parallelism on a small MoE GPT (8 simulated CPU devices).

Run:  python benchmarks/moe.py > benchmarks/moe.txt
Each row is one compiled train step (forward, backward, Adam) on 8 devices:

- dp:  every param replicated, batch over 'data'.
- fsdp: every param FSDP-sharded over 'fsdp' (the experts gathered per call).
- ep-loop: the loop idiom, `plans.expert_parallel` on an 8-way 'expert' axis
  (route `experts manual/as-is/as-is`: tokens all-gathered, outputs reduce-scattered).
- ep-ragged: the sort + ragged_dot idiom, same plan (route `experts as-written/as-is/as-is`).
- ep-dense: the einsum idiom, same plan (route `experts as-written/as-is/as-is`).
- a2a-1.25, a2a-2: the all-to-all dispatch, `capacity_factor` 1.25 and 2
  (route `experts-a2a manual/as-is/as-is`: each token goes only to the devices
  of its k experts, at most C = ceil(c k T / ep) per device pair; the
  dropped column is the token-device pairs past C in the timed steps' last
  step, out of the routed pairs, both layers).

Ratios are against `dp` of the same idiom, measured in the same run. Step
times on XLA:CPU with 8 fake devices on shared cores are noisy; the byte and
FLOP counts are exact.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import nnx_parallel as npx  # noqa: E402
from nnx_parallel.views.collectives import collectives  # noqa: E402
from tests import moe_models as mm  # noqa: E402

VOCAB, D, HEADS, LAYERS, SEQ, BATCH = 64, 64, 4, 2, 16, 32


def loss_fn(model, tokens):
    logits = model(tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()


def build(kind, idiom):
    model = mm.MoEGPT(VOCAB, D, HEADS, LAYERS, SEQ, moe=mm.IDIOMS[idiom], rngs=nnx.Rngs(0))
    if kind == "dp":
        mesh, plan = jax.make_mesh((8,), ("data",)), npx.Replicated()
    elif kind == "fsdp":
        mesh, plan = jax.make_mesh((8,), ("fsdp",)), npx.FSDP("fsdp", min_size=2**10)
    elif kind.startswith("a2a-"):
        cf = float(kind.removeprefix("a2a-"))
        plan = npx.plans.expert_parallel(model, capacity_factor=cf)[0]
        mesh = jax.make_mesh((8,), ("expert",))
    else:
        mesh, plan = jax.make_mesh((8,), ("expert",)), npx.plans.expert_parallel(model)[0]
    npx.parallelize(model, mesh, plan)
    return model, mesh


def expert_bytes(model):
    total = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if "moe" in path and "router" not in path:
            total += var.get_value().addressable_shards[0].data.nbytes
    return total


def measure(kind, idiom):
    model, mesh = build(kind, idiom)
    held = expert_bytes(model)
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))

    def step(state, tokens):
        m, o = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(m, tokens)
        o.update(m, grads)
        return loss, nnx.state((m, o))

    tokens = jax.random.randint(jax.random.key(0), (BATCH, SEQ), 0, VOCAB)
    tokens = jax.device_put(tokens, NamedSharding(mesh, P(mesh.axis_names[0])))
    with jax.set_mesh(mesh):
        compiled = jax.jit(step, donate_argnums=0).lower(state, tokens).compile()
        ops = collectives(compiled, mesh)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        times = []
        for i in range(6):
            if i == 5:
                jax.effects_barrier()
                npx.dropped_tokens(reset=True)
            start = time.perf_counter()
            loss, state = compiled(state, tokens)
            jax.block_until_ready(loss)
            times.append(time.perf_counter() - start)
    return {
        "expert": held,
        "temp": compiled.memory_analysis().temp_size_in_bytes,
        "coll": sum(c.size for c in ops),
        "flops": cost.get("flops", 0.0),
        "ms": 1e3 * statistics.median(times[1:]),
        "dropped": _dropped(),
    }


def _dropped() -> str:
    jax.effects_barrier()
    stats = npx.dropped_tokens(reset=True)
    if not stats:
        return "-"
    return ", ".join(f"{v['dropped']}/{v['routed']}" for v in stats.values())


def main():
    print(f"MoE GPT: vocab {VOCAB}, d {D}, {LAYERS} layers, E=8, k=2, F={2 * D}, ")
    print(f"batch {BATCH} x {SEQ} tokens, f32 Adam, 8 devices\n")
    head = (
        f"{'idiom':7} {'setup':10} {'expert B/dev':>12} {'temp B':>10} {'coll B':>10} "
        f"{'GFLOP/dev':>9} {'ms':>7}   ratios vs dp: expert temp coll flops time   dropped"
    )
    print(head)
    for idiom in ("loop", "ragged", "dense"):
        base = None
        for kind in ("dp", "fsdp", f"ep-{idiom}", "a2a-1.25", "a2a-2"):
            r = measure(kind, idiom)
            base = base or r
            ratio = " ".join(
                f"{r[k] / base[k]:.3f}" if base[k] else "  -  "
                for k in ("expert", "temp", "coll", "flops", "ms")
            )
            print(
                f"{idiom:7} {kind:10} {r['expert']:12d} {r['temp']:10d} {r['coll']:10d} "
                f"{r['flops'] / 1e9:9.4f} {r['ms']:7.1f}   {ratio}   {r['dropped']}",
                flush=True,
            )


if __name__ == "__main__":
    main()
