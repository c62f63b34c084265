"""What the styles know about layer types, in one table.

A tensor-parallel style must know, for each kind of layer, which weight dim
holds the output (column) or input (row) features, where those features
land in the activation, and how the output rank relates to the input rank.
The runtime must know which layers compute correctly on local shards and
whose output rank is known statically. Everything of that kind lives here;
styles and runtime ask through the functions below and never test types.

- `einsum` (an `einsum_str` attribute: `nnx.Einsum`): column shards the
  first kernel letter only the output has (that the axis size divides), row
  the first kernel letter only the input has.
- `general` (tuple `in_features`/`out_features`: `nnx.LinearGeneral`):
  column shards the first output dim, row the first input dim.
- `embed` (`nnx.Embed`): column shards the features (last dim), row the
  vocabulary rows (dim 0).
- `dense` (anything else: `nnx.Linear`, `nnx.Conv`): column shards the
  last dim, row the second to last.

Example:
  >>> layer_kind(nnx.Linear(4, 8, rngs=nnx.Rngs(0))), layer_kind(nnx.Embed(10, 4, rngs=nnx.Rngs(0)))
  ('dense', 'embed')
  >>> tp_dims(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), 2, column=True)
  (1, 1, 0)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import nnx

from nnx_parallel.core.layouts import Layout

# Parameter names that hold a layer's weight matrix, in the order tried.
WEIGHT_NAMES = ("kernel", "embedding", "weight", "w", "input_embedding")

# Layers whose call only reads parameter shapes, so they compute correctly on
# local shards: inside a shard_map manual over the tensor-parallel axis too,
# a column-parallel Linear is a plain Linear on its slice of output features.
_LOCAL_SAFE = (nnx.Linear, nnx.Einsum, nnx.LinearGeneral, nnx.Conv)
# Layers whose output rank the styles compute statically (`Layout.rank_delta`).
_KNOWN_RANK = (nnx.Linear, nnx.Einsum, nnx.LinearGeneral, nnx.Conv, nnx.Embed)

# (weight dim to shard, output feature position from the end or None, rank delta)
TPDims = tuple[int, int | None, int]


def weight_name(shapes: Mapping[str, tuple]) -> str | None:
    """The parameter holding the weight matrix: a known name, else the only matrix."""
    for name in WEIGHT_NAMES:
        if name in shapes and len(shapes[name]) >= 2:
            return name
    matrices = [n for n, s in shapes.items() if len(s) >= 2]
    return matrices[0] if len(matrices) == 1 else None


def einsum_parts(module: Any) -> tuple[str, str, str] | None:
    """(input, kernel, output) subscripts of a two-operand einsum layer, or None."""
    spec = getattr(module, "einsum_str", None)
    if not isinstance(spec, str) or "->" not in spec:
        return None
    lhs, out = spec.replace(" ", "").split("->")
    operands = lhs.split(",")
    return (operands[0], operands[1], out) if len(operands) == 2 else None


def layer_kind(module: Any) -> str:
    """The row of the table above that `module` falls in."""
    if einsum_parts(module) is not None:
        return "einsum"
    in_feat, out_feat = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(in_feat, tuple) and isinstance(out_feat, tuple):
        return "general"
    if isinstance(module, nnx.Embed):
        return "embed"
    return "dense"


def _einsum_dims(module, ndim, column, shape, size) -> TPDims | None:
    x_sub, k_sub, out_sub = einsum_parts(module)
    delta = len(out_sub) - len(x_sub)
    if column:
        letters = [c for c in k_sub if c in out_sub and c not in x_sub]
        if shape is not None and len(shape) == len(k_sub):
            letters = sorted(letters, key=lambda c: shape[k_sub.index(c)] % size != 0)
        if letters:
            return k_sub.index(letters[0]), len(out_sub) - out_sub.index(letters[0]), delta
    else:
        letters = [c for c in k_sub if c in x_sub and c not in out_sub]
        if letters:
            return k_sub.index(letters[0]), None, delta
    return None  # no such letter: read the kernel as a dense one


def _general_dims(module, ndim, column, shape, size) -> TPDims:
    n_in, n_out = len(module.in_features), len(module.out_features)
    n_batch = ndim - n_in - n_out
    return (n_batch + n_in, n_out, n_out - n_in) if column else (n_batch, None, n_out - n_in)


def _embed_dims(module, ndim, column, shape, size) -> TPDims:
    return (ndim - 1, 1, 1) if column else (0, None, 1)


def _dense_dims(module, ndim, column, shape, size) -> TPDims:
    return (ndim - 1, 1, 0) if column else (ndim - 2, None, 0)


_TP_DIMS = {"einsum": _einsum_dims, "general": _general_dims, "embed": _embed_dims}


def tp_dims(module: Any, weight_ndim: int, column: bool, shape=None, size: int = 1) -> TPDims:
    """(weight dim to shard, output dim from the end or None, output-rank delta).

    For an einsum, the first kernel letter that only the output has and whose
    size `size` divides (fused "CNDH" kernels: the heads, not the 2 of k/v).
    """
    rule = _TP_DIMS.get(layer_kind(module))
    dims = rule(module, weight_ndim, column, shape, size) if rule else None
    return dims if dims is not None else _dense_dims(module, weight_ndim, column, shape, size)


def row_input_dim(module: Any, weight_ndim: int, dim: int) -> int | None:
    """Position from the end of the input dim a row-parallel weight contracts."""
    kind = layer_kind(module)
    if kind == "einsum":
        x_sub, k_sub, _ = einsum_parts(module)
        return len(x_sub) - x_sub.index(k_sub[dim])
    if kind == "general":
        n_batch = weight_ndim - len(module.in_features) - len(module.out_features)
        return len(module.in_features) - (dim - n_batch)
    if kind == "embed":
        return None  # ids in, no feature dim to expect sharded
    return 1 if dim == weight_ndim - 2 else None


def vocab_lookup(module: Any, dim: int) -> bool:
    """True if sharding `dim` of `module`'s weight splits an embedding's vocab."""
    return isinstance(module, nnx.Embed) and dim == 0


def in_out_sizes(module: Any, shape: tuple) -> tuple[int, int] | None:
    """(input size, output size) of a 2D-like projection, or None."""
    if isinstance(module, nnx.Linear):
        return module.in_features, module.out_features
    if einsum_parts(module) is None and len(shape) == 2:
        return shape[0], shape[1]
    return None


_KERNEL_SHAPED = (nnx.Conv, nnx.ConvTranspose, nnx.Einsum)  # keep a `kernel_shape` attribute
_NORMS = (nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm)


def unstacked_shape(module: Any, name: str) -> tuple | None:
    """The shape param `name` of a known layer has outside any layer stack.

    Read from the layer's own attributes (`kernel_shape`, `in_features`,
    `num_features`, ...), which `nnx.vmap` leaves per layer: a param with
    more leading dims than this was stacked. None for unknown layers.
    """
    kernel = getattr(module, "kernel_shape", None)
    if name == "kernel" and isinstance(kernel, tuple) and isinstance(module, _KERNEL_SHAPED):
        return kernel
    if isinstance(module, nnx.Linear):
        shapes = {"kernel": (module.in_features, module.out_features)}
        return {**shapes, "bias": (module.out_features,)}.get(name)
    if isinstance(module, (nnx.Conv, nnx.ConvTranspose)) and name == "bias":
        return (module.out_features,)
    if isinstance(module, nnx.Embed) and name == "embedding":
        return (module.num_embeddings, module.features)
    if isinstance(module, nnx.GroupNorm) and name in ("scale", "bias"):
        return (module.num_groups * module.group_size,)
    if isinstance(module, _NORMS) and name in ("scale", "bias"):
        return (module.num_features,)
    return None


def known_output_rank(module: Any) -> bool:
    """True if the styles compute this layer's output rank statically."""
    return isinstance(module, _KNOWN_RANK)


def local_safe(module: Any) -> bool:
    """True if the layer computes correctly on its local parameter shards."""
    return isinstance(module, _LOCAL_SAFE)


def needs_whole_features(module: Any, explicit: bool) -> bool:
    """True for a features-last `nnx.BatchNorm` or `nnx.GroupNorm` on Explicit axes.

    Its running statistics are replicated `BatchStat`s. From a feature-sharded
    input (after a ColumnParallel conv) they come out sharded, and Explicit
    axes refuse to write those into the replicated variable. Resharding the
    features first (an all-gather where they were sharded, nothing where they
    were not) keeps the model running unmodified. Auto axes need nothing.
    A `GroupNorm` maps its group statistics back to channels with
    `jnp.repeat`, which Explicit axes refuse on sharded channels without an
    `out_sharding` the layer cannot pass: the same gather.
    """
    if isinstance(module, nnx.GroupNorm):  # its group stats go back through jnp.repeat
        return explicit and getattr(module, "feature_axis", -1) == -1
    return explicit and isinstance(module, nnx.BatchNorm) and getattr(module, "axis", -1) == -1


def explicit_layout(module: Any, explicit: bool) -> Layout | None:
    """The layout a layer needs on Explicit axes where no style gave one, or None.

    - a features-last `nnx.BatchNorm` takes its features whole
      (`needs_whole_features`);
    - an `nnx.Embed` whose table is replicated looks up batch-sharded ids:
      JAX cannot infer that gather's output sharding and asks for one, so
      the output keeps the ids' layout and the features whole (passed as
      `out_sharding=`, which `nnx.Embed` takes).
    """
    if needs_whole_features(module, explicit):
        return Layout(input=(None,))
    if explicit and isinstance(module, nnx.Embed):
        return Layout(output=(None,), rank_delta=1)
    return None
