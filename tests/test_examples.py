"""The README's main example runs and reports what the docs say it does."""

import pathlib
import runpy

import pytest

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def test_readme_example_prints_summary_numerics_and_collectives(capsys):
    runpy.run_path(
        str(EXAMPLES / "parallelize_transformer.py"), run_name="__main__"
    )  # asserts numerics itself
    out = capsys.readouterr().out
    assert "mesh {'data': 2, 'model': 4} (8 devices), 35 params" in out
    assert "unsharded: 120,064 B (117.2 KiB); each device holds 27.4%" in out
    lines = {
        line.split()[0] + " " + line.split()[1]: line.split()[2:]
        for line in out.splitlines()
        if line.startswith("all-")
    }
    # Megatron: 2 layers x (2 forward + 2 backward) all-reduces over 'model', plus the
    # vocab-parallel embedding's forward and the head's backward; one gradient all-reduce over 'data'.
    assert lines["all-reduce model"][0] == "10" and lines["all-reduce data"][0] == "1"
    assert lines["all-gather model"][0] == "1"  # the head's logits, gathered for the loss
    assert set(lines) == {"all-reduce model", "all-reduce data", "all-gather model"}


def test_train_gpt_example_learns_and_matches_one_device():
    """examples/train_gpt.py: sharded losses equal the unsharded run; loss falls."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "examples" / "train_gpt.py"
    spec = importlib.util.spec_from_file_location("train_gpt", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    losses, reference = example.main(
        ["--parallel", "tp", "--steps", "6", "--compare", "3", "--layers", "1"]
    )
    assert len(losses) == 6 and len(reference) == 3
    assert max(abs(a - b) for a, b in zip(losses, reference)) <= 1e-5
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize("parallel", ["dp", "fsdp", "2d"])  # tp: the test above
def test_train_gpt_on_the_default_explicit_mesh(parallel):
    """Every --parallel choice builds its mesh with `jax.make_mesh` defaults
    (Explicit axes), nnx.Embed lookups of batch-sharded ids included; the
    losses equal the unsharded run's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_gpt", EXAMPLES / "train_gpt.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model = example.GPT(16, 16, 2, 1, 8, rngs=example.nnx.Rngs(0))
    mesh = example.setup(parallel, model)[0]
    assert set(mesh.axis_types) == {example.jax.sharding.AxisType.Explicit}
    losses, reference = example.main(
        ["--parallel", parallel, "--steps", "2", "--compare", "2", "--layers", "1"]
    )
    assert max(abs(a - b) for a, b in zip(losses, reference)) <= 1e-5


def test_train_gpt_context_parallel_at_sequence_512():
    """--parallel cp: ('data', 'context') = (2, 4) default (Explicit) mesh, the
    sequence of 512 split over 'context' (K/V all-gathered in the inline
    attention); the first steps' losses equal the unsharded run's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_gpt", EXAMPLES / "train_gpt.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model = example.GPT(16, 16, 2, 1, 8, rngs=example.nnx.Rngs(0))
    mesh, _, plan, _ = example.setup("cp", model)
    assert dict(mesh.shape) == {"data": 2, "context": 4} and list(plan) == ["blocks.*.attn"]
    losses, reference = example.main(
        ["--parallel", "cp", "--seq", "512", "--steps", "2", "--compare", "2"]
        + ["--layers", "1", "--batch", "2", "--d", "32", "--heads", "4"]
    )
    assert max(abs(a - b) for a, b in zip(losses, reference)) <= 1e-5


def test_train_moe_example_matches_one_device():
    """examples/train_moe.py: experts spread over ('data', 'expert') = (2, 4);
    the sharded losses equal the unsharded run's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_moe", EXAMPLES / "train_moe.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = ["--idiom", "ragged", "--steps", "2", "--compare", "2", "--layers", "1", "--d", "16"]
    args += ["--seq", "8", "--batch", "8"]
    losses, reference = example.main(args)  # the loop idiom: tests/test_experts.py
    assert len(losses) == 2 and len(reference) == 2
    assert max(abs(a - b) for a, b in zip(losses, reference)) <= 1e-5


def test_custom_style_example_specs_zero_state_and_one_step():
    """examples/custom_style.py: a user-written style beside RowParallel and ZeRO-1."""
    from jax.sharding import PartitionSpec as P

    out = runpy.run_path(str(EXAMPLES / "custom_style.py"))["main"]()  # asserts numerics itself
    assert out["specs"]["up.kernel"] == P(None, "model") and out["specs"]["up.bias"] == P("model")
    assert out["mu"] == P("data", "model")  # ZeRO-1 added 'data' to the free dim of Adam's state
    assert abs(out["loss"] - out["ref_loss"]) <= 1e-5 * abs(out["ref_loss"])
