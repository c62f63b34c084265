"""nnx_parallel.runtime.fsdp: the FSDP call paths' small decisions (names, per-shard check, specs)."""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import nnx_parallel as npx
from nnx_parallel.core.layouts import Gather, get_hooks
from nnx_parallel.runtime.fsdp import base_name, nested, not_per_shard, param_specs
from tests import models

MESH = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))


def _fsdp_mlp():
    return npx.parallelize(models.MLP(rngs=nnx.Rngs(0)), MESH, npx.FSDP(min_size=16))


def test_base_name_is_the_users_class_name():
    mlp = _fsdp_mlp()
    assert base_name(mlp.up) == "Linear" and type(mlp.up).__name__ != "Linear"


def test_not_per_shard_names_why_a_call_cannot_split_over_the_batch():
    mlp = _fsdp_mlp()
    gather = get_hooks(mlp.up).gather
    assert not_per_shard(mlp.up, gather, MESH) is None  # from the module alone: it may
    assert not_per_shard(mlp.up, gather, MESH, (jnp.ones((16, 16)),)) is None
    why = not_per_shard(mlp.up, gather, MESH, (jnp.ones((4, 16)),))
    assert "shape (4, 16)" in why and "does not split over the batch axes" in why
    bn = nnx.BatchNorm(16, rngs=nnx.Rngs(0))
    assert "holds or is passed state" in not_per_shard(bn, gather, MESH)


def test_param_specs_read_metadata_or_the_gather():
    mlp = _fsdp_mlp()
    pstate = nnx.state(mlp.up, nnx.Param)
    specs = param_specs(pstate)
    assert specs["kernel"] == P(None, "fsdp") and specs["bias"] == P("fsdp")
    # Without metadata (a raw array), the gather's (name, dim) decides.
    gather = Gather(axes=("fsdp",), batch_axes=("fsdp",), params=(("w", 0),))
    raw = nnx.State({"w": nnx.Param(jnp.zeros((8, 4))), "b": nnx.Param(jnp.zeros(4))})
    got = param_specs(raw, gather)
    assert got["w"] == P("fsdp", None) and got["b"] == P()


def test_nested_only_inside_a_region_manual_over_the_axes():
    gather = Gather(axes=("fsdp",), batch_axes=("fsdp",), params=())
    assert not nested(gather)
    from nnx_parallel import _compat

    seen = []

    def body(x):
        seen.append(nested(gather))
        return x

    jax.jit(
        _compat.shard_map(
            body, mesh=MESH, in_specs=P("fsdp"), out_specs=P("fsdp"), axis_names={"fsdp"}
        )
    )(jnp.ones(8))
    assert seen == [True]
