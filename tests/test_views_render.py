"""Tests for nnx_parallel.views.render: layout comments, the treescope renderer and render."""

import jax
import jax.numpy as jnp
import treescope
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import nnx_parallel as npx
from nnx_parallel.views import render as render_mod
from tests import models

MESH = jax.make_mesh((8,), ("model",))


def tp_mlp():
    plan = {"up": npx.ColumnParallel("model"), "down": npx.RowParallel("model")}
    return npx.parallelize(models.MLP(rngs=nnx.Rngs(0)), MESH, plan)


def test_layout_comment_of_each_param():
    mlp = tp_mlp()
    comment = render_mod._layout_comment
    assert comment(mlp.up.kernel) == (
        "P(None, 'model') · shard (16, 8) · 512 B/device of 4,096 B · from 'up'"
    )
    assert comment(mlp.up.bias) == "P('model') · shard (8,) · 32 B/device of 256 B · from 'up'"
    assert comment(mlp.down.kernel) == (
        "P('model', None) · shard (8, 16) · 512 B/device of 4,096 B · from 'down'"
    )
    assert comment(mlp.down.bias) == "replicated · shard (16,) · 64 B/device of 64 B · from 'down'"


def test_layout_comment_without_plan_metadata():
    # No mesh anywhere: no comment at all.
    assert render_mod._layout_comment(models.MLP(rngs=nnx.Rngs(0)).up.kernel) is None
    # A sharded array no plan set: its own sharding, source "own metadata".
    value = jax.device_put(jnp.zeros((16, 8)), NamedSharding(MESH, P("model", None)))
    assert render_mod._layout_comment(nnx.Param(value)) == (
        "P('model', None) · shard (2, 8) · 64 B/device of 512 B · own metadata"
    )
    replicated = jax.device_put(jnp.zeros((4,)), NamedSharding(MESH, P()))
    assert render_mod._layout_comment(nnx.Param(replicated)) == (
        "replicated · shard (4,) · 16 B/device of 16 B · none"
    )


def test_hook_declines_non_variables_and_unsharded_variables():
    hook = render_mod._param_layout_hook
    assert hook(3, None, None) is NotImplemented
    assert hook(nnx.Param(jnp.zeros(3)), None, None) is NotImplemented


def test_treescope_renderer_annotates_each_sharded_param():
    mlp = tp_mlp()
    with treescope.active_renderer.set_scoped(npx.treescope_renderer()):
        text = treescope.render_to_text(mlp)
    assert "# P(None, 'model') · shard (16, 8) · 512 B/device of 4,096 B · from 'up'" in text
    assert "# P('model') · shard (8,) · 32 B/device of 256 B · from 'up'" in text
    # The default renderer has no layout comments.
    assert "B/device" not in treescope.render_to_text(mlp)


def test_render_html_holds_the_layouts():
    html = npx.render(tp_mlp(), arrays=False, compressed=False)
    assert html.lstrip().startswith("<")
    assert "512 B/device of 4,096 B" in html and "32 B/device of 256 B" in html
    assert "Sharded across" not in html  # arrays=False: no array visualizations
