"""nnx_parallel.core.layouts: the call-time hooks a resolved plan attaches to a module."""

from flax import nnx

import nnx_parallel as npx
from nnx_parallel.core.layouts import (
    ContextAttention,
    Experts,
    Gather,
    Layout,
    ModuleHooks,
    Recompute,
    base_class,
    get_hooks,
)
from tests import models

GATHER = Gather(axes=("fsdp",), batch_axes=("fsdp",), params=(("kernel", 1),))


def test_merge_takes_the_other_side_where_set_and_keeps_methods_in_order():
    a = ModuleHooks(layout=Layout(input=(None,)), methods=("__call__",))
    b = ModuleHooks(gather=GATHER, methods=("attend", "__call__"), guard=True)
    m = a.merge(b)
    assert m.layout == a.layout and m.gather == GATHER and m.guard
    assert m.methods == ("__call__", "attend")
    assert a.merge(None) is a


def test_kind_names_the_hooked_class_prefix():
    assert ModuleHooks(gather=GATHER).kind == "FSDP"
    assert ModuleHooks(guard=True).kind == "Guarded" and ModuleHooks(guard=True).guard_only
    assert ModuleHooks(remat=Recompute()).kind == "Remat"
    assert ModuleHooks(layout=Layout(), remat=Recompute()).kind == "Parallel"
    assert ModuleHooks(context=ContextAttention("context")).kind == "Context"
    experts = Experts("expert", 8, (("w", 3),), ("data",))
    assert ModuleHooks(experts=experts, gather=GATHER).kind == "Expert"
    assert not ModuleHooks(guard=True, remat=Recompute()).guard_only


def test_get_hooks_and_base_class_read_an_installed_module(mesh8):
    mlp = models.MLP(rngs=nnx.Rngs(0))
    assert get_hooks(mlp.up) is None and base_class(mlp.up) is nnx.Linear
    npx.parallelize(mlp, mesh8, {"up": npx.ColumnParallel(), "down": npx.RowParallel()})
    hooks = get_hooks(mlp.up)
    assert hooks is not None and hooks.layout is not None and hooks.mesh is mesh8
    assert base_class(mlp.up) is nnx.Linear and type(mlp.up) is not nnx.Linear


def test_layout_axes_lists_each_named_axis_once_in_order():
    layout = Layout(input=(None, "model"), output=(("data", "model"), None), reduce=("fsdp",))
    assert layout.axes == ("model", "data", "fsdp")
    assert Layout().axes == ()
