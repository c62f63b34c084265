"""Layer stacks (`core/stacks.py`): found by tag, by shape; metadata that
survives `nnx.scan`/`nnx.vmap` with `transform_metadata` (issue 24, item 1).

The tagged scan-over-layers pattern of the Flax guide declares no
`out_sharding`, so `nnx.vmap` leaves no name on the stack: the stack is
found by shape (a `Linear(512, 512)` kernel of shape (L, 512, 512)), kept
unsharded on its layer dim, and written without `out_sharding`.
"""

import itertools

import jax
import pytest
from flax import nnx

import nnx_parallel as npx
from nnx_parallel.core import layers, stacks
from tests import helpers, idioms
from tests.test_fsdp_memory import AUTO, EXPLICIT, UNIT, _compile, _x

KINDS = pytest.mark.parametrize("kind", [AUTO, EXPLICIT], ids=["auto", "explicit"])


def _mesh(kind):
    return jax.make_mesh((8,), ("fsdp",), axis_types=(kind,))


def test_unstacked_shape_reads_the_layer_attributes():
    rngs = nnx.Rngs(0)
    assert layers.unstacked_shape(nnx.Linear(4, 8, rngs=rngs), "kernel") == (4, 8)
    assert layers.unstacked_shape(nnx.Linear(4, 8, rngs=rngs), "bias") == (8,)
    conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    assert layers.unstacked_shape(conv, "kernel") == (3, 3, 3, 8)
    assert layers.unstacked_shape(conv, "bias") == (8,)
    assert layers.unstacked_shape(nnx.Embed(10, 4, rngs=rngs), "embedding") == (10, 4)
    assert layers.unstacked_shape(nnx.BatchNorm(8, rngs=rngs), "scale") == (8,)
    assert layers.unstacked_shape(nnx.Dropout(0.1), "kernel") is None


def test_layer_stacks_by_tag_and_by_shape(fsdp8):
    """Tagged and annotated: the tag; not annotated: found by shape, names
    unknown; mixed: the annotated kernel's tag reaches the other."""
    from nnx_parallel.core.graph import walk

    for annotate, want in (("all", ("layers",)), ("none", (None,)), ("mixed", ("layers",))):
        model = idioms.Stack(16, 3, two=True, annotate=annotate, rngs=nnx.Rngs(0))
        modules, params = walk(model)
        found = stacks.layer_stacks(params, fsdp8, modules)
        assert found == {p: want for p in params}, (annotate, found)
    assert stacks.stack_metadata((None,), jax.P(None, "fsdp")) == {"out_sharding": None}
    # Without modules (or unknown layers) nothing is found by shape.
    model = idioms.Stack(16, 3, rngs=nnx.Rngs(0))
    assert stacks.layer_stacks(walk(model)[1], fsdp8) == {}


PATTERNS = list(itertools.product(("layers", None), ("none", "all", "mixed"), ("fsdp", "tp")))


@pytest.mark.parametrize("tag,annotate,plan", PATTERNS)
def test_metadata_survives_scan_on_every_pattern(tag, annotate, plan):
    """Tagged or not x annotated, not or mixed x FSDP or Column/Row: the
    scanned forward runs and equals unsharded (Explicit axes: the stricter;
    both axis types run the reproducer below)."""
    mesh = _mesh(EXPLICIT)
    make = lambda: idioms.Stack(16, 2, tag=tag, two=True, annotate=annotate, rngs=nnx.Rngs(0))  # noqa: E731
    model, ref = make(), make()
    if plan == "fsdp":
        npx.parallelize(model, mesh, npx.FSDP("fsdp", min_size=1))
    else:
        npx.parallelize(
            model,
            mesh,
            {"blocks.linear": npx.ColumnParallel("fsdp"), "blocks.second": npx.RowParallel("fsdp")},
        )
    assert model.blocks.linear.kernel[...].sharding.spec[0] is None  # the layer dim
    x = jax.random.normal(jax.random.key(0), (8, 16))
    with jax.set_mesh(mesh):
        batch = jax.P("fsdp" if plan == "fsdp" else None)  # TP here shards features over it
        y = model(jax.device_put(x, jax.NamedSharding(mesh, batch)))
    helpers.assert_close(y, ref(x), 1e-5, "forward")


@KINDS
def test_tagged_unannotated_stack_matches_unsharded(kind):
    """The issue's reproducer (width 64): forward, gradients and one Adam step."""
    mesh = _mesh(kind)
    model, ref = idioms.Stack(64, 4, rngs=nnx.Rngs(0)), idioms.Stack(64, 4, rngs=nnx.Rngs(0))
    npx.parallelize(model, mesh, npx.FSDP("fsdp"))
    assert model.blocks.linear.kernel[...].sharding.spec == jax.P(None, "fsdp", None)
    x, xs = _x(mesh, d=64, batch=16)
    helpers.check_equivalence(model, ref, mesh, xs, x)


def _temp(depth, kind):
    mesh = _mesh(kind)
    model = idioms.Stack(512, depth, rngs=nnx.Rngs(0))
    npx.parallelize(model, mesh, npx.FSDP("fsdp"))
    return _compile(model, mesh, _x(mesh)[1]).memory_analysis().temp_size_in_bytes / UNIT


@KINDS
def test_tagged_unannotated_stack_memory_is_independent_of_depth(kind):
    """The reproducer (Linear(512, 512) + relu, batch 64): the train step's
    temp memory at L = 16 <= 3 layers, <= 1 layer more than at L = 4."""
    t4, t16 = _temp(4, kind), _temp(16, kind)
    print(f"temp in layers ({kind}): L=4 {t4:.3f}, L=16 {t16:.3f}")
    assert t16 <= 3.0 and t16 - t4 <= 1.0, (t4, t16)
