"""Pod planning: compile a training step or a prefill ahead of time for a TPU slice, from a CPU box.

    python -m mimo_jax.plan --config configs/mimo_v2_flash.yaml --topology v5p-256 \\
        [--seq-len 32768] [--global-batch N] [--mode train|prefill] [--search] [key=value ...]

The program is lowered for the slice's devices (libtpu describes them; nothing runs) with the
Pallas kernels compiled by Mosaic (`model.kernel_mode=mosaic`, `attention_impl=pallas`,
`moe_impl=pallas` unless overridden), and the plan reports, per chip: parameter and optimizer bytes
(from the shardings), XLA's temporaries, whether it all fits HBM, flops per step, XLA's time
estimate (or a roofline estimate when XLA gives none), MFU, and the hand-derived model flops per
token beside XLA's count.

Topologies: slice names as Cloud TPU spells them (`v5p-256` counts TensorCores, 2 per v5p / v4
chip, so 128 chips; `v5e-256` and `v6e-256` count chips) or raw `v5p:4x4x8` / `v5e:8x16` names.

`--search` tries meshes, remat policies and MoE capacity factors (cheapest expected first) and
stops at the first plan that fits, compiling at most `--max-compiles` programs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import time
from collections.abc import Sequence

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

GIB = 2**30

# --------------------------------------------------------------------------- chips and topologies


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Published per-chip figures (bf16 dense peak, HBM capacity and bandwidth)."""

    generation: str
    hbm_gib: float
    peak_tflops: float
    hbm_gbps: float  # GB/s, for the roofline estimate when XLA gives no time
    cores_in_slice_name: int  # "v5p-256" counts TensorCores: 2 per chip
    torus_dims: int  # 3 for v4/v5p (3D torus), 2 for v5e/v6e
    max_chips: int  # the largest single slice


CHIPS = {
    "v4": ChipSpec("v4", 32, 275, 1200, 2, 3, 4096),
    "v5p": ChipSpec("v5p", 95, 459, 2765, 2, 3, 8960),
    "v5e": ChipSpec("v5e", 16, 197, 819, 1, 2, 256),
    "v6e": ChipSpec("v6e", 32, 918, 1640, 1, 2, 256),
}
ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e", "v5lite": "v5e"}

# Slice shapes by chip count. libtpu describes hosts of 2x2x1 chips, so 4 chips is the smallest.
SHAPES_2D = {4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
             256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}


class PlanError(ValueError):
    """A request the planner cannot satisfy (unknown topology, mesh that does not match, ...)."""


@dataclasses.dataclass(frozen=True)
class Topology:
    chip: ChipSpec
    shape: tuple[int, ...]
    requested: str

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def name(self) -> str:
        """The name libtpu's topology description takes, e.g. "v5p:4x4x8"."""
        return f"{self.chip.generation}:{'x'.join(map(str, self.shape))}"


def known_topologies() -> list[str]:
    names = []
    for gen, chip in CHIPS.items():
        shapes = SHAPES_3D if chip.torus_dims == 3 else SHAPES_2D
        names += [f"{gen}-{n * chip.cores_in_slice_name}" for n in shapes if n <= chip.max_chips]
    return names


def parse_topology(name: str) -> Topology:
    """`v5p-256` (128 chips, 4x4x8), `v5e-64` (8x8), or a raw `v5p:4x4x8` name."""
    text = name.strip().lower()
    known = "known slices: " + ", ".join(known_topologies()) + "; or raw names like v5p:4x4x8, v5e:8x16"
    m = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+)|:(\d+(?:x\d+)+))", text)
    if not m:
        raise PlanError(f"topology {name!r} is not of the form <generation>-<size> or <generation>:<AxB[xC]>; {known}")
    gen = ALIASES.get(m.group(1), m.group(1))
    if gen not in CHIPS:
        raise PlanError(f"unknown TPU generation {m.group(1)!r} in {name!r} (known: {', '.join(CHIPS)}); {known}")
    chip = CHIPS[gen]
    shapes = SHAPES_3D if chip.torus_dims == 3 else SHAPES_2D
    if m.group(2) is not None:
        count = int(m.group(2))
        unit = "TensorCores (2 per chip)" if chip.cores_in_slice_name == 2 else "chips"
        chips, rem = divmod(count, chip.cores_in_slice_name)
        if rem or chips not in shapes or chips > chip.max_chips:
            valid = ", ".join(f"{gen}-{n * chip.cores_in_slice_name}" for n in shapes if n <= chip.max_chips)
            raise PlanError(f"{name!r}: {gen} slice sizes count {unit}; no slice of {count} (valid: {valid})")
        return Topology(chip, shapes[chips], name)
    shape = tuple(int(d) for d in m.group(3).split("x"))
    if len(shape) != chip.torus_dims or 0 in shape:
        example = "x".join(map(str, shapes[64 if chip.torus_dims == 3 else 16]))
        raise PlanError(f"{name!r}: {gen} topologies have {chip.torus_dims} dimensions, e.g. {gen}:{example}")
    if shape[0] % 2 or shape[1] % 2:
        raise PlanError(f"{name!r}: hosts hold 2x2 chips, so the first two dimensions must be even")
    return Topology(chip, shape, name)


def topology_devices(topology: Topology):
    from kernels_pallas.tpu_aot import tpu_topology

    return list(tpu_topology(topology.name).devices)


# --------------------------------------------------------------------------- model flops by hand


def hand_flops_per_token(cfg, seq_len: int, mode: str) -> dict[str, float]:
    """Model flops per token: 6 x params a token touches (2 x for a forward) plus attention.

    Attention per layer and token, forward: 2*H*(d_qk + d_v)*context (QK^T and PV). The context is
    the sequence length for global layers (PaLM's convention: no causal discount, so 12*L*H*Q*T when
    d_qk = d_v = Q) and the window for SWA layers. "causal" gives the work a causal kernel does:
    (T+1)/2 keys on average for global layers. In training the MTP heads (an SWA block each, plus
    the shared lm_head) are counted too; a prefill needs logits at the last position only.
    """
    from mimo_jax.params import count_params

    counts = count_params(cfg)
    lm_head = cfg.hidden_size * cfg.vocab_size
    h, dqk, dv, t = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim, seq_len
    swa_context = min(t, cfg.sliding_window + 1)  # the window plus the query itself
    per_context = 2 * h * (dqk + dv)  # forward flops per (query, key) pair, all heads
    global_layers = sum(1 for lt in cfg.layer_types if lt == "global")
    swa_layers = cfg.num_layers - global_layers
    palm_context = global_layers * t + swa_layers * swa_context
    causal_context = global_layers * (t + 1) / 2 + swa_layers * swa_context
    if mode == "train":
        mtp_heads = cfg.num_mtp_heads
        weights = counts["active"] + counts["mtp"] + mtp_heads * lm_head
        palm_context += mtp_heads * swa_context
        causal_context += mtp_heads * swa_context
        factor = 3  # forward + backward (2x forward)
    else:
        weights = counts["active"] - lm_head
        factor = 1
    return {
        "weights": float(weights),
        "weight_flops": factor * 2.0 * weights,
        "attention_flops": factor * per_context * palm_context,
        "attention_flops_causal": factor * per_context * causal_context,
        "total": factor * (2.0 * weights + per_context * palm_context),
        "total_causal": factor * (2.0 * weights + per_context * causal_context),
        "active_params": float(counts["active"]),
        "mtp_params": float(counts["mtp"]),
    }


# --------------------------------------------------------------------------- compiling


@dataclasses.dataclass
class PlanResult:
    mode: str
    topology: str
    chips: int
    devices: int
    mesh: dict[str, int]
    remat: str
    capacity_factor: float
    global_batch: int
    seq_len: int
    compile_s: float = float("nan")
    fits: bool = False
    error: str | None = None
    params_bytes: int = 0  # per device, from the shardings
    opt_bytes: int = 0
    rest_bytes: int = 0
    argument_bytes: int = 0  # memory_analysis, per device
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    hbm_bytes: float = 0.0
    flops_per_device: float = float("nan")
    bytes_accessed_per_device: float = float("nan")
    xla_seconds: float | None = None
    roofline_seconds: float = float("nan")
    traced_flops: dict[str, float] = dataclasses.field(default_factory=dict)  # global, loops counted
    hand: dict[str, float] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def peak_bytes(self) -> int:
        """Live HBM at the peak: arguments + non-aliased outputs + temporaries + code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def loop_factor(self) -> float:
        """How much XLA's per-device count undercounts: it sees each scanned layer body once."""
        traced = self.traced_flops.get("total", 0.0) / self.devices
        if not traced or not self.flops_per_device > 0:
            return 1.0
        return max(1.0, traced / self.flops_per_device)

    @property
    def step_seconds(self) -> float:
        """XLA's estimate scaled by the loop factor, or the roofline where XLA gives none."""
        if self.xla_seconds and self.xla_seconds > 0:
            return self.xla_seconds * self.loop_factor
        return self.roofline_seconds

    @property
    def time_source(self) -> str:
        if self.xla_seconds and self.xla_seconds > 0:
            return "XLA optimal_seconds x loop factor"
        return "roofline, XLA gave no usable estimate"


def jaxpr_flops(jaxpr) -> dict[str, float]:
    """Global matmul and Pallas-kernel flops of a traced program, loop trip counts included.

    XLA's cost_analysis counts a while loop's body once, so for the scanned layer stack it sees one
    layer per scan; this walk multiplies scan bodies by their length. Inside shard_map the shapes
    are per device, so the body counts once per device of its mesh. Elementwise work is left out
    (it is a few percent of a transformer's flops); a Pallas kernel counts by its own cost estimate.
    """
    from jax.extend.core import jaxprs_in_params

    totals = {"matmul": 0.0, "pallas": 0.0}

    def walk(jaxpr, times):
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                (contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                k = math.prod(lhs[d] for d in contract)
                totals["matmul"] += times * 2.0 * math.prod(eqn.outvars[0].aval.shape) * k
            elif name == "pallas_call":
                cost = eqn.params.get("cost_estimate")
                totals["pallas"] += times * (cost.flops if cost is not None else 0.0)
            elif name == "scan":
                walk(eqn.params["jaxpr"].jaxpr, times * eqn.params["length"])
            elif name == "cond":  # the costliest branch
                branch_totals = []
                for branch in eqn.params["branches"]:
                    before = dict(totals)
                    walk(branch.jaxpr, times)
                    branch_totals.append({k: totals[k] - before[k] for k in totals})
                    totals.update(before)
                best = max(branch_totals, key=lambda t: sum(t.values()))
                for k in totals:
                    totals[k] += best[k]
            elif name == "shard_map":
                walk(eqn.params["jaxpr"], times * eqn.params["mesh"].size)
            else:
                for sub in jaxprs_in_params(eqn.params):
                    walk(sub, times)

    walk(getattr(jaxpr, "jaxpr", jaxpr), 1)
    totals["total"] = totals["matmul"] + totals["pallas"]
    return totals


def _bytes_per_device(abstract_tree, sharding_tree) -> int:
    import jax
    import numpy as np

    total = 0
    for value, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(sharding_tree)):
        total += math.prod(sharding.shard_shape(value.shape)) * np.dtype(value.dtype).itemsize
    return total


def _with_shardings(abstract_tree, sharding_tree):
    import jax

    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, sharding_tree)


def make_optimizer():
    """AdamW as a training run would use it; the moments take the parameters' dtype."""
    import optax

    return optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.1)


def build_mesh(cfg, topology: Topology):
    from mimo_jax.config import ConfigError
    from mimo_jax.sharding import make_mesh

    devices = topology_devices(topology)
    try:
        return make_mesh(cfg.mesh, devices)
    except ConfigError as e:
        raise PlanError(f"mesh {dataclasses.asdict(cfg.mesh)} on {topology.name} ({len(devices)} devices): {e}") from None


def batch_shards(mesh, rules) -> int:
    return math.prod(mesh.shape[a] for a in rules.batch)


def compile_plan(cfg, topology: Topology, mode: str, seq_len: int, global_batch: int | None) -> PlanResult:
    """Lowers and compiles the step for the topology and reads the compiler's figures."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from mimo_jax import sharding
    from mimo_jax.train_step import abstract_model_state, sharded_train_step

    model_cfg = cfg.model
    mesh = build_mesh(cfg, topology)
    rules = cfg.sharding
    devices = mesh.devices.size
    shards = batch_shards(mesh, rules)
    batch = global_batch or shards
    result = PlanResult(mode=mode, topology=topology.name, chips=topology.chips, devices=devices,
                        mesh=dict(mesh.shape), remat=model_cfg.remat, capacity_factor=model_cfg.moe_capacity_factor,
                        global_batch=batch, seq_len=seq_len, hand=hand_flops_per_token(model_cfg, seq_len, mode))
    if batch % shards:
        result.notes.append(f"global batch {batch} does not divide over the {shards} batch shards "
                            f"({'x'.join(rules.batch)}): the batch is replicated, every device computes it all")
    if "expert" in mesh.shape and model_cfg.num_experts % mesh.shape["expert"]:
        raise PlanError(f"expert axis {mesh.shape['expert']} does not divide {model_cfg.num_experts} experts")

    graphdef, params, rest = abstract_model_state(model_cfg)
    batch_shape = (batch, seq_len)
    ids = jax.ShapeDtypeStruct(batch_shape, jnp.int32)
    if mode == "train":
        tx = make_optimizer()
        step, shardings = sharded_train_step(graphdef, params, rest, tx, mesh, rules, batch_shape)
        opt_state = jax.eval_shape(tx.init, params)
        ids = jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=shardings["batch"])
        args = (_with_shardings(params, shardings["params"]), _with_shardings(opt_state, shardings["opt_state"]),
                _with_shardings(rest, shardings["rest"]), ids, ids)
        result.opt_bytes = _bytes_per_device(opt_state, shardings["opt_state"])
    else:
        step, shardings = _sharded_prefill(graphdef, params, rest, mesh, rules, batch_shape)
        ids = jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=shardings["batch"])
        args = (_with_shardings(params, shardings["params"]), _with_shardings(rest, shardings["rest"]), ids)
        result.notes.append("decode steps are not planned: the model has no KV cache yet")
    result.params_bytes = _bytes_per_device(params, shardings["params"])
    result.rest_bytes = _bytes_per_device(rest, shardings["rest"])
    del NamedSharding, sharding

    t0 = time.perf_counter()
    traced = step.trace(*args)
    result.traced_flops = jaxpr_flops(traced.jaxpr)
    try:
        compiled = traced.lower().compile()
    except Exception as e:  # noqa: BLE001 - the compiler's verdict is the result
        result.compile_s = time.perf_counter() - t0
        text = str(e)
        if "RESOURCE_EXHAUSTED" in text or "exceeds available HBM" in text or "Ran out of memory" in text:
            result.error = "does not fit: " + _oom_summary(text)
            return result
        raise
    result.compile_s = time.perf_counter() - t0
    _read_compiled(result, compiled, topology)
    return result


def _oom_summary(text: str) -> str:
    m = re.search(r"temporaries \(([\d.]+\w?)\) exceeds available HBM \(([\d.]+\w?)\)", text)
    if m:
        return f"temporaries {m.group(1)} > HBM {m.group(2)}"
    m = re.search(r"[^\n]*(?:exceeds|Ran out of memory)[^\n]*", text)
    return (m.group(0) if m else text.splitlines()[0]).strip()[:300]


def _read_compiled(result: PlanResult, compiled, topology: Topology) -> None:
    mem = compiled.memory_analysis()
    result.argument_bytes = mem.argument_size_in_bytes
    result.output_bytes = mem.output_size_in_bytes
    result.alias_bytes = mem.alias_size_in_bytes
    result.temp_bytes = mem.temp_size_in_bytes
    result.code_bytes = mem.generated_code_size_in_bytes
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older jax returned one dict per program
        cost = cost[0]
    result.flops_per_device = float(cost.get("flops", float("nan")))
    result.bytes_accessed_per_device = float(cost.get("bytes accessed", float("nan")))
    xla = cost.get("optimal_seconds")
    result.xla_seconds = float(xla) if xla is not None else None
    per_chip = device_share(result, topology)
    peak = topology.chip.peak_tflops * 1e12 * per_chip
    bandwidth = topology.chip.hbm_gbps * 1e9 * per_chip
    # Both counts with loop bodies multiplied out: flops from the traced program, bytes scaled alike.
    flops = max(result.flops_per_device, result.traced_flops.get("total", 0.0) / result.devices)
    result.roofline_seconds = max(flops / peak, result.bytes_accessed_per_device * result.loop_factor / bandwidth)
    result.hbm_bytes = topology.chip.hbm_gib * GIB * per_chip
    result.fits = result.peak_bytes <= result.hbm_bytes


def device_share(result: PlanResult, topology: Topology) -> float:
    """The part of a chip one device is: 1, or 1/2 where libtpu lists each TensorCore (v4)."""
    return topology.chips / result.devices


def _sharded_prefill(graphdef, params, rest, mesh, rules, batch_shape):
    """A forward over the prompt returning the logits of its last position ([B, V], fp32)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding

    from mimo_jax import sharding
    from mimo_jax.model import ACTIVATION_AXES

    shardings = {
        "params": sharding.state_shardings(params, mesh, rules),
        "rest": sharding.state_shardings(rest, mesh, rules),
        "batch": NamedSharding(mesh, sharding.logical_spec(("batch", "seq"), rules, mesh, batch_shape)),
    }

    def prefill(params, rest, input_ids_BT):
        with sharding.activate(mesh, rules):
            model = nnx.merge(graphdef, params, rest)
            positions_BT = jnp.broadcast_to(jnp.arange(input_ids_BT.shape[1]), input_ids_BT.shape)
            x_BTD = sharding.constrain(model.embed_tokens(input_ids_BT), ACTIVATION_AXES)
            for segment in model.segments:
                x_BTD = segment(x_BTD, positions_BT)
                if isinstance(x_BTD, tuple):  # segments that also return router statistics
                    x_BTD = x_BTD[0]
            # The final norm is per position, so only the last one needs it (and the lm_head).
            return model.logits(model.final_norm(x_BTD[:, -1:]))[:, 0]

    jitted = jax.jit(prefill, in_shardings=(shardings["params"], shardings["rest"], shardings["batch"]))
    return jitted, shardings


# --------------------------------------------------------------------------- reporting


def _gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:,.3f} MiB"


def mfu(result: PlanResult, topology: Topology) -> float:
    model_flops = result.hand["total"] * result.tokens
    return model_flops / (topology.chips * topology.chip.peak_tflops * 1e12 * result.step_seconds)


def report(result: PlanResult, topology: Topology, out=sys.stdout) -> None:
    p = lambda *a: print(*a, file=out)  # noqa: E731
    chip = topology.chip
    p(f"topology:        {topology.requested} -> {topology.name}: {topology.chips} chips ({chip.generation}, "
      f"{chip.hbm_gib:g} GiB HBM, {chip.peak_tflops:g} TFLOP/s bf16 per chip), {result.devices} devices")
    p("mesh:            " + " ".join(f"{k}={v}" for k, v in result.mesh.items()))
    p(f"mode:            {result.mode}; batch {result.global_batch} x {result.seq_len} tokens = {result.tokens:,} "
      f"tokens per step; remat={result.remat}; moe_capacity_factor={result.capacity_factor:g}")
    p(f"compile time:    {result.compile_s:.1f} s (on this machine)")
    for note in result.notes:
        p(f"note:            {note}")
    if result.error:
        p(f"fits:            NO ({result.error})")
        p(f"memory/device:   parameters {_gib(result.params_bytes)}, optimizer state {_gib(result.opt_bytes)} "
          "(from the shardings; the compiler refused the program)")
        return
    share = device_share(result, topology)
    p("memory/device:   (per chip where a device is a chip; libtpu lists v4 TensorCores separately)" if share != 1
      else "memory/chip:")
    p(f"  parameters          {_gib(result.params_bytes)}")
    if result.mode == "train":
        p(f"  optimizer state     {_gib(result.opt_bytes)}")
    p(f"  other state         {_gib(result.rest_bytes)} (router biases)")
    p(f"  arguments (XLA)     {_gib(result.argument_bytes)} (state + batch)")
    p(f"  outputs (XLA)       {_gib(result.output_bytes)}, of which aliased to donated inputs {_gib(result.alias_bytes)}")
    p(f"  temporaries (XLA)   {_gib(result.temp_bytes)}")
    p(f"  program code        {_gib(result.code_bytes)}")
    p(f"  peak total          {_gib(result.peak_bytes)} of {_gib(result.hbm_bytes)} HBM -> "
      f"{'FITS' if result.fits else 'DOES NOT FIT'} ({100 * result.peak_bytes / result.hbm_bytes:.0f}%)")
    xla_total = result.flops_per_device * result.devices
    traced = result.traced_flops
    p(f"flops/step:      {traced['total']:.4g} in total, counted on the traced program with every scanned layer "
      f"(matmuls {traced['matmul']:.4g} + Pallas kernels {traced['pallas']:.4g}; elementwise left out)")
    p(f"  XLA cost_analysis: {result.flops_per_device:.4g} per device (it counts per device; x {result.devices} = "
      f"{xla_total:.4g}), but a while loop's body only once: loop factor {result.loop_factor:.2f}")
    p(f"HBM traffic:     {_gib(result.bytes_accessed_per_device)} per device per step by XLA (loop bodies once); "
      f"x loop factor = {_gib(result.bytes_accessed_per_device * result.loop_factor)}")
    xla = ("missing" if result.xla_seconds is None else f"{result.xla_seconds:.4g} s"
           + (" (negative: unusable)" if result.xla_seconds <= 0 else ""))
    p(f"XLA estimate:    {xla}; roofline max(flops/peak, bytes/HBM bandwidth) = {result.roofline_seconds:.4g} s")
    p(f"step time:       {result.step_seconds:.4g} s ({result.time_source}; neither models ICI communication "
      f"fully, so treat it as a lower bound)")
    hand = result.hand
    p(f"model flops/token (hand): {hand['total']:.4g} = {'6' if result.mode == 'train' else '2'} x "
      f"{hand['weights'] / 1e9:.3f}B params ({hand['weight_flops']:.4g}) + attention {hand['attention_flops']:.4g} "
      f"[causal-exact attention: {hand['attention_flops_causal']:.4g}, total {hand['total_causal']:.4g}]")
    per_token = traced["total"] / result.tokens
    p(f"traced flops/token: {per_token:.4g} = {per_token / hand['total']:.3f} x the hand count "
      f"({per_token / hand['total_causal']:.3f} x causal-exact; the traced count adds remat recomputation, "
      f"the attention backward's recomputed scores, block-granular masks and the fp32 router)")
    p(f"MFU:             {100 * mfu(result, topology):.1f}% (hand model flops x tokens / (chips x peak x step time))")


# --------------------------------------------------------------------------- search


def candidate_meshes(devices: int, num_experts: int) -> list[dict[str, int]]:
    """Factorisations devices = data * fsdp * expert * tensor with expert | num_experts and tensor in
    1, 2, 4, 8, cheapest expected first: no data replication (the 309B state must be sharded), little
    tensor parallelism (an all-reduce per matmul), then expert parallelism as wide as the experts
    allow (it divides the expert weights without gathering them)."""
    meshes = []
    for tensor in (1, 2, 4, 8):
        for expert in _divisors(devices // tensor if devices % tensor == 0 else 0):
            if num_experts % expert:
                continue
            rest = devices // (tensor * expert)
            for data in _divisors(rest):
                meshes.append(dict(data=data, fsdp=rest // data, expert=expert, tensor=tensor))
    return sorted(meshes, key=lambda m: (m["data"], m["tensor"], -m["expert"]))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0] if n > 0 else []


def search(base_cfg, topology: Topology, mode: str, seq_len: int, global_batch: int | None, max_compiles: int,
           out=sys.stdout, meshes_per_policy: int = 3) -> tuple[list[PlanResult], PlanResult | None]:
    """Compiles candidates until one fits (or `max_compiles` are spent); returns (tried, best).

    Order: capacity factor 0 (dropless) before bounded buffers, then remat none < dots < full, and
    within a policy the `meshes_per_policy` cheapest meshes whose state fits HBM: a plan that keeps
    all activations rarely fits where recomputing them does, so more meshes per policy would spend
    the compile budget on the same verdict."""
    from mimo_jax.config import apply_overrides

    devices = len(topology_devices(topology))
    remats = ("none", "dots", "full") if mode == "train" else ("none",)
    meshes = candidate_meshes(devices, base_cfg.model.num_experts)
    tried: list[PlanResult] = []
    print(f"search: {len(meshes)} meshes x {len(remats)} remat policies on {topology.name}, at most "
          f"{max_compiles} compiles", file=out)
    print(SEARCH_HEADER, file=out, flush=True)
    shown_skips: set = set()
    for capacity in (0.0, 1.25, 2.0):
        for remat in remats:
            compiled_here = 0
            for mesh in meshes:
                if compiled_here >= meshes_per_policy:
                    break
                if len(tried) >= max_compiles:
                    print(f"stopped: --max-compiles {max_compiles} reached", file=out)
                    return tried, None
                cfg = apply_overrides(base_cfg, [f"mesh.{k}={v}" for k, v in mesh.items()] +
                                      [f"model.remat={remat}", f"model.moe_capacity_factor={capacity}"])
                shards = math.prod(mesh[a] for a in cfg.sharding.batch)
                if global_batch and global_batch % shards:
                    continue  # the batch would be replicated over some devices: not a real candidate
                hbm = topology.chip.hbm_gib * GIB * topology.chips / devices
                reason = None
                state = _state_bytes(cfg, topology, mode)
                if state > hbm:
                    reason = f"state alone {state / GIB:.1f} GiB > HBM"
                elif capacity == 0.0:
                    buffer = dropless_dispatch_bytes(cfg.model, mesh, seq_len * (global_batch or shards) // shards)
                    if buffer > hbm:
                        reason = f"dropless all-to-all buffer {buffer / GIB:.0f} GiB > HBM"
                elif mode == "train":
                    logits = loss_logits_bytes(cfg.model, mesh, seq_len * (global_batch or shards) // shards)
                    if logits > hbm:
                        reason = f"fp32 logits and their gradient {logits / GIB:.0f} GiB > HBM"
                if reason:  # no compile needed for this verdict
                    key = (tuple(mesh.values()), capacity, reason)
                    if key not in shown_skips:
                        shown_skips.add(key)
                        if len(shown_skips) <= 8:
                            skipped = compile_plan_stub(cfg, topology, mode, seq_len, global_batch or shards, mesh,
                                                        reason)
                            print(search_row(skipped), file=out, flush=True)
                    continue
                result = compile_plan(cfg, topology, mode, seq_len, global_batch)
                tried.append(result)
                compiled_here += 1
                print(search_row(result), file=out, flush=True)
                if result.fits:
                    return tried, result
            if capacity == 0.0 and mode != "train":
                break
    if len(shown_skips) > 8:
        print(f"({len(shown_skips) - 8} more candidates skipped without compiling for the same reasons)", file=out)
    return tried, None


def loss_logits_bytes(model_cfg, mesh: dict[str, int], tokens_per_device: int) -> int:
    """The main and MTP heads' fp32 logits of a device's tokens, and their gradient: the loss keeps
    both live at once. The vocabulary splits over the tensor axis (the act_vocab rule)."""
    heads = 1 + model_cfg.num_mtp_heads
    vocab = model_cfg.vocab_size // (mesh["tensor"] if model_cfg.vocab_size % mesh["tensor"] == 0 else 1)
    return 2 * heads * tokens_per_device * vocab * 4


def dropless_dispatch_bytes(model_cfg, mesh: dict[str, int], tokens_per_device: int) -> int:
    """The send buffer of a dropless expert-parallel MoE layer: every device reserves room for all
    its tokens' choices towards every expert shard (mimo_jax.moe.expert_capacity with factor 0)."""
    shards = mesh["expert"]
    if shards == 1:
        return 0
    itemsize = 2 if model_cfg.dtype == "bfloat16" else 4
    return shards * tokens_per_device * model_cfg.num_experts_per_token * model_cfg.hidden_size * itemsize


def compile_plan_stub(cfg, topology: Topology, mode: str, seq_len: int, global_batch: int, mesh, reason: str):
    return PlanResult(mode=mode, topology=topology.name, chips=topology.chips, devices=math.prod(mesh.values()),
                      mesh=dict(mesh), remat=cfg.model.remat, capacity_factor=cfg.model.moe_capacity_factor,
                      global_batch=global_batch, seq_len=seq_len, compile_s=0.0, error="skipped, " + reason)


def _state_bytes(cfg, topology: Topology, mode: str) -> int:
    """Parameters (+ AdamW moments in training) per device, from the shardings alone."""
    import jax

    from mimo_jax import sharding
    from mimo_jax.train_step import abstract_model_state

    mesh = build_mesh(cfg, topology)
    _, params, _ = abstract_model_state(cfg.model)
    param_bytes = _bytes_per_device(params, sharding.state_shardings(params, mesh, cfg.sharding))
    if mode != "train":
        return param_bytes
    tx = make_optimizer()
    opt = jax.eval_shape(tx.init, params)
    opt_shardings = sharding.optimizer_shardings(tx, opt, sharding.state_shardings(params, mesh, cfg.sharding), mesh)
    return param_bytes + _bytes_per_device(opt, opt_shardings)


SEARCH_HEADER = ("| mesh (data,fsdp,expert,tensor) | remat | capacity | batch | fits | peak GiB/chip | "
                 "temp GiB | est. step s | MFU | compile s |\n|---|---|---|---|---|---|---|---|---|---|")


def search_row(r: PlanResult) -> str:
    mesh = ",".join(str(r.mesh[a]) for a in ("data", "fsdp", "expert", "tensor"))
    if r.error:
        return (f"| {mesh} | {r.remat} | {r.capacity_factor:g} | {r.global_batch} | no ({r.error[:60]}) | | | | | "
                f"{r.compile_s:.0f} |")
    top = parse_topology(r.topology)
    return (f"| {mesh} | {r.remat} | {r.capacity_factor:g} | {r.global_batch} | {'yes' if r.fits else 'no'} | "
            f"{r.peak_bytes / GIB:.2f} | {r.temp_bytes / GIB:.2f} | {r.step_seconds:.3g} | "
            f"{100 * mfu(r, top):.1f}% | {r.compile_s:.0f} |")


# --------------------------------------------------------------------------- command line

DEFAULT_OVERRIDES = ["model.kernel_mode=mosaic", "model.attention_impl=pallas", "model.moe_impl=pallas"]


def main(argv: Sequence[str] | None = None, out=sys.stdout) -> int:
    parser = argparse.ArgumentParser(prog="python -m mimo_jax.plan", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", default="configs/mimo_v2_flash.yaml", help="YAML preset or file")
    parser.add_argument("--topology", required=True, help="v5p-256, v5e-64, v5p:4x4x8, ...")
    parser.add_argument("--mode", choices=("train", "prefill"), default="train")
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--global-batch", type=int, default=None,
                        help="sequences per step (default: one per batch shard, data*fsdp*expert)")
    parser.add_argument("--search", action="store_true", help="try meshes / remat / capacity until one fits")
    parser.add_argument("--max-compiles", type=int, default=6, help="cap on compiles in --search")
    parser.add_argument("--meshes-per-policy", type=int, default=3,
                        help="in --search, meshes tried per (capacity, remat) before moving on")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides (model.*, mesh.*, sharding.*)")
    args = parser.parse_args(argv)

    import jax

    jax.config.update("jax_platforms", "cpu")  # the program is compiled for TPU; nothing runs here
    from mimo_jax.config import ConfigError, load_config

    try:
        topology = parse_topology(args.topology)
        cfg = load_config(args.config, DEFAULT_OVERRIDES + list(args.overrides))
        if cfg.model.kernel_mode != "mosaic":
            raise PlanError("model.kernel_mode must be mosaic when compiling for TPU")
        if args.seq_len <= 0 or (args.global_batch is not None and args.global_batch <= 0):
            raise PlanError("--seq-len and --global-batch must be positive")
        if args.search:
            tried, best = search(cfg, topology, args.mode, args.seq_len, args.global_batch,
                                  args.max_compiles, out, args.meshes_per_policy)
            if best is None:
                print(f"no fitting plan in {len(tried)} compiles (raise --max-compiles, add chips, or override "
                      f"model.param_dtype=bfloat16)", file=out)
                return 1
            print("\nbest found:", file=out)
            report(best, topology, out)
            return 0
        result = compile_plan(cfg, topology, args.mode, args.seq_len, args.global_batch)
    except (PlanError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(result, topology, out)
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
