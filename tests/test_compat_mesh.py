"""nnx_parallel._compat.mesh: meshes, axis types, manual regions and layouts across JAX releases."""

import pickle

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from nnx_parallel import _compat


def test_make_mesh_axis_types_and_pickling():
    mesh = _compat.make_mesh((2, 4), ("data", "model"), explicit=True)
    assert _compat.is_explicit(mesh) and _compat.axis_type(mesh, "model") == AxisType.Explicit
    auto = _compat.make_mesh((8,), ("fsdp",), explicit=False)
    assert not _compat.is_explicit(auto)
    _compat.register_mesh_pickling()
    back = pickle.loads(pickle.dumps(mesh))
    assert back == mesh and back.axis_types == mesh.axis_types


def test_spec_of_reads_the_type_on_explicit_axes_only():
    mesh = _compat.make_mesh((8,), ("x",), explicit=True)
    with jax.set_mesh(mesh):
        y = jax.device_put(jnp.ones((8, 2)), NamedSharding(mesh, P("x")))
        assert _compat.spec_of(y) == P("x", None)
    assert _compat.spec_of("not an array") is None


def test_manual_and_varying_axes_inside_a_shard_map():
    mesh = _compat.make_mesh((2, 4), ("data", "model"), explicit=False)
    seen = []

    def body(x):
        seen.append((_compat.manual_axes(), _compat.varying_axes(x)))
        return x

    f = _compat.shard_map(
        body, mesh=mesh, in_specs=P("data"), out_specs=P("data"), axis_names={"data"}
    )
    jax.jit(f)(jnp.ones((4, 2)))
    assert seen == [(frozenset({"data"}), frozenset({"data"}))]
    assert _compat.manual_axes() == frozenset() and _compat.current_mesh_is_empty()


def test_constrain_and_reshard_lay_out_an_array():
    for explicit in (True, False):
        mesh = _compat.make_mesh((8,), ("x",), explicit=explicit)

        @jax.jit
        def f(a):
            return _compat.constrain(a + 1, mesh, P("x"))

        with jax.set_mesh(mesh):
            assert f(jnp.ones(8)).sharding.spec == P("x"), explicit


def test_a_sharding_type_error_is_recognised_by_type():
    mesh = _compat.make_mesh((8,), ("x",), explicit=True)
    with jax.set_mesh(mesh):
        a = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P("x")))
        b = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P("x")))
        try:
            jax.jit(lambda a, b: a @ b.T)(a, b)  # contracting two sharded dims: refused
        except Exception as e:  # noqa: BLE001
            error = e
        else:
            error = None
    assert error is not None and _compat.is_sharding_type_error(error)
    assert not _compat.is_sharding_type_error(ValueError("x"))
