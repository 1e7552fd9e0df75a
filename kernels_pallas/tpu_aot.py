"""Ahead-of-time compilation for real TPU chips from a machine without one (needs libtpu).

XLA and Mosaic really lower the program for the named topology, so block shapes and layouts that
the Pallas interpreter forgives fail here, and `memory_analysis()` / `cost_analysis()` describe
the chip. Install libtpu with `pip install "jax[tpu]"` (the `test` extra does).
"""

from __future__ import annotations

import functools
import os
import re

import jax
import numpy as np
from jax.experimental import topologies
from jax.extend.core import jaxprs_in_params
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Topologies we compile for in tests and benchmarks: (name, chips per host bounds).
TOPOLOGIES = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2", "v4": "v4:2x2x1"}


@functools.lru_cache(maxsize=None)
def tpu_topology(name: str):
    """A TPU topology description, e.g. "v5e:2x2" or "v5p:4x4x4" (or a TOPOLOGIES key)."""
    # Several processes (pytest, benchmarks) may load libtpu at once; none of them drives a chip.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return topologies.get_topology_desc(
            platform="tpu", topology_name=TOPOLOGIES.get(name, name), chip_config_name="default",
            chips_per_host_bounds=(2, 2, 1), num_slices=1,
        )
    except Exception as e:  # noqa: BLE001 - libtpu reports a missing plugin in several ways
        raise RuntimeError(f"cannot describe TPU topology {name!r} (is libtpu installed? "
                           f"`pip install \"jax[tpu]\"`): {e}") from e


def single_chip(name: str) -> NamedSharding:
    """A replicated sharding on the first chip of the topology: single-device kernels compile there."""
    mesh = Mesh(np.array(tpu_topology(name).devices[:1]), ("chip",))
    return NamedSharding(mesh, PartitionSpec())


def compile_for_tpu(fn, *args, topology: str = "v5e"):
    """jit(fn) lowered and compiled for one chip of `topology`. `args` are pytrees of anything with
    .shape and .dtype (arrays, ShapeDtypeStructs); they are placed on that chip."""
    sharding = single_chip(topology)
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)
    return jax.jit(fn).lower(*specs).compile()


def pallas_kernel_names(compiled) -> set[str]:
    """Names of the Pallas kernels (Mosaic custom calls) in a compiled program."""
    return set(re.findall(r"(\w+)\)*/pallas_call", compiled.as_text()))


def _tile_padded_bytes(shape, dtype) -> int:
    """Bytes of a VMEM buffer: the last two dims are padded to whole (sublane, 128-lane) tiles."""
    itemsize = np.dtype(dtype).itemsize
    dims = [1, 1, *shape][-max(len(shape), 2):] if len(shape) < 2 else list(shape)
    sublanes = 8 * max(1, 4 // itemsize)
    dims[-1] = -(-dims[-1] // 128) * 128
    dims[-2] = -(-dims[-2] // sublanes) * sublanes
    return int(np.prod(dims)) * itemsize


def _pallas_calls(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn
        for sub in jaxprs_in_params(eqn.params):
            yield from _pallas_calls(sub)


def pallas_kernels(fn, *args) -> dict[str, dict[str, float]]:
    """Per Pallas kernel that `fn(*args)` runs: its own cost estimate (flops, HBM bytes; summed over
    calls) and its VMEM (every pipelined block twice for double buffering, plus scratch, padded to
    TPU tiles; the maximum over calls). Mosaic adds a little VMEM of its own."""
    closed = jax.make_jaxpr(fn)(*args)
    kernels: dict[str, dict[str, float]] = {}
    for eqn in _pallas_calls(closed.jaxpr):
        grid_mapping, body = eqn.params["grid_mapping"], eqn.params["jaxpr"]
        blocks = sum(_tile_padded_bytes(b.block_aval.shape, b.block_aval.dtype) for b in grid_mapping.block_mappings)
        scratch_avals = [v.aval for v in body.invars[len(body.invars) - grid_mapping.num_scratch_operands:]]
        vmem = 2 * blocks + sum(_tile_padded_bytes(a.shape, a.dtype) for a in scratch_avals)
        cost = eqn.params["cost_estimate"]
        entry = kernels.setdefault(eqn.params["name"], dict(flops=0.0, bytes=0.0, vmem=0))
        entry["flops"] += cost.flops if cost else float("nan")
        entry["bytes"] += cost.bytes_accessed if cost else float("nan")
        entry["vmem"] = max(entry["vmem"], vmem)
    return kernels
