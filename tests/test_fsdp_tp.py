"""`runtime/fsdp_tp.py`: when FSDP x TP runs fully manual, and what it leaves out."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import nnx_parallel as npx
from nnx_parallel.core.layouts import get_hooks
from nnx_parallel.runtime import fsdp_tp
from tests import models


def _mlp(kind):
    mesh = jax.make_mesh((2, 4), ("fsdp", "model"), axis_types=(kind, kind))
    tp = {"up": npx.ColumnParallel("model"), "down": npx.RowParallel("model")}
    plan = npx.plans.combine(tp, npx.FSDP("fsdp", min_size=16))
    return npx.parallelize(models.MLP(rngs=nnx.Rngs(0)), mesh, plan)


def test_applies_to_local_safe_layers_with_a_divisible_batch(kind):
    mlp = _mlp(kind)
    hooks = get_hooks(mlp.up)
    assert fsdp_tp.applies(mlp.up, hooks)
    assert fsdp_tp.applies(mlp.up, hooks, (jnp.ones((8, 16)),), {})
    assert not fsdp_tp.applies(mlp.up, hooks, (jnp.ones((3, 16)),), {})  # batch 3 on fsdp=2
    assert not fsdp_tp.applies(mlp.up, hooks, (jnp.ones((16,)),), {})  # no batch dim
    assert not fsdp_tp.applies(mlp.up, hooks, (jnp.ones((8, 16)), jnp.ones(2)), {})
