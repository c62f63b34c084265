"""nnx_parallel.decorators: @sharded on classes and instances, and its errors."""

import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import nnx_parallel as npx
from nnx_parallel.decorators import get_declared, sharded


def test_class_declaration_is_used_when_no_pattern_matches(mesh8):
    @sharded(P(None, "model"))
    class Up(nnx.Linear):
        pass

    specs = npx.resolve(nnx.eval_shape(lambda: Up(16, 32, rngs=nnx.Rngs(0))), mesh8, {}).specs()
    assert specs == {"kernel": P(None, "model"), "bias": P("model")}


def test_a_pattern_wins_over_the_declaration(mesh8):
    layer = sharded(P(None, "model"))(nnx.Linear(16, 32, rngs=nnx.Rngs(0)))
    specs = npx.resolve(layer, mesh8, {"": npx.RowParallel()}).specs()
    assert specs["kernel"] == P("model", None)


def test_keyword_specs_override_the_positional_one():
    layer = sharded(P(None, "model"), bias=P(None))(nnx.Linear(4, 8, rngs=nnx.Rngs(0)))
    assert get_declared(layer) == {"*": P(None, "model"), "bias": P(None)}
    assert get_declared(nnx.Linear(4, 8, rngs=nnx.Rngs(0))) is None


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: sharded(), "needs a spec"),
        (lambda: sharded(("model",)), "expected a PartitionSpec"),
        (lambda: sharded(kernel="model"), r"sharded\(kernel='model'\)"),
        (lambda: sharded(P("model"))(object()), "applies to an nnx.Module subclass or instance"),
    ],
)
def test_errors(call, match):
    with pytest.raises(npx.PlanError, match=match):
        call()
