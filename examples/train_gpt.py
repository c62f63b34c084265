"""Train a small character-level GPT on 8 simulated CPU devices.

    python examples/train_gpt.py                 # tensor parallel (default)
    python examples/train_gpt.py --parallel dp   # data parallel
    python examples/train_gpt.py --parallel fsdp # fully sharded (ZeRO-3)
    python examples/train_gpt.py --parallel 2d   # FSDP x tensor parallel
    python examples/train_gpt.py --parallel cp --seq 512  # context parallel: the
        # sequence split over a 'context' axis, K/V all-gathered in attention
    python examples/train_gpt.py --parallel fsdp --param-dtype bfloat16 --steps 51
        # FSDP mixed precision (bf16 gathers and compute, f32 gradients and
        # master params), trained next to the f32 run: both loss curves

The same flags work in several processes (here 2 x 4 CPU devices on one
machine; on a cluster, one process per host with the host of process 0 as
coordinator, see docs/multihost.md):

    python examples/train_gpt.py --parallel fsdp --coordinator 127.0.0.1:12345 --num-processes 2 --process-id 0 &
    python examples/train_gpt.py --parallel fsdp --coordinator 127.0.0.1:12345 --num-processes 2 --process-id 1

Each process feeds its own rows of every batch; only process 0 prints.

The corpus is generated here, deterministically, from a tiny grammar, so the
script needs no download. The first steps also run on one device, unsharded,
and both losses are printed side by side: they agree to float32 rounding.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import nnx_parallel as npx  # noqa: E402
import nnx_parallel.views.collectives  # noqa: E402,F401

# Data ------------------------------------------------------------------------------

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the bird", "a child", "the teacher"]
VERBS = ["sees", "likes", "finds", "follows", "draws", "hears", "wants"]
OBJECTS = ["the moon", "a red ball", "the river", "some bread", "the little house", "a green tree"]
ENDINGS = [".", " today.", " again.", " at night.", " in the garden."]


def make_corpus(n_sentences: int = 3000, seed: int = 0) -> str:
    """A few hundred KB of simple English sentences, the same on every run."""
    rng = np.random.default_rng(seed)
    pick = lambda words: words[rng.integers(len(words))]  # noqa: E731
    sentences = [
        f"{pick(SUBJECTS)} {pick(VERBS)} {pick(OBJECTS)}{pick(ENDINGS)}" for _ in range(n_sentences)
    ]
    return " ".join(sentences)


class CharData:
    """Character-level tokens and random training windows."""

    def __init__(self, text: str, vocab_multiple: int = 8):
        chars = sorted(set(text))
        self.vocab = -(-len(chars) // vocab_multiple) * vocab_multiple  # pad: vocab shards evenly
        self.ids = np.array([chars.index(c) for c in text], np.int32)
        self.rng = np.random.default_rng(1)

    def batch(self, batch_size: int, seq_len: int) -> np.ndarray:
        starts = self.rng.integers(0, len(self.ids) - seq_len - 1, batch_size)
        return np.stack([self.ids[s : s + seq_len + 1] for s in starts])  # inputs + next token


# Model (written as plain NNX code: nnx_parallel needs no changes to it) ---------------


class Attention(nnx.Module):
    def __init__(self, d, heads, *, rngs):
        self.heads = heads
        self.q_proj = nnx.Linear(d, d, rngs=rngs)
        self.k_proj = nnx.Linear(d, d, use_bias=False, rngs=rngs)
        self.v_proj = nnx.Linear(d, d, rngs=rngs)
        self.o_proj = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x):
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // self.heads).astype(x.dtype)
        logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, jnp.finfo(x.dtype).min)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
        return self.o_proj(out.reshape(b, t, d))


class Block(nnx.Module):
    def __init__(self, d, heads, *, rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = Attention(d, heads, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.fc1 = nnx.Linear(d, 4 * d, rngs=rngs)
        self.fc2 = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class GPT(nnx.Module):
    def __init__(self, vocab, d, heads, layers, max_len, *, rngs):
        self.wte = nnx.Embed(vocab, d, rngs=rngs)
        self.wpe = nnx.Embed(max_len, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, heads, rngs=rngs) for _ in range(layers)])
        self.ln_f = nnx.LayerNorm(d, rngs=rngs)
        self.lm_head = nnx.Linear(d, vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        x = self.wte(tokens) + self.wpe(jnp.arange(tokens.shape[1]))[None]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


# Parallel setups -----------------------------------------------------------------------


def log(*args):
    """print, on process 0 only (every process runs this script)."""
    if jax.process_index() == 0:
        print(*args, flush=True)


def setup(kind: str, model: GPT, sequence_parallel: bool = False, param_dtype=None):
    """(mesh, batch axis, plan, vocab-parallel logits?) for each --parallel choice.

    `param_dtype` (fsdp and 2d): FSDP's mixed precision, gradients reduced in f32."""
    mixed = {} if param_dtype is None else {"param_dtype": param_dtype, "reduce_dtype": jnp.float32}
    n = jax.device_count()  # every process's devices
    if kind == "dp":
        return jax.make_mesh((n,), ("data",)), "data", npx.Replicated(), False
    if kind == "fsdp":
        plan = {"": npx.FSDP("fsdp", min_size=512, **mixed)}
        return jax.make_mesh((n,), ("fsdp",)), "fsdp", plan, False
    if kind == "cp":  # batch over 'data', sequence over 'context' (see `feeder`)
        plan, _ = npx.plans.context_parallel(model, "context")  # {"blocks.*.attn": ...}
        return jax.make_mesh((2, n // 2), ("data", "context")), "data", plan, False
    tp_plan, report = npx.plans.tensor_parallel(
        model, sequence_parallel=sequence_parallel and kind == "tp"
    )
    if report.unclassified:
        log(f"auto-plan left these replicated:\n{report}")
    if kind == "tp":
        return jax.make_mesh((n,), ("model",)), None, tp_plan, True
    mesh = jax.make_mesh((2, n // 2), ("fsdp", "model"))
    return mesh, "fsdp", npx.plans.combine(tp_plan, npx.FSDP("fsdp", min_size=512, **mixed)), True


def feeder(kind: str, mesh, batch_spec):
    """Global arrays from this process's rows of a (B, seq + 1) token batch.
    Context parallel: inputs and targets split into (B, seq) arrays laid out
    on (batch, sequence), since seq + 1 does not split over the devices."""
    if kind != "cp":
        return lambda rows: npx.shard_batch(rows, mesh, batch_spec)
    return lambda rows: npx.shard_batch(
        {"inputs": rows[:, :-1], "targets": rows[:, 1:]}, mesh, batch_spec, seq_axis="context"
    )


def cp_loss(model, batch):
    logits = model(batch["inputs"]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()


def reference_loss(model, batch):
    logits = model(batch[:, :-1]).astype(jnp.float32)  # bf16 logits (--param-dtype): loss in f32
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def make_train_step(loss_fn, microbatches: int = 1):
    grad_fn = npx.accumulate(nnx.value_and_grad(loss_fn), microbatches=microbatches)

    @nnx.jit
    def train_step(model, optimizer, batch):
        loss, grads = grad_fn(model, batch)
        optimizer.update(model, grads)
        return loss

    return train_step


def progress(step: int, total: int, loss: float, ms: float, width: int = 30) -> str:
    done = int(width * step / total)
    return f"[{'#' * done}{'.' * (width - done)}] step {step:4d}/{total} loss {loss:.4f} ({ms:.1f} ms/step)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallel", choices=["dp", "fsdp", "tp", "2d", "cp"], default="tp")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--compare", type=int, default=5, help="steps to also run unsharded")
    parser.add_argument("--accumulate", type=int, default=1, help="microbatches per step")
    parser.add_argument("--sequence-parallel", action="store_true", help="Megatron-SP (tp only)")
    parser.add_argument(
        "--param-dtype",
        choices=["bfloat16"],
        default=None,
        help="fsdp/2d: also train with FSDP mixed precision and print both curves",
    )
    npx.add_distributed_flags(
        parser
    )  # --coordinator, --num-processes, --process-id, --local-devices
    args = parser.parse_args(argv)
    if args.param_dtype and args.parallel not in ("fsdp", "2d"):
        parser.error("--param-dtype needs --parallel fsdp or 2d (it is FSDP's mixed precision)")
    if args.num_processes > 1 and args.local_devices is None:
        args.local_devices = max(1, 8 // args.num_processes)  # 8 simulated CPU devices in all
    npx.initialize_from_args(args)  # before any JAX computation; a no-op in one process

    data = CharData(make_corpus())

    def make_model():
        return GPT(data.vocab, args.d, args.heads, args.layers, args.seq, rngs=nnx.Rngs(0))  # noqa: E731

    model = make_model()
    mesh, batch_axis, plan, vocab_parallel = setup(args.parallel, model, args.sequence_parallel)
    npx.parallelize(model, mesh, plan)
    log(
        f"--parallel {args.parallel}: mesh {dict(mesh.shape)}, vocab {data.vocab}, "
        f"{sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))} params"
    )

    if vocab_parallel:  # logits stay sharded on vocab: loss-parallel cross-entropy

        def loss_fn(m, batch):
            return npx.cross_entropy(m(batch[:, :-1]), batch[:, 1:], mesh, "model").mean()
    else:
        loss_fn = cp_loss if args.parallel == "cp" else reference_loss
    train_step = make_train_step(loss_fn, args.accumulate)
    batch_spec = jax.P(batch_axis)
    feed = feeder(args.parallel, mesh, batch_spec)
    rows = npx.local_batch_slice(args.batch, mesh, batch_spec)  # this process's rows of each batch
    log(
        f"processes: {jax.process_count()}, devices: {jax.device_count()} "
        f"({jax.local_device_count()} local), process 0 feeds batch rows {rows.start}:{rows.stop}"
    )

    # Unsharded twin on one (local) device for the first steps.
    reference = make_model()
    ref_opt = nnx.Optimizer(reference, optax.adam(args.lr), wrt=nnx.Param)
    ref_step = make_train_step(reference_loss)

    losses, reference_losses = [], []
    with jax.set_mesh(mesh):
        optimizer = nnx.Optimizer(model, optax.adam(args.lr), wrt=nnx.Param)
        example = feed(np.zeros((args.batch, args.seq + 1), np.int32)[rows])
        compiled = train_step.lower(model, optimizer, example).compile()
        counts = {k: n for k, n in npx.collectives.count_collectives(compiled, mesh).items() if n}
        log(f"collectives in one compiled train step: {counts}")
        start = time.perf_counter()
        for step in range(args.steps):
            batch = data.batch(args.batch, args.seq)  # the same on every process (same seed)
            loss = train_step(model, optimizer, feed(batch[rows]))
            loss = npx.reduce_metrics(loss)  # a float, the same on every process
            losses.append(loss)
            if step < args.compare:
                with jax.set_mesh(
                    jax.make_mesh((1,), ("single",), devices=jax.local_devices()[:1])
                ):
                    ref = float(ref_step(reference, ref_opt, jnp.asarray(batch)))
                reference_losses.append(ref)
                log(
                    f"step {step}: loss {loss:.6f}  unsharded {ref:.6f}  |diff| {abs(loss - ref):.1e}"
                )
                if step == args.compare - 1:
                    start = time.perf_counter()  # time steps without the comparison
            elif (step + 1) % args.log_every == 0 or step + 1 == args.steps:
                ms = 1e3 * (time.perf_counter() - start) / (step + 1 - args.compare)
                log(progress(step + 1, args.steps, loss, ms))
    marks = sorted({0, min(50, args.steps - 1), min(100, args.steps - 1), args.steps - 1})
    log("loss at steps " + ", ".join(f"{s}: {losses[s]:.4f}" for s in marks))
    if args.param_dtype:
        mixed = train_mixed(args, data, make_model, rows, loss_fn)
        log(f"--param-dtype {args.param_dtype}: loss curves, float32 vs {args.param_dtype}")
        for s in sorted({*range(0, args.steps, args.log_every), args.steps - 1}):
            rel = abs(mixed[s] - losses[s]) / abs(losses[s])
            log(
                f"  step {s:4d}: float32 {losses[s]:.4f}  {args.param_dtype} {mixed[s]:.4f}  "
                f"rel diff {rel:.2%}"
            )
        return losses, reference_losses, mixed
    return losses, reference_losses


def train_mixed(args, data, make_model, rows, loss_fn):
    """The same run with FSDP mixed precision, on the same batches."""
    data.rng = np.random.default_rng(1)  # replay the f32 run's batches
    model = make_model()
    mesh, batch_axis, plan, _ = setup(args.parallel, model, param_dtype=jnp.dtype(args.param_dtype))
    npx.parallelize(model, mesh, plan)
    step_fn = make_train_step(loss_fn)
    losses = []
    with jax.set_mesh(mesh):
        optimizer = nnx.Optimizer(model, optax.adam(args.lr), wrt=nnx.Param)
        for _ in range(args.steps):
            batch = npx.shard_batch(data.batch(args.batch, args.seq)[rows], mesh, jax.P(batch_axis))
            losses.append(npx.reduce_metrics(step_fn(model, optimizer, batch)))
    return losses


if __name__ == "__main__":
    main()
