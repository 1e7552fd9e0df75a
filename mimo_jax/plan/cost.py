"""The plan's cost model: every layer's flops and HBM traffic as XLA counts them, and the ICI
collectives the partitioner put in the program, priced by their sizes and the slice's links.

XLA's `cost_analysis` counts a while loop's body once, and the layer stack is a few scans, so the
full program's figures miss most of the model. The cost model compiles small *probes* of the same
step with the layer scans unrolled (`model.unroll_layers`), where XLA sees every layer:

- The layer plan (`mimo_jax.layer_plan`) finds the stack's periodic block, repeated r times (the
  release: 7 x [global, swa x 5]). Probe A keeps one repeat, probe B two, everything else as it is
  (embedding, first layers, last layers, MTP heads, loss, optimizer). Every layer contributes the
  same whatever its neighbours, so the full step costs A + (r - 1) x (B - A). A stack whose probes
  would have as many layers as itself is compiled whole, unrolled.
- The probes run one micro-batch (`train.grad_accum_steps=1`) and are scaled by the number of
  micro-batches; the optimizer update, once per step, is then counted that many times (it is well
  under 1% of a step's flops).
- The loss's vocabulary scan runs as one chunk of the whole vocabulary (same flops, one iteration).

Collectives are read from the probes' optimised HLO: all-gather, reduce-scatter, all-reduce,
all-to-all (ragged too) and collective-permute, each with its replica groups, hence its mesh axes.
Bytes on the wire per device follow ring algorithms: all-gather out x (n-1)/n, reduce-scatter
out x (n-1), all-reduce 2 x size x (n-1)/n, all-to-all size x (n-1)/n (for the ragged one its
output buffer, an upper bound), collective-permute its size. A collective along one mesh axis is
sent over two of the chip's ICI links (to both ring neighbours), each at half its bidirectional
bandwidth, the published per-chip figure divided by the number of links: 200 GB/s on a v5p.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import numpy as np

from mimo_jax.layer_plan import plan_layers
from mimo_jax.plan.topology import Topology

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8,
               "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1,
               "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>.*?)\s(?P<op>" + "|".join(COLLECTIVES)
                 + r")(?P<start>-start)?\((?P<rest>.*)$")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_LIST_GROUPS = re.compile(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)?\}")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    axes: tuple[str, ...]  # the mesh axes its groups span
    group_size: int
    wire_bytes: float  # sent per device


@dataclasses.dataclass
class CostEstimate:
    """Per-device figures for one whole step, extrapolated from the probes."""

    flops: float
    hbm_bytes: float
    collectives: dict[tuple[str, tuple[str, ...]], float]  # (kind, axes) -> wire bytes per device
    compute_seconds: float
    hbm_seconds: float
    ici_seconds: float
    probes: list[tuple[int, float, float]]  # (layers, weight, compile seconds)
    micro_batches: int = 1
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def overlapped_seconds(self) -> float:
        """Compute, HBM and ICI all overlapped: a lower bound on the step."""
        return max(self.compute_seconds, self.hbm_seconds, self.ici_seconds)

    @property
    def serial_seconds(self) -> float:
        """No collective hidden behind compute: an upper bound."""
        return max(self.compute_seconds, self.hbm_seconds) + self.ici_seconds


def xla_cost(compiled) -> dict:
    """`compiled.cost_analysis()` as one dict (older jax returned one dict per program)."""
    cost = compiled.cost_analysis() or {}
    return cost[0] if isinstance(cost, list) else cost


def probe_layer_kinds(kinds: tuple) -> list[tuple[tuple, float]]:
    """[(layer kinds of a probe, its weight)]: the full stack costs sum(weight x probe)."""
    segments = plan_layers(kinds)
    periodic = [s for s in segments if s.repeats >= 3]
    if not periodic:
        return [(kinds, 1.0)]
    seg = periodic[0]
    end = seg.start + seg.repeats * seg.period
    prefix, block, suffix = kinds[:seg.start], kinds[seg.start:seg.start + seg.period], kinds[end:]
    one, two = prefix + block + suffix, prefix + block * 2 + suffix
    if len(one) + len(two) >= len(kinds):  # the probes would compile more layers than the stack has
        return [(kinds, 1.0)]
    return [(one, 2.0 - seg.repeats), (two, seg.repeats - 1.0)]


def probe_config(cfg, kinds: tuple):
    """`cfg` with the layer stack `kinds`, unrolled, one micro-batch and a one-chunk vocabulary loss."""
    model = dataclasses.replace(cfg.model, num_layers=len(kinds), layer_types=tuple(k[0] for k in kinds),
                                mlp_types=tuple(k[1] for k in kinds), unroll_layers=True)
    chunk = cfg.model.vocab_size if cfg.train.loss_vocab_chunk else 0
    train = dataclasses.replace(cfg.train, grad_accum_steps=1, loss_vocab_chunk=chunk)
    return dataclasses.replace(cfg, model=model, train=train)


def _group_axes(ids: list[int], mesh_shape: dict[str, int]) -> tuple[str, ...]:
    names, dims = list(mesh_shape), tuple(mesh_shape.values())
    if not ids or max(ids) >= math.prod(dims):
        return ("?",)
    coords = np.array(np.unravel_index(np.asarray(ids), dims))
    return tuple(n for n, row in zip(names, coords) if len(set(row.tolist())) > 1)


def _first_group(rest: str, devices: int) -> list[int] | None:
    m = _IOTA_GROUPS.search(rest)
    if m:
        groups, size = int(m.group(1)), int(m.group(2))
        dims = [int(d) for d in m.group(3).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(4):
            ids = ids.transpose([int(p) for p in m.group(4).split(",")])
        return ids.reshape(groups, size)[0].tolist()
    m = _LIST_GROUPS.search(rest)
    if m:
        if not m.group(1):  # {}: one group of every device
            return list(range(devices))
        first = m.group(1).split("}")[0].strip("{,")
        return [int(i) for i in first.split(",") if i]
    return None


def parse_collectives(hlo_text: str, mesh_shape: dict[str, int]) -> list[Collective]:
    """The collectives in an optimised HLO module's text, with their bytes on the wire per device."""
    devices = math.prod(mesh_shape.values())
    found = []
    for line in hlo_text.splitlines():
        m = _OP.match(line)
        if not m:
            continue
        kind, rest = m.group("op"), m.group("rest")
        arrays = [DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x)
                  for d, dims in _ARRAY.findall(m.group("type"))]
        size = float(sum(arrays))
        if kind == "collective-permute":
            listed = _PAIRS.search(rest)
            pairs = re.findall(r"\{(\d+),(\d+)\}", listed.group(1)) if listed else []
            moving = sum(1 for s, t in pairs if s != t)
            if m.group("start"):  # (operand, output, context scalars)
                size = max(arrays)
            if moving:
                src = [int(s) for s, t in pairs if s != t]
                found.append(Collective(kind, _group_axes(src, mesh_shape), 2, size * moving / len(pairs)))
            continue
        group = _first_group(rest, devices) or list(range(devices))
        n = len(group)
        if n <= 1:
            continue
        if m.group("start") and kind == "all-gather":  # (operands, outputs); out = n x in
            size = size * n / (n + 1)
        wire = {"all-gather": size * (n - 1) / n, "reduce-scatter": size * (n - 1),
                "all-reduce": 2 * size * (n - 1) / n}.get(kind, size * (n - 1) / n)
        found.append(Collective(kind, _group_axes(group, mesh_shape), n, wire))
    return found


def ici_seconds(collectives: dict, topology: Topology, device_share: float) -> float:
    chip = topology.chip
    ring = chip.ici_gbps / chip.ici_links * 1e9  # two links, one direction each: bytes/s along one axis
    return sum(collectives.values()) / (ring * device_share)


def estimate_cost(cfg, topology: Topology, mesh, mode: str, batch: int, seq_len: int, query_len: int,
                  num_draft: int, build_step, device_share: float, progress=None) -> CostEstimate:
    """Compiles the probes of `cfg`'s step on `mesh` and extrapolates the whole step's cost.

    `build_step(cfg, mesh, mode, batch, seq_len, query_len, num_draft)` returns (jitted step,
    abstract arguments, ...), as `mimo_jax.plan.compiling.build_step`."""
    micro = cfg.train.grad_accum_steps if mode == "train" else 1
    kinds = tuple(zip(cfg.model.layer_types, cfg.model.mlp_types))
    flops = hbm = 0.0
    collectives: dict[tuple[str, tuple[str, ...]], float] = {}
    probes, notes = [], []
    for probe_kinds, weight in probe_layer_kinds(kinds):
        if progress:
            progress(f"cost model: compiling a probe of {len(probe_kinds)} unrolled layers")
        t0 = time.perf_counter()
        step, args, *_ = build_step(probe_config(cfg, probe_kinds), mesh, mode, batch // micro, seq_len, query_len,
                                    num_draft)
        compiled = step.trace(*args).lower().compile()
        probes.append((len(probe_kinds), weight, time.perf_counter() - t0))
        cost = xla_cost(compiled)
        scale = weight * micro
        flops += scale * float(cost.get("flops", 0.0))
        hbm += scale * float(cost.get("bytes accessed", 0.0))
        text = compiled.as_text()
        loops = [int(n) for n in re.findall(r'"known_trip_count":\{"n":"(\d+)"\}', text) if int(n) > 1]
        if loops:
            notes.append(f"probe of {len(probe_kinds)} layers keeps {len(loops)} loop(s) (trip counts "
                         f"{sorted(set(loops))[:4]}) whose bodies XLA counts once")
        for c in parse_collectives(text, dict(mesh.shape)):
            key = (c.kind, c.axes)
            collectives[key] = collectives.get(key, 0.0) + scale * c.wire_bytes
    chip = topology.chip
    return CostEstimate(
        flops=flops, hbm_bytes=hbm, collectives=collectives,
        compute_seconds=flops / (chip.peak_tflops * 1e12 * device_share),
        hbm_seconds=hbm / (chip.hbm_gbps * 1e9 * device_share),
        ici_seconds=ici_seconds(collectives, topology, device_share),
        probes=probes, micro_batches=micro, notes=notes)
