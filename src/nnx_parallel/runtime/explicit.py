"""A module's own sharding code inside our manual regions.

Model code may lay out its own activations: a sharding constraint, a
`reshard` or an `out_sharding=` naming mesh axes (Flax's GSPMD
guide does so inside each layer). Inside the `shard_map` an FSDP call runs
in, the batch axes are manual, and JAX refuses a spec that names them.
Such a call cannot run per batch shard as written: `call_or_gspmd` traces
it on the `shard_map` route and, where the module's own code names a manual
axis, traces it again on the GSPMD route (its parameters gathered by a
sharding constraint, the batch left global), with a `FallbackWarning`.

The failure is found at trace time, from the error JAX raises, because the
module's code is the user's: nothing else can tell whether it shards. (On
Explicit axes the per-device shape probe of `fsdp.batch_call` may meet
such code first, when the per-device batch does not divide a mesh axis the
code names; it falls back to the same GSPMD route with its own reason.)
"""

from __future__ import annotations

from nnx_parallel.core.layouts import Gather
from nnx_parallel.runtime import fsdp
from nnx_parallel.runtime.layout import warn_once


def names_manual_axis(error: BaseException, gather: Gather) -> bool:
    """True if `error` is JAX refusing a spec that names one of our manual axes."""
    if not isinstance(error, (ValueError, TypeError)):
        return False
    text = str(error)
    axes = set(gather.axes) | set(gather.batch_axes)
    return "Manual" in text and any(repr(a) in text or f": {a} " in text for a in axes)


def call_or_gspmd(module, call, gather: Gather, mesh, args, kwargs) -> tuple:
    """`(output, fell back?, own sharding?)` of an FSDP call over the batch axes.

    The shard_map route first; if the module's own sharding code names a
    manual axis there, the GSPMD route, with a `FallbackWarning`.
    """
    try:
        used = fsdp.batch_call(module, call, gather, mesh, args, kwargs)
    except (ValueError, TypeError) as e:
        if not names_manual_axis(e, gather):
            raise
        first = str(e).strip().splitlines()[0][:200]
        warn_once(
            (fsdp.base_name(module), "own sharding"),
            f"FSDP on {fsdp.base_name(module)}: its own sharding code names a batch axis, which is "
            f"manual per batch shard ({first}); gathering its parameters with a sharding "
            "constraint instead, which costs a full all-reduce of their gradients.",
        )
        return fsdp.gspmd_call(module, call, gather, mesh, args, kwargs), True, True
    return used.out, used.fallback, False
