"""Shared assertions: compare a parallelized model with its unsharded twin."""

import contextlib
import gc
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from nnx_parallel import FallbackWarning
from nnx_parallel.views.collectives import collectives, count_collectives

# f32 tolerances: sharded reductions reorder sums, nothing else differs.
FWD_TOL = 1e-5
GRAD_TOL = 1e-5
STEP_TOL = 1e-5


def tp_plans():
    from nnx_parallel import ColumnParallel, RowParallel

    col, row = ColumnParallel("model"), RowParallel("model")
    attn = {"q": col, "k": col, "v": col, "o": row}
    mlp = {"up": col, "down": row}
    gpt = {f"blocks.*.attn.{k}": v for k, v in attn.items()}
    gpt |= {f"blocks.*.mlp.{k}": v for k, v in mlp.items()}
    gpt |= {"embed": col, "head": col}
    return {"mlp": mlp, "attention": attn, "gpt": gpt}


def params(model):
    return {
        ".".join(map(str, p)): v.get_value()
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def assert_close(actual, expected, tol, what):
    a, e = np.asarray(actual), np.asarray(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    err = float(np.max(np.abs(a - e))) if a.size else 0.0
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol}"


def assert_trees_close(a, b, tol=1e-5):
    """Every leaf of `a` has the shape of `b`'s and is within `tol` of it."""
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert np.shape(x) == np.shape(y)
        assert float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) <= tol


def loss_fn(model, x):
    y = model(x)
    return jnp.mean(y.astype(jnp.float32) ** 2)


def make_step(loss=loss_fn):
    @nnx.jit
    def step(model, opt, x):
        value, grads = nnx.value_and_grad(loss)(model, x)
        opt.update(model, grads)
        return value, grads

    return step


def batch_for(model_name, mesh, batch_axes=("data",)):
    """A deterministic input batch, sharded over the mesh's batch axes."""
    key = jax.random.key(42)
    if model_name == "gpt":
        x = jax.random.randint(key, (4, 8), 0, 64)
    elif model_name == "attention":
        x = jax.random.normal(key, (4, 8, 32))
    else:
        x = jax.random.normal(key, (8, 16))
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    spec = jax.P(axes if len(axes) > 1 else (axes[0] if axes else None))
    return x, jax.device_put(x, NamedSharding(mesh, spec))


def forward(model, x):
    """One jitted forward call (eager calls of hooked modules compile op by op)."""
    return nnx.jit(lambda m, x: m(x))(model, x)


def check_equivalence(model, ref, mesh, x_sharded, x, *, lr=1e-2):
    """Forward, grads and one Adam step of `model` equal those of `ref`."""
    with jax.set_mesh(mesh):
        assert_close(forward(model, x_sharded), ref(x), FWD_TOL, "forward")
        opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)
        opt_ref = nnx.Optimizer(ref, optax.adam(lr), wrt=nnx.Param)
        step = make_step()
        loss, grads = step(model, opt, x_sharded)
        loss_ref, grads_ref = step(ref, opt_ref, x)
    assert_close(loss, loss_ref, FWD_TOL, "loss")
    g, g_ref = params(grads), params(grads_ref)
    assert g.keys() == g_ref.keys()
    for k in g:
        assert_close(g[k], g_ref[k], GRAD_TOL, f"grad of {k}")
    p, p_ref = params(model), params(ref)
    for k in p:
        assert_close(p[k], p_ref[k], STEP_TOL, f"param {k} after one Adam step")
    return opt


def step_collectives(model, opt, x, mesh):
    with jax.set_mesh(mesh):
        compiled = make_step().lower(model, opt, x).compile()
    return collectives(compiled, mesh)


def forward_counts(model, x, mesh):
    with jax.set_mesh(mesh):
        compiled = nnx.jit(lambda m, x: m(x)).lower(model, x).compile()
    return count_collectives(compiled, mesh)


def live_arrays() -> int:
    """Live device arrays once garbage from earlier tests is collected (a
    collection in between would otherwise lower the count)."""
    gc.collect()
    return len(jax.live_arrays())


def guard_warning(explicit: bool):
    """Expects the Explicit-axes guard's `FallbackWarning` (runtime/guard.py)
    where the mesh is Explicit; nothing on Auto axes."""
    if not explicit:
        return contextlib.nullcontext()
    return pytest.warns(FallbackWarning, match="Explicit axes refuse this call's own code")


def snapshot(model):
    """Everything `parallelize` may change: values, shardings, metadata, classes."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable):
            value = node.get_value()
            out[path] = (np.asarray(value), value.sharding, dict(node.get_metadata()))
        else:
            out[path] = type(node)
    return out


def assert_same(before, after):
    assert before.keys() == after.keys()
    for k, b in before.items():
        a = after[k]
        if isinstance(b, tuple):
            np.testing.assert_array_equal(a[0], b[0])
            assert a[1:] == b[1:], k
        else:
            assert a is b, k


def hlo_shapes(compiled, skip=("pred",)) -> set[tuple[int, ...]]:
    """Every array shape (per device) in a compiled program's HLO text, but
    those of the dtypes in `skip` (default: booleans, e.g. masks)."""
    found = re.findall(r"\b(pred|[a-z]+\d+)\[([\d,]*)\]", compiled.as_text())
    return {tuple(int(d) for d in dims.split(",") if d) for t, dims in found if t not in skip}


def assert_allclose(actual, expected, atol=1e-5, rtol=1e-5):
    """numpy's assert_allclose on host copies (the tests' default tolerance)."""
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=atol, rtol=rtol)


def rel_err(actual, expected) -> float:
    """Max abs error relative to the largest magnitude of `expected`."""
    a, e = np.asarray(actual), np.asarray(expected)
    assert a.shape == e.shape
    return float(np.max(np.abs(a - e)) / np.max(np.abs(e)))


def flat_state(tree) -> dict:
    """An nnx.State (or module state) as dotted path -> value."""
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(tree)}


def max_rel_err(tree, ref_tree) -> float:
    """The largest `rel_err` over the leaves of two states with the same paths."""
    got, want = flat_state(tree), flat_state(ref_tree)
    assert got.keys() == want.keys()
    return max(rel_err(got[k], want[k]) for k in want)


def adam(model, lr=1e-2):
    """The checkpoint tests' optimizer: Adam over the Params."""
    return nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)


def host_state(obj) -> dict:
    """`obj`'s whole state as a pure dict of numpy arrays (host copies)."""
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(obj)))


def assert_trees_equal(a, b):
    """Same structure and bit-identical leaves."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)
