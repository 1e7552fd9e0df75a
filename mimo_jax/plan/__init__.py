"""Pod planning: compile a training, prefill or decode step for a TPU slice ahead of time, on CPU
(`python -m mimo_jax.plan`; the usage is `mimo_jax.plan.cli`'s docstring, and docs/scaling.md).

Modules: `topology` (chips, slices), `compiling` (one step, its figures), `cost` (the cost model), `report`,
`search`, `cli`.
"""

from mimo_jax.flops import hand_flops_per_token, jaxpr_flops  # noqa: F401 - re-exported: they lived here
from mimo_jax.plan.cli import DEFAULT_OVERRIDES, main
from mimo_jax.plan.compiling import (
    DEFAULT_PREFILL_CHUNK,
    SEQ_SHARDED_CACHE,
    PlanResult,
    abstract_cache,
    abstract_state,
    batch_shards,
    build_mesh,
    build_step,
    bytes_per_device,
    cache_shardings,
    compile_plan,
    compile_training_run,
    device_share,
    step_query_len,
)
from mimo_jax.plan.report import mfu, report
from mimo_jax.plan.search import (
    SEARCH_HEADER,
    candidate_meshes,
    compile_plan_stub,
    dropless_dispatch_bytes,
    loss_logits_bytes,
    search,
    search_row,
)
from mimo_jax.plan.topology import (
    ALIASES,
    CHIPS,
    GIB,
    SHAPES_2D,
    SHAPES_3D,
    ChipSpec,
    PlanError,
    Topology,
    known_topologies,
    parse_topology,
    topology_devices,
)

__all__ = ['ALIASES', 'CHIPS', 'ChipSpec', 'DEFAULT_OVERRIDES', 'DEFAULT_PREFILL_CHUNK', 'GIB', 'PlanError', 'PlanResult', 'SEARCH_HEADER', 'SEQ_SHARDED_CACHE', 'SHAPES_2D', 'SHAPES_3D', 'Topology', 'abstract_cache', 'abstract_state', 'batch_shards', 'build_mesh', 'build_step', 'bytes_per_device', 'cache_shardings', 'candidate_meshes', 'compile_plan', 'compile_training_run', 'compile_plan_stub', 'device_share', 'dropless_dispatch_bytes', 'hand_flops_per_token', 'jaxpr_flops', 'known_topologies', 'loss_logits_bytes', 'main', 'mfu', 'parse_topology', 'report', 'search', 'search_row', 'step_query_len', 'topology_devices']
