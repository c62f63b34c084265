"""Sharded init: same values as eager init, created in shards, previewed for free."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from nnx_parallel import (
    FSDP,
    ColumnParallel,
    PlanError,
    abstract_parallelize,
    init_memory,
    parallelize,
    resolve,
)
from nnx_parallel.runtime.sharded_init import _prepare, abstract_state
from nnx_parallel.views.collectives import collectives
from tests import helpers, models


class Stateful(nnx.Module):
    """Params plus every other kind of state: batch stats, an RNG stream, data."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.mlp = models.MLP(rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.table = nnx.data(jnp.arange(8.0))

    def __call__(self, x):
        return self.drop(self.bn(self.mlp(x))) + self.table.sum()


class Stack(nnx.Module):
    """Eight 64x64 layers: 8x bigger than each device's FSDP share."""

    def __init__(self, n=8, d=64, *, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(d, d, use_bias=False, rngs=rngs) for _ in range(n)])


def flat(model):
    out = {}
    for path, leaf in nnx.to_flat_state(nnx.state(model)):
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            value = jax.random.key_data(value)
        out[path] = np.asarray(value)
    return out


def assert_bit_exact(a, b):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=str(k))


@pytest.mark.parametrize("name", ["mlp", "gpt"])
def test_factory_matches_eager_init_bit_exact(mesh2x4, name):
    factory = {
        "mlp": lambda: models.MLP(rngs=nnx.Rngs(0)),
        "gpt": lambda: models.GPT(rngs=nnx.Rngs(0)),
    }[name]
    model = parallelize(factory, mesh2x4, helpers.tp_plans()[name])
    assert_bit_exact(model, factory())
    eager = parallelize(factory(), mesh2x4, helpers.tp_plans()[name])
    for path, value in helpers.params(model).items():
        assert value.sharding == helpers.params(eager)[path].sharding, path
    up = model.blocks[0].mlp.up if name == "gpt" else model.up
    assert up.kernel.get_metadata("out_sharding") == (None, "model")
    x = jnp.ones((4, 8), jnp.int32) if name == "gpt" else jnp.ones((4, 16))
    with jax.set_mesh(mesh2x4):
        helpers.assert_close(model(x), eager(x), 0.0, "forward")


def test_fsdp_factory_installs_hooks_and_trains(fsdp8):
    model = parallelize(lambda: models.MLP(rngs=nnx.Rngs(0)), fsdp8, FSDP(min_size=16))
    reference = models.MLP(rngs=nnx.Rngs(0))
    assert model.up.kernel[...].sharding.spec == P(None, "fsdp")
    assert type(model.up) is not nnx.Linear and isinstance(model.up, nnx.Linear)  # hooked
    x = jax.random.normal(jax.random.key(1), (8, 16))
    with jax.set_mesh(fsdp8):
        helpers.assert_close(model(x), reference(x), helpers.FWD_TOL, "forward")


def test_other_state_is_replicated_and_exact(fsdp8):
    factory = lambda: Stateful(rngs=nnx.Rngs(params=0, dropout=1))  # noqa: E731
    model = parallelize(factory, fsdp8, FSDP(min_size=16))
    assert_bit_exact(model, factory())
    for value in (model.bn.mean[...], model.drop.rngs.key[...], model.table):
        assert value.sharding.mesh == fsdp8 and value.sharding.is_fully_replicated
    assert model.mlp.up.kernel[...].sharding.spec == P(None, "fsdp")


def test_plain_array_attribute_is_refused(fsdp8):
    class Plain(nnx.Module):
        def __init__(self):
            self.w = jnp.ones(4)

    with pytest.raises(PlanError, match=r"attribute 'w' holds a plain array.*nnx.data"):
        parallelize(Plain, fsdp8, FSDP())


def test_factory_must_return_a_module(fsdp8):
    with pytest.raises(PlanError, match="returned dict, not an nnx.Module"):
        parallelize(lambda: {"w": jnp.ones(4)}, fsdp8, FSDP())
    with pytest.raises(PlanError, match="not an nnx.Module"):
        abstract_parallelize(3, fsdp8, FSDP())


def test_factory_must_own_its_rngs(fsdp8):
    rngs = nnx.Rngs(0)
    with pytest.raises(PlanError, match=r"must build everything itself.*nnx.Rngs\(0\)"):
        parallelize(lambda: models.MLP(rngs=rngs), fsdp8, FSDP())


def test_factory_plan_errors_before_any_allocation(mesh8):
    with pytest.raises(PlanError, match="matched no module"):
        parallelize(lambda: models.MLP(rngs=nnx.Rngs(0)), mesh8, {"upp": ColumnParallel()})


def test_abstract_preview_allocates_nothing(fsdp8):
    factory = lambda: Stack(rngs=nnx.Rngs(0))  # noqa: E731
    before = helpers.live_arrays()
    abstract, res = abstract_parallelize(factory, fsdp8, FSDP(min_size=16))
    assert helpers.live_arrays() == before
    kernel = abstract.layers[3].kernel.get_value()
    assert isinstance(kernel, jax.ShapeDtypeStruct)
    assert kernel.sharding.spec == P("fsdp", None) and kernel.sharding.mesh == fsdp8
    assert sum(e.bytes_per_device(fsdp8) for e in res.params.values()) == 8 * 64 * 64 * 4 // 8
    # The same preview from an abstract model or from a concrete one.
    _, res2 = abstract_parallelize(nnx.eval_shape(factory), fsdp8, FSDP(min_size=16))
    assert res2.specs() == res.specs()


def test_parallelize_on_abstract_model_annotates_only(fsdp8):
    abstract = nnx.eval_shape(lambda: models.MLP(rngs=nnx.Rngs(0)))
    before = helpers.live_arrays()
    out = parallelize(abstract, fsdp8, FSDP(min_size=16))
    assert helpers.live_arrays() == before
    assert out.up.kernel.get_value().sharding.spec == P(None, "fsdp")


def test_compiled_init_peak_fits_one_share(fsdp8):
    factory = lambda: Stack(d=256, rngs=nnx.Rngs(0))  # noqa: E731
    mem = init_memory(factory, fsdp8, FSDP(min_size=16))
    share = mem.model_bytes // mem.devices
    print(
        f"\nsharded init of {mem.model_bytes} B on {mem.devices} devices in {mem.programs} "
        f"programs: per device output {mem.output_bytes} B, peak {mem.peak_bytes} B "
        f"(share {share} B + largest param {mem.largest_bytes} B = {share + mem.largest_bytes} B)"
    )
    assert mem.model_bytes >= 8 * share
    assert mem.programs > 1
    assert share <= mem.output_bytes <= share + 64 * mem.programs  # + XLA's output tuple tables
    assert mem.peak_bytes <= share + mem.largest_bytes
    # Each device computes its own shard: nothing gathered or reduced.
    programs, _, _ = _prepare(factory, fsdp8, FSDP(min_size=16), True)
    for _, lowered in programs:
        assert collectives(lowered.compile(), fsdp8) == []
    # One program for everything would need more scratch than the bound allows.
    whole = init_memory(factory, fsdp8, FSDP(min_size=16), chunk_bytes=mem.model_bytes)
    print(f"one program: peak {whole.peak_bytes} B")
    assert whole.programs == 1 and whole.peak_bytes > mem.peak_bytes


def test_abstract_state_matches_split(fsdp8):
    graphdef, state = abstract_state(lambda: models.GPT(rngs=nnx.Rngs(0)))
    concrete = nnx.state(models.GPT(rngs=nnx.Rngs(0)))
    assert jax.tree.structure(state) == jax.tree.structure(concrete)
    assert resolve(nnx.merge(graphdef, state), fsdp8, FSDP()).specs()


def test_example_script_runs():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "init_large_model.py")
    out = subprocess.run(
        [sys.executable, script, "--layers", "8", "--width", "256"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(8.0x smaller)" in out.stdout
    assert "-> OK" in out.stdout and "same as eager  : True" in out.stdout
    assert "bit-identical: True" in out.stdout
