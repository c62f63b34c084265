"""`make_mesh`: named mesh axes in a fixed order, one size inferred."""

from __future__ import annotations

import math

import jax
from jax.sharding import Mesh

from nnx_parallel import _compat
from nnx_parallel.errors import MeshError


def make_mesh(
    *,
    data: int = 1,
    fsdp: int = 1,
    model: int = 1,
    explicit: bool = True,
    devices=None,
    **other_axes: int,
) -> Mesh:
    """Builds a mesh with axes ('data', 'fsdp', 'model', *other_axes).

    Size-1 axes are kept so plans can name them. One size may be -1: it is
    inferred from the device count. Uses `jax.make_mesh`, which orders
    devices for ICI/DCN on multi-host systems.

    Args:
      data: Size of the 'data' axis.
      fsdp: Size of the 'fsdp' axis.
      model: Size of the 'model' axis.
      explicit: Explicit axis types if True, else Auto.
      devices: Devices to use; default all (every process's) devices.
      **other_axes: Further axes, in the given order.

    Returns:
      The mesh.

    Raises:
      MeshError: More than one -1, or sizes that don't multiply to the
        device count.

    Example:
      >>> dict(make_mesh(fsdp=-1, model=2).shape)
      {'data': 1, 'fsdp': 4, 'model': 2}
    """
    sizes = {"data": data, "fsdp": fsdp, "model": model, **other_axes}
    count = len(devices) if devices is not None else jax.device_count()
    unknown = [name for name, s in sizes.items() if s == -1]
    if len(unknown) > 1:
        raise MeshError(
            f"make_mesh: axes {unknown} are all -1; only one size can be inferred. "
            "Give every other axis an explicit size."
        )
    known = math.prod(s for s in sizes.values() if s != -1)
    if unknown:
        if known <= 0 or count % known:
            raise MeshError(
                f"make_mesh: cannot infer {unknown[0]!r}: {count} devices are not divisible "
                f"by the product {known} of the other axes {sizes}. Change the other sizes."
            )
        sizes[unknown[0]] = count // known
    if math.prod(sizes.values()) != count:
        raise MeshError(
            f"make_mesh: axis sizes {sizes} multiply to {math.prod(sizes.values())}, but there "
            f"are {count} devices. Make the product {count}, or pass -1 for one axis."
        )
    return _compat.make_mesh(
        tuple(sizes.values()), tuple(sizes), explicit=explicit, devices=devices
    )
