"""Forces 8 CPU devices before anything imports jax, and supplies fixtures."""

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import nnx_parallel  # noqa: E402
from nnx_parallel.runtime import trace  # noqa: E402
from tests import models  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def _mesh(shape, names, kind=AxisType.Auto):
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(names))


@pytest.fixture(params=["auto", "explicit"])
def kind(request):
    return AxisType.Auto if request.param == "auto" else AxisType.Explicit


@pytest.fixture
def mesh8(kind):
    return _mesh((8,), ("model",), kind)


@pytest.fixture
def mesh2x4(kind):
    return _mesh((2, 4), ("data", "model"), kind)


@pytest.fixture
def fsdp8(kind):
    return _mesh((8,), ("fsdp",), kind)


@pytest.fixture
def data8(kind):
    return _mesh((8,), ("data",), kind)


@pytest.fixture
def one_device():
    """A 1-device mesh over ('data',): what runs with no sharding at all."""
    return jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])


@pytest.fixture(autouse=True)
def _fresh_trace():
    """Each test gets its own call-time trace state: route logs, warn-once
    warnings, the prefetch token (`nnx_parallel.runtime.trace`)."""
    with trace.fresh():
        yield


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace.update(
        jax=jax,
        nnx=nnx,
        P=P,
        npx=nnx_parallel,
        mesh8=_mesh((8,), ("model",)),
        mesh2x4=_mesh((2, 4), ("data", "model")),
        fsdp8=_mesh((8,), ("fsdp",)),
        TinyMLP=models.MLP,
        **{name: getattr(nnx_parallel, name) for name in nnx_parallel.__all__},
    )
