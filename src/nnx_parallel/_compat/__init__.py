"""Every version-sensitive JAX / Flax access, in one place.

Flax renamed the sharding metadata key across releases (`sharding`,
`sharding_names`, `out_sharding`) and deprecated `Variable.value`; JAX moved
`shard_map`, added `AxisType` and `reshard`. Nothing else in the package
touches these APIs directly, so a new release means editing this package only.

Three modules: `variables` (Flax), `mesh` and `tracing` (JAX).
"""

from nnx_parallel._compat.mesh import (  # noqa: F401
    _rebuild_mesh,
    _reduce_mesh,
    abstract_mesh,
    auto_axes,
    axis_type,
    constrain,
    current_mesh_is_empty,
    is_explicit,
    is_sharding_type_error,
    make_mesh,
    manual_axes,
    merge_leading,
    no_mesh,
    pcast_varying,
    register_mesh_pickling,
    reshard,
    shard_map,
    spec_of,
    varying_axes,
    with_sharding_constraint,
)
from nnx_parallel._compat.tracing import (  # noqa: F401
    _CHECKPOINT_POLICIES,
    CHECKPOINT_POLICY_FACTORIES,
    axis_size,
    backends_initialized,
    bind_eqn,
    checkpoint_policies,
    device_put,
    distributed_initialize,
    distributed_is_initialized,
    fully_addressable,
    graph_children,
    host_copy,
    is_symbolic,
    is_tracer,
    jaxpr_literal,
    process_allgather,
    set_cpu_device_count,
    symbolic_dim,
    trace_state,
    tracing,
    vjp_without,
)
from nnx_parallel._compat.variables import (  # noqa: F401
    _SHARDING_KEYS,
    SHARDING_KEY,
    SOURCE_KEY,
    UNCONSTRAINED,
    get_declared_spec,
    get_metadata,
    get_value,
    restore_metadata,
    set_sharding_metadata,
    set_value,
)
