"""Meshes and the one table that maps logical axes to mesh axes.

Every parameter carries `logical_axes` metadata (`vocab`, `embed`, `heads`, `kv_heads`, `mlp`,
`experts`, `layers`); activations and KV caches are constrained with logical names too (`batch`,
`seq`, `act_embed`, `act_heads`, `act_vocab`, `cache_batch`, `cache_seq`, `cache_heads`).
`ShardingRules` maps each name to mesh axes, so changing the parallelism is a config change:

    mesh:     {data: 1, fsdp: -1, expert: 1, tensor: 1}      # -1 takes the remaining devices
    sharding: {experts: [expert], embed: [fsdp], ...}

A mesh axis is only used where it divides the dimension; otherwise that dimension is replicated
over it (so 4 global KV heads stay whole on an 8-way tensor axis).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mimo_jax.config import MESH_AXES, MeshConfig, ShardingRules
from mimo_jax.fp8_resident import Fp8Weight

__all__ = ["MESH_AXES", "MeshConfig", "ShardingRules", "activate", "constrain", "logical_spec", "make_mesh",
           "shard_model", "spec_axes", "state_shardings", "take_rows"]


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, expert, tensor) over `devices`. By default: all devices, or,
    when every axis size is fixed (no -1) and they need fewer, the first that many."""
    if devices is None:
        devices = jax.devices()
        fixed = [getattr(mesh_cfg, a) for a in MESH_AXES]
        if -1 not in fixed and math.prod(fixed) < len(devices):
            devices = devices[: math.prod(fixed)]
    devices = list(devices)
    shape = mesh_cfg.shape(len(devices))
    if devices and getattr(devices[0], "platform", "") == "tpu":
        grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    else:
        grid = np.array(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_spec(logical_axes: Sequence[str | None], rules: ShardingRules, mesh: Mesh | None,
                 shape: Sequence[int] | None = None) -> PartitionSpec:
    """PartitionSpec for an array with these logical axes: each mesh axis is used at most once,
    only if it has more than one device, and only where it divides the dimension."""
    sizes = dict(mesh.shape) if mesh is not None else {}
    used: set[str] = set()
    entries = []
    for i, name in enumerate(logical_axes):
        axes = []
        if name is not None:
            if not hasattr(rules, name):
                raise ValueError(f"logical axis {name!r} has no sharding rule; rules: {[f.name for f in dataclasses.fields(rules)]}")
            dim = None if shape is None else shape[i]
            for axis in getattr(rules, name):
                size = sizes.get(axis, 1)
                if size == 1 or axis in used:
                    continue
                if dim is not None and dim % (math.prod(sizes[a] for a in axes) * size):
                    continue
                axes.append(axis)
        used.update(axes)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def spec_axes(spec: PartitionSpec, dim: int) -> tuple[str, ...]:
    """The mesh axes dimension `dim` of a PartitionSpec is split over (possibly none)."""
    entry = spec[dim] if dim < len(spec) else None
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state, mesh: Mesh, rules: ShardingRules):
    """NamedShardings for an nnx State (or abstract state) from each variable's `logical_axes`."""
    def sharding(var):
        axes = var.get_metadata().get("logical_axes")
        value = var.get_value()

        def named(shape):
            return NamedSharding(mesh, logical_spec((None,) * len(shape) if axes is None else axes, rules, mesh, shape))

        if isinstance(value, Fp8Weight):  # its block scales share the weight's axes
            return var.replace(dataclasses.replace(value, values=named(value.values.shape), scale=named(value.scale.shape)))
        return var.replace(named(value.shape))

    return jax.tree.map(sharding, state, is_leaf=_is_variable)


def shard_model(model: nnx.Module, mesh: Mesh, rules: ShardingRules) -> nnx.Module:
    """Moves the model's variables onto `mesh` as the rules say (in place; returns the model)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model


# --------------------------------------------------------------------------- activations

_ACTIVE: contextvars.ContextVar[tuple[Mesh, ShardingRules] | None] = contextvars.ContextVar("mimo_sharding", default=None)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: ShardingRules):
    """Model code traced inside this context constrains activations by `rules` on `mesh` and runs
    the Pallas kernels per device. Enter it inside the jitted function (or around its first call)."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> tuple[Mesh, ShardingRules] | None:
    return _ACTIVE.get()


def constrain(x, logical_axes: Sequence[str | None]):
    """with_sharding_constraint by logical names; a no-op outside `activate`."""
    ctx = _ACTIVE.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_spec(logical_axes, rules, mesh, x.shape)))


def optimizer_shardings(tx, opt_state, param_shardings, mesh: Mesh):
    """Shardings for an optax state: every params-shaped part (Adam's moments...) like the params,
    the rest (step counts) replicated."""
    return optax.tree_map_params(tx, lambda _, s: s, opt_state, param_shardings,
                                 transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()),
                                 is_leaf=lambda x: isinstance(x, NamedSharding))


def take_rows(table_VD, ids, dtype):
    """table[ids] ([*ids.shape, D]) in `dtype` for an embedding table: a vocabulary-parallel lookup
    where that pays, when `ids` outnumber the table's rows (a training batch) and the table splits
    over the `vocab` rule's axes (the ids then split over `batch` without those axes).

    Then each device gathers its vocabulary shard over `embed` (FSDP), looks up the ids that fall in
    it (zero elsewhere) for its own batch rows and sums over the vocabulary axes; the table's
    gradient is a scatter-add into that shard. Left to XLA, the lookup keeps the table's `embed`
    split and runs every token of the global batch on every device ([tokens, D / fsdp] per
    device), and the gradient of the table comes out whole. A decode step's few ids, or no mesh:
    a plain `jnp.take` (gathering the table would cost more than the lookup)."""
    ctx = _ACTIVE.get()
    table_spec = None if ctx is None else logical_spec(("vocab", None), ctx[1], ctx[0], table_VD.shape)
    if not table_spec or ids.size < table_VD.shape[0]:
        return jnp.take(table_VD, ids, axis=0).astype(dtype)
    mesh, rules = ctx
    vocab_axes = spec_axes(table_spec, 0)
    batch_rules = dataclasses.replace(rules, batch=tuple(a for a in rules.batch if a not in vocab_axes))
    ids_spec = logical_spec(("batch",) + (None,) * (ids.ndim - 1), batch_rules, mesh, ids.shape)
    table_VD = jax.lax.with_sharding_constraint(table_VD.astype(dtype), NamedSharding(mesh, table_spec))

    def lookup(shard_vD, ids_local):
        rows = shard_vD.shape[0]
        local = ids_local - jax.lax.axis_index(vocab_axes) * rows
        hit = (local >= 0) & (local < rows)
        found = jnp.take(shard_vD, jnp.where(hit, local, 0), axis=0)
        return jax.lax.psum(jnp.where(hit[..., None], found, 0), vocab_axes)

    out_spec = PartitionSpec(*(tuple(ids_spec) + (None,) * (ids.ndim + 1 - len(ids_spec))))
    return jax.shard_map(lookup, mesh=mesh, in_specs=(table_spec, ids_spec), out_specs=out_spec)(table_VD, ids)
