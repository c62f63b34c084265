"""nnx_parallel._compat.variables: Variable values and sharding metadata across Flax releases."""

import warnings

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from nnx_parallel._compat import (
    SOURCE_KEY,
    get_declared_spec,
    get_metadata,
    get_value,
    restore_metadata,
    set_sharding_metadata,
    set_value,
)

MESH = jax.make_mesh((2, 4), ("data", "model"))


def test_values_round_trip():
    var = nnx.Param(jnp.zeros(3))
    set_value(var, jnp.ones(3))
    assert float(get_value(var).sum()) == 3.0


def test_declared_spec_under_any_key_and_through_sharding_rules():
    kernel, bias = nnx.Param(jnp.zeros((4, 8))), nnx.Param(jnp.zeros(8))
    kernel.set_metadata(out_sharding=(None, "model"))  # what nnx.with_partitioning writes
    assert get_declared_spec(kernel) == (None, "model")
    assert get_declared_spec(bias) is None
    old = nnx.Param(jnp.zeros(8))
    with warnings.catch_warnings():  # Flax 0.12 still reads the old key, with a warning
        warnings.simplefilter("ignore", DeprecationWarning)
        old.set_metadata(sharding_names=("model",))
    assert get_declared_spec(old) == ("model",)
    kernel.set_metadata(sharding_rules=(("model", "data"),))
    assert get_declared_spec(kernel) == (None, "data")  # mapped, as Flax maps it
    assert get_declared_spec(kernel, raw=True) == (None, "model")


def test_set_sharding_metadata_keeps_a_layer_stack_name_and_restores_exactly():
    var = nnx.Param(jnp.zeros((2, 4, 8)))
    var.set_metadata(out_sharding=("layers", None, None))  # nnx.scan's PARTITION_NAME
    before = get_metadata(var)
    set_sharding_metadata(var, P(None, None, "model"), MESH, "blocks.*")
    meta = get_metadata(var)
    assert get_declared_spec(var, raw=True) == ("layers", None, "model")  # the stack name stays
    assert get_declared_spec(var) == (None, None, "model")  # mapped to None by the rule
    assert meta[SOURCE_KEY] == "blocks.*" and meta["mesh"] is MESH
    restore_metadata(var, before)
    assert get_metadata(var) == before
