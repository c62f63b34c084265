"""Level 1: resolved specs, on abstract models (no device memory)."""

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from nnx_parallel import FSDP, ColumnParallel, Replicated, RowParallel, Shard, resolve, sharded
from nnx_parallel.core.graph import match
from tests import helpers, models


def abstract(builder):
    return nnx.eval_shape(builder)


def test_match_is_segmentwise():
    assert match("layers.*.mlp.up", "layers.3.mlp.up")
    assert not match("layers.*.up", "layers.3.mlp.up")
    assert match("", "")
    assert not match("", "up")
    assert match("q_*", "q_proj")


def test_mlp_specs(mesh8):
    res = resolve(abstract(lambda: models.MLP(rngs=nnx.Rngs(0))), mesh8, helpers.tp_plans()["mlp"])
    assert res.specs() == {
        "up.kernel": P(None, "model"),
        "up.bias": P("model"),
        "down.kernel": P("model", None),
        "down.bias": P(None),
    }
    assert res.params["up.kernel"].shard_shape(mesh8) == (16, 8)
    assert res.params["up.kernel"].bytes_per_device(mesh8) == 16 * 8 * 4
    assert res.untouched == ()


def test_attention_specs(mesh2x4):
    res = resolve(
        abstract(lambda: models.Attention(rngs=nnx.Rngs(0))),
        mesh2x4,
        helpers.tp_plans()["attention"],
    )
    specs = res.specs()
    for name in "qkv":
        assert specs[f"{name}.kernel"] == P(None, "model")
    assert specs["q.bias"] == P("model") and "k.bias" not in specs
    assert specs["o.kernel"] == P("model", None) and specs["o.bias"] == P(None)


def test_gpt_specs_and_sources(mesh8):
    res = resolve(abstract(lambda: models.GPT(rngs=nnx.Rngs(0))), mesh8, helpers.tp_plans()["gpt"])
    specs = res.specs()
    assert specs["embed.embedding"] == P(None, "model")
    assert specs["head.kernel"] == P(None, "model")
    assert specs["blocks.1.mlp.down.kernel"] == P("model", None)
    assert res.params["blocks.1.mlp.down.kernel"].source == "blocks.*.mlp.down"
    assert specs["pos.embedding"] == P(None, None)
    assert "pos.embedding" in res.untouched and "blocks.0.ln1.scale" in res.untouched
    assert res.matches["blocks.*.mlp.up"] == ("blocks.0.mlp.up", "blocks.1.mlp.up")


def test_most_specific_pattern_wins_then_first(mesh8):
    model = abstract(lambda: models.MLP(rngs=nnx.Rngs(0)))
    res = resolve(model, mesh8, {"*": ColumnParallel(), "down": RowParallel()})
    assert res.specs()["down.kernel"] == P("model", None)
    assert res.specs()["up.kernel"] == P(None, "model")
    res = resolve(model, mesh8, {"*": RowParallel(), "d*": ColumnParallel()}, strict=False)
    assert res.specs()["down.kernel"] == P("model", None)  # equal specificity: first wins


def test_single_style_applies_to_root(fsdp8):
    res = resolve(abstract(lambda: models.MLP(rngs=nnx.Rngs(0))), fsdp8, FSDP(min_size=64))
    assert res.specs()["up.kernel"] == P(None, "fsdp")  # largest divisible dim (64)
    assert res.specs()["down.kernel"] == P("fsdp", None)
    assert res.specs()["up.bias"] == P("fsdp")
    assert res.specs()["down.bias"] == P(None)  # 16 elements < min_size
    # The root pattern "" is a source like any other: nothing is "untouched".
    assert res.untouched == () and {e.source for e in res.params.values()} == {""}


def test_subtree_style_fills_in_around_tp(kind):
    mesh = jax.make_mesh((4, 2), ("fsdp", "model"), axis_types=(kind, kind))
    model = abstract(lambda: models.MLP(rngs=nnx.Rngs(0)))
    res = resolve(model, mesh, {"": FSDP(min_size=16), "up": ColumnParallel()})
    assert res.specs()["up.kernel"] == P("fsdp", "model")
    assert res.specs()["down.kernel"] == P("fsdp", None)
    res = resolve(model, mesh, {"": FSDP(min_size=16), "down": Replicated()})
    assert res.specs()["down.kernel"] == P(None, None)


def test_shard_style_and_einsum_and_general(mesh2x4):
    class Heads(nnx.Module):
        def __init__(self, rngs):
            self.qkv = nnx.Einsum("btd,dnh->btnh", (32, 4, 8), (4, 8), rngs=rngs)
            self.out = nnx.Einsum("btnh,nhd->btd", (4, 8, 32), (32,), rngs=rngs)
            self.gen = nnx.LinearGeneral(32, (4, 8), rngs=rngs)
            self.w = nnx.Param(jax.numpy.ones((32, 4, 8)))

        def __call__(self, x):
            return self.out(self.qkv(x)) + self.out(self.gen(x))

    model = abstract(lambda: Heads(nnx.Rngs(0)))
    plan = {
        "qkv": ColumnParallel(),
        "out": RowParallel(),
        "gen": ColumnParallel(),
        "": Shard(w=P(None, "model", None)),
    }
    specs = resolve(model, mesh2x4, plan).specs()
    assert specs["qkv.kernel"] == P(None, "model", None)
    assert specs["qkv.bias"] == P("model", None)
    assert specs["out.kernel"] == P("model", None, None)
    assert specs["gen.kernel"] == P(None, "model", None)
    assert specs["w"] == P(None, "model", None)


def test_param_and_dim_overrides(mesh8):
    class Custom(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jax.numpy.ones((16, 8, 4)))
            self.scale = nnx.Param(jax.numpy.ones((4,)))

    res = resolve(abstract(Custom), mesh8, ColumnParallel(param="w", dim=1))
    assert res.specs() == {"w": P(None, "model", None), "scale": P(None)}


def test_sharded_decorator_aligns_trailing_dims(mesh8):
    @sharded(P(None, "model"))
    class Up(nnx.Linear):
        pass

    model = abstract(lambda: Up(16, 32, rngs=nnx.Rngs(0)))
    res = resolve(model, mesh8, {})
    assert res.specs() == {"kernel": P(None, "model"), "bias": P("model")}
    assert res.params["kernel"].source == "@sharded"
    # The plan overrides a declaration on the same module.
    assert resolve(model, mesh8, {"": RowParallel()}).specs()["kernel"] == P("model", None)


def test_sharded_on_instance_with_keywords(mesh8):
    layer = sharded(kernel=P("model", None))(nnx.Linear(16, 32, rngs=nnx.Rngs(0)))
    assert resolve(layer, mesh8, None).specs() == {"kernel": P("model", None), "bias": P(None)}


def test_resolve_allocates_nothing(mesh8):
    before = helpers.live_arrays()
    model = abstract(lambda: models.GPT(rngs=nnx.Rngs(0)))
    res = resolve(model, mesh8, helpers.tp_plans()["gpt"])
    assert helpers.live_arrays() == before  # measured while the resolution is alive
    assert res.specs()["blocks.0.mlp.up.kernel"] is not None  # ...and it is a real result


def test_unknown_style_value(mesh8):
    from nnx_parallel import PlanError

    with pytest.raises(PlanError, match="is not a style"):
        resolve(abstract(lambda: models.MLP(rngs=nnx.Rngs(0))), mesh8, {"up": "column"})
    with pytest.raises(PlanError, match="is not a string"):
        resolve(abstract(lambda: models.MLP(rngs=nnx.Rngs(0))), mesh8, {1: ColumnParallel()})
