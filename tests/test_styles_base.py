"""nnx_parallel.core.styles.base: the Style protocol, ModuleContext, as_styles, largest_free_dim."""

import dataclasses

import jax
import pytest
from jax.sharding import PartitionSpec as P

import nnx_parallel as npx
from nnx_parallel.core.styles.base import (
    ModuleContext,
    Style,
    _instance_hint,
    as_styles,
    largest_free_dim,
)


def test_largest_free_dim_prefers_size_then_the_earlier_dim():
    assert largest_free_dim((512, 2048), (None, None), 8) == 1
    assert largest_free_dim((64, 64), (None, None), 8) == 0  # a tie: the earlier dim
    assert largest_free_dim((64, 64), ("x", None), 8) == 1  # dim 0 is taken
    assert largest_free_dim((6, 4), (None, "x"), 4) is None  # 4 does not divide 6
    assert (
        largest_free_dim((2, 64, 32), (None, None, None), 8, start=2) == 2
    )  # stacked dims skipped


def test_as_styles_accepts_one_a_tuple_or_a_list_and_refuses_the_rest():
    fsdp, remat = npx.FSDP(), npx.Remat()
    assert as_styles(fsdp) == (fsdp,)
    assert as_styles([fsdp, remat]) == (fsdp, remat)
    with pytest.raises(npx.PlanError, match=r"FSDP is a class, not a style: write FSDP\(\)"):
        as_styles(npx.FSDP)
    with pytest.raises(npx.PlanError, match="'column' is not a style"):
        as_styles("column")


def test_instance_hint_writes_a_buildable_instance():
    assert _instance_hint(npx.ColumnParallel) == "ColumnParallel() or ColumnParallel('model')"
    assert _instance_hint(npx.Shard).startswith("Shard(kernel=P(None, 'model'))")


def test_a_user_style_is_a_style_and_sees_its_module_context():
    seen = []

    @dataclasses.dataclass(frozen=True)
    class FirstDim:
        subtree = False

        def param_specs(self, ctx):
            seen.append(ctx)
            return {n: P("model", *[None] * (len(s) - 1)) for n, s in ctx.shapes.items()}

        def hooks(self, ctx, specs):
            return None

    assert isinstance(FirstDim(), Style)
    from flax import nnx

    from tests import models

    mesh = jax.make_mesh((8,), ("model",))
    res = npx.resolve(
        nnx.eval_shape(lambda: models.MLP(rngs=nnx.Rngs(0))), mesh, {"up": FirstDim()}
    )
    assert res.specs()["up.kernel"] == P("model", None)
    (ctx,) = seen
    assert isinstance(ctx, ModuleContext) and ctx.path == "up" and ctx.pattern == "up"
    assert ctx.param_path("kernel") == "up.kernel" and ctx.shapes["kernel"] == (16, 64)
    with pytest.raises(npx.PlanError, match="mesh axis 'nope' is not in the mesh"):
        ctx.check_axes(FirstDim(), "nope")
