"""How `accumulate` combines the aux output of a `has_aux=True` gradient function.

Defaults, with no `aux_reduce` for a leaf: a float scalar follows `reduction`
(the mean over microbatches of a per-batch mean), an integer scalar is summed
(a count), a float array whose dim 0 is not the microbatch's rows is combined
elementwise like a float scalar. Anything else is refused, naming the
reduction to pass: a bool (`"max"`: any, `"min"`: all) and a per-example
array (`"concat"`). A max or min cannot be told from a mean by its shape:
pass `aux_reduce={"name": "max"}` for it.

`aux_reduce` is one name for every aux leaf or a dict (nested like the aux)
of names: `"mean"`, `"sum"`, `"max"`, `"min"`, `"concat"` (per-example values
back in batch order), `"last"` (the last microbatch's value; where the batch is
split over devices, the last device's).

A named leaf rides on the sum the accumulator already does, exactly: the call
of microbatch i on device d bit-casts its value to an unsigned integer of the
same width and puts it in slot (d, i) of an otherwise zero buffer of shape
(devices, k, ...). Summing those buffers over microbatches and devices (integer
leaves are summed, never averaged) leaves every value unchanged, and `decode`
casts them back and reduces the slots as asked. The buffer costs devices x k
times the leaf: meant for scalars and per-example vectors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nnx_parallel import _compat
from nnx_parallel.errors import ParallelError, did_you_mean

AUX_REDUCTIONS = ("mean", "sum", "max", "min", "concat", "last")


@dataclasses.dataclass
class AuxCodec:
    """The aux reductions of one `accumulate` trace: `encode` per call, `decode` at the end.

    Example:
      >>> codec = AuxCodec({"top": "max"}, k=2, rows=4)
      >>> loss, grads = jnp.float32(1.0), nnx.State({})
      >>> outs = [codec.encode(((loss, {"top": jnp.float32(v)}), grads), i) for i, v in enumerate([3, 5])]
      >>> total = jax.tree.map(jnp.add, *outs)
      >>> float(codec.decode(total)[0][1]["top"])
      5.0
    """

    aux_reduce: Any
    k: int
    rows: int  # rows of one microbatch, on one device
    devices: int = 1
    names: list | None = None  # per aux leaf (flatten order): a reduction, or None (default)
    dtypes: list | None = None  # per aux leaf: its dtype

    def encode(self, out: Any, i: Any, device: Any = 0) -> Any:
        """`out` of microbatch `i` on `device` with every named aux leaf in its buffer."""
        where, aux = find_aux(out)
        if where is None:
            if self.aux_reduce is not None:
                raise ParallelError(
                    f"accumulate(aux_reduce={self.aux_reduce!r}): grad_fn returns no aux. Pass "
                    "aux_reduce only with nnx.value_and_grad(loss_fn, has_aux=True) (or "
                    "nnx.grad(..., has_aux=True))."
                )
            return out
        leaves = jax.tree_util.tree_flatten_with_path(aux)[0]
        if self.names is None:
            self.names = [self._name(path, x) for path, x in leaves]
            self.dtypes = [x.dtype for _, x in leaves]
            _check_used(self.aux_reduce, [p for p, _ in leaves])
        slot = jax.nn.one_hot(device * self.k + i, self.devices * self.k, dtype=jnp.uint8)
        slot = slot.reshape(self.devices, self.k)
        coded = [x if n is None else _bury(x, slot) for (_, x), n in zip(leaves, self.names)]
        return _with_aux(out, where, jax.tree.unflatten(jax.tree.structure(aux), coded))

    def decode(self, out: Any) -> Any:
        """The accumulated `out` with every named aux leaf reduced from its buffer."""
        where, aux = find_aux(out)
        if where is None or not self.names or all(n is None for n in self.names):
            return out
        leaves, treedef = jax.tree.flatten(aux)
        done = [
            x if n is None else _unbury(x, n, d) for x, n, d in zip(leaves, self.names, self.dtypes)
        ]
        return _with_aux(out, where, jax.tree.unflatten(treedef, done))

    def _name(self, path, x) -> str | None:
        name = _lookup(self.aux_reduce, path)
        where = f"aux{jax.tree_util.keystr(path)}"
        if name is not None and name not in AUX_REDUCTIONS:
            raise ParallelError(
                f"accumulate: aux_reduce for {where} is {name!r}; use one of {AUX_REDUCTIONS}."
                f"{did_you_mean(str(name), AUX_REDUCTIONS)}"
            )
        if name is not None:
            return name
        if x.dtype == jnp.bool_:
            raise ParallelError(
                f"accumulate: {where} is a bool {tuple(x.shape)}, which a sum or mean over "
                f"microbatches would turn into a count. Say how to combine it: "
                f"aux_reduce={{{_key(path)!r}: 'max'}} (true in any microbatch), 'min' (in "
                "all), 'concat' (per example) or 'last'."
            )
        if x.ndim and x.shape[0] == self.rows:
            raise ParallelError(
                f"accumulate: {where} has shape {tuple(x.shape)}, dim 0 the microbatch's "
                f"{self.rows} rows: a per-example value, which would be averaged across "
                f"examples of different microbatches. Pass aux_reduce={{{_key(path)!r}: "
                "'concat'}} to get it for the whole batch, in batch order (or 'mean'/'sum' if "
                "it is not per example)."
            )
        return None


def find_aux(out: Any) -> tuple[str | None, Any]:
    """Where `grad_fn`'s aux sits in its output: ((loss, aux), grads) or (grads, aux)."""
    if isinstance(out, tuple) and len(out) == 2:
        first, second = out
        if isinstance(second, nnx.State) and isinstance(first, tuple) and len(first) == 2:
            return "value", first[1]
        if isinstance(first, nnx.State) and not isinstance(second, nnx.State):
            return "grad", second
    return None, None


def _with_aux(out: Any, where: str, aux: Any) -> Any:
    if where == "value":
        return (out[0][0], aux), out[1]
    return out[0], aux


def _lookup(aux_reduce: Any, path) -> str | None:
    node = aux_reduce
    for key in path:
        if node is None or isinstance(node, str):
            break
        k = getattr(key, "key", getattr(key, "idx", getattr(key, "name", None)))
        if isinstance(node, Mapping):
            node = node.get(k)
        elif isinstance(node, Sequence) and isinstance(k, int) and k < len(node):
            node = node[k]
        else:
            node = None
    return node if isinstance(node, str) or node is None else None


def _check_used(aux_reduce: Any, paths) -> None:
    """Refuses a dict key of `aux_reduce` that names no aux leaf (a typo)."""
    if not isinstance(aux_reduce, Mapping):
        return
    firsts = {getattr(p[0], "key", None) for p in paths if p}
    for key in aux_reduce:
        if key not in firsts:
            raise ParallelError(
                f"accumulate: aux_reduce names {key!r}, which the aux does not have (it has "
                f"{sorted(map(str, firsts))}).{did_you_mean(str(key), map(str, firsts))}"
            )


def _key(path) -> Any:
    return getattr(path[0], "key", getattr(path[0], "idx", 0)) if path else 0


def _uint(dtype) -> Any:
    return {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[jnp.dtype(dtype).itemsize]


def _bury(x: jax.Array, slot: jax.Array) -> jax.Array:
    """`x` bit-cast to unsigned, in the one slot of a (devices, k, ...) zero buffer."""
    bits = (
        x.astype(jnp.uint8)
        if x.dtype == jnp.bool_
        else jax.lax.bitcast_convert_type(x, _uint(x.dtype))
    )
    return slot.reshape(slot.shape + (1,) * bits.ndim).astype(bits.dtype) * bits[None, None]


def _unbury(buffer: jax.Array, name: str, dtype) -> jax.Array:
    if dtype == jnp.bool_:
        values = buffer.astype(jnp.bool_)
    else:
        values = jax.lax.bitcast_convert_type(buffer.astype(_uint(dtype)), dtype)
    if name == "concat":  # slot (d, i) row j is local row j * k + i of device d
        return _compat.merge_leading(jnp.swapaxes(values, 1, 2), 3)
    if name == "last":
        return values[-1, -1]
    flat = values.reshape(-1, *values.shape[2:])
    if name == "mean":
        return flat.mean(axis=0).astype(dtype)
    return {"sum": jnp.sum, "max": jnp.max, "min": jnp.min}[name](flat, axis=0).astype(dtype)
