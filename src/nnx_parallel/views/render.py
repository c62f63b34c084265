"""`render` / `treescope_renderer`: treescope rendering (notebook or standalone HTML)
with each parameter's layout on its line and its array's device layout a click away.

Rendering goes through treescope's public renderer API
(`TreescopeRenderer.extended_with`, `active_renderer`)."""

from __future__ import annotations

from typing import Any

import treescope
from flax import nnx
from treescope import rendering_parts

from nnx_parallel import _compat
from nnx_parallel.views import _text
from nnx_parallel.views.summary import (
    _entry_from_variable,
    _is_replicated,
    _source_text,
    _total_bytes,
)


def _layout_comment(var: nnx.Variable) -> str | None:
    """`P(None, 'model') · shard (16, 8) · 512 B/device of 4,096 B · from 'up'`."""
    entry, mesh = _entry_from_variable("", "", "", var, None)
    if mesh is None:
        return None
    total = _total_bytes(entry)
    per_device = entry.bytes_per_device(mesh)
    where = "replicated" if _is_replicated(entry) else _text.format_spec(entry.spec)
    source = f"from {entry.source!r}" if entry.source is not None else _source_text(entry)
    return (
        f"{where} · shard {entry.shard_shape(mesh)} · {per_device:,} B/device of {total:,} B"
        f" · {source}"
    )


def _param_layout_hook(node: Any, path: str | None, node_renderer: Any) -> Any:
    """Treescope wrapper hook: Flax's own rendering plus a layout comment."""
    if not isinstance(node, nnx.Variable):
        return NotImplemented
    comment = _layout_comment(node)
    if comment is None:
        return NotImplemented
    rendered = node_renderer(node, path)
    note = rendering_parts.comment_color(rendering_parts.text(f"  # {comment}"))
    return rendering_parts.siblings_with_annotations(rendered, extra_annotations=[note])


def treescope_renderer(base: Any = None) -> Any:
    """A treescope renderer that annotates every sharded Variable with its layout.

    Each Variable with a mesh (from `parallelize` metadata or its array's
    sharding) gets an end-of-line comment: spec (or "replicated"), shard shape,
    bytes per device, and the pattern that set it. Use it with treescope's own
    API, e.g. in a notebook::

        treescope.active_renderer.set_globally(npx.treescope_renderer())
        treescope.active_autovisualizer.set_globally(treescope.ArrayAutovisualizer())

    Args:
      base: The renderer to extend; default `treescope.active_renderer.get()`.

    Returns:
      A new `treescope.renderers.TreescopeRenderer`.

    Example:
      >>> mlp = parallelize(TinyMLP(rngs=nnx.Rngs(0)), mesh8, {"up": ColumnParallel()})
      >>> import treescope
      >>> with treescope.active_renderer.set_scoped(treescope_renderer()):
      ...     text = treescope.render_to_text(mlp)
      >>> "P(None, 'model') · shard (16, 8) · 512 B/device of 4,096 B · from 'up'" in text
      True
    """
    base = treescope.active_renderer.get() if base is None else base
    return base.extended_with(wrapper_hooks=[_param_layout_hook])


def render(model: Any, *, arrays: bool = True, compressed: bool = True) -> str:
    """Standalone HTML for a model, with every parameter's layout visible.

    Uses `treescope_renderer()`; with `arrays=True` treescope's
    `ArrayAutovisualizer` draws each array and, one click away, which device
    holds which block of it ("Sharded across 8 CPU devices"). Drawing needs
    the values, so where some array spans other processes (`jax.distributed`)
    arrays are not drawn: the layouts still show, on every process.

    Args:
      model: Any value treescope can render, typically a parallelized module.
      arrays: Visualize arrays and their device layout (single-process, or
        arrays this process holds whole).
      compressed: Compress the HTML (treescope's default); False keeps it
        greppable.

    Returns:
      HTML text; write it to a file or show it with `IPython.display.HTML`.

    Example:
      >>> mlp = parallelize(TinyMLP(rngs=nnx.Rngs(0)), mesh8, {"up": ColumnParallel()})
      >>> html = render(mlp, compressed=False)
      >>> "512 B/device" in html and "Sharded across 8" in html
      True
    """
    visualizer = (
        treescope.ArrayAutovisualizer() if arrays and _compat.fully_addressable(model) else None
    )
    with treescope.active_renderer.set_scoped(treescope_renderer()):
        with treescope.active_autovisualizer.set_scoped(visualizer):
            return treescope.render_to_html(model, compressed=compressed)
