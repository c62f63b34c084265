import pytest
from jax.sharding import AxisType

from nnx_parallel import MeshError, make_mesh


def test_order_and_inference():
    mesh = make_mesh(data=2, model=-1, explicit=False)
    assert mesh.axis_names == ("data", "fsdp", "model")
    assert tuple(mesh.shape.values()) == (2, 1, 4)
    assert set(mesh.axis_types) == {AxisType.Auto}


def test_other_axes_and_explicit():
    mesh = make_mesh(fsdp=2, seq=4)
    assert mesh.axis_names == ("data", "fsdp", "model", "seq")
    assert set(mesh.axis_types) == {AxisType.Explicit}


def test_errors():
    with pytest.raises(MeshError, match="only one size can be inferred"):
        make_mesh(data=-1, model=-1)
    with pytest.raises(MeshError, match="multiply to 6, but there are 8 devices"):
        make_mesh(data=2, model=3)
    with pytest.raises(MeshError, match="cannot infer 'data'"):
        make_mesh(data=-1, model=3)
