"""Pod planning: compile a training, prefill or decode step for a TPU slice ahead of time, on CPU.

    python -m mimo_jax.plan --config configs/mimo_v2_flash.yaml --topology v5p-256 \\
        [--seq-len 32768] [--global-batch N] [--mode train|prefill|decode] [--search] [key=value ...]
        [--prefill-chunk 8192] [--num-draft 3]

The program is lowered for the slice's devices (libtpu describes them; nothing runs) with the
Pallas kernels compiled by Mosaic (`model.kernel_mode=mosaic`, `attention_impl=pallas`,
`moe_impl=pallas` unless overridden), and the plan reports, per chip: parameter, optimizer and KV
cache bytes (from the shardings), XLA's temporaries, whether it all fits HBM, flops per step, XLA's
time estimate (or a roofline estimate when XLA gives none), MFU or tokens/s, and the hand-derived
model flops per token beside XLA's count.

Modes:
- `train`: one optimizer step on `--global-batch` sequences of `--seq-len` tokens.
- `prefill`: one chunk of a chunked prefill: `--prefill-chunk` tokens per sequence written into a
  KV cache of `--seq-len` tokens. It is the prompt's last chunk, the costliest one: its queries see
  the whole global cache. `--prefill-chunk` equal to `--seq-len` is a whole-prompt prefill.
- `decode`: one decode step with a full KV cache of `--seq-len` tokens: 1 token per sequence, or
  with `--num-draft D` the speculative verify step (D + 1 tokens through the main model; the cache
  then also holds the MTP heads' rings, but the D drafting passes are not in the program).
The cached modes run the model's own cached call (`model(ids, positions_BT=..., cache=...)`), the
cache sharded by the `cache_*` rules and donated (updated in place).

Topologies: slice names as Cloud TPU spells them (`v5p-256` counts TensorCores, 2 per v5p / v4
chip, so 128 chips; `v5e-256` and `v6e-256` count chips) or raw `v5p:4x4x8` / `v5e:8x16` names.

`--search` tries meshes, remat policies (training) or KV cache layouts (inference) and MoE
capacity factors, cheapest expected first, and stops at the first plan that fits, compiling at
most `--max-compiles` programs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import time
from collections.abc import Sequence

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


def hand_flops_per_token(cfg, seq_len: int, mode: str, query_len: int | None = None) -> dict[str, float]:
    """Model flops per token: 6 x params a token touches (2 x for a forward) plus attention.

    Attention per layer and token, forward: 2*H*(d_qk + d_v)*context (QK^T and PV). The context is
    the sequence length for global layers (PaLM's convention: no causal discount, so 12*L*H*Q*T when
    d_qk = d_v = Q) and the window for SWA layers. "causal" gives the work a causal kernel does:
    (T+1)/2 keys on average for global layers over a whole sequence.

    - train: `seq_len` tokens per sequence; the MTP heads (an SWA block each, plus the shared
      lm_head) are counted too.
    - prefill: the last chunk of `query_len` tokens (default: the whole prompt) of a `seq_len`
      prompt; its queries see seq_len - (query_len - 1)/2 global keys on average (causal-exact).
      Logits are needed at the last position only, so the lm_head is left out.
    - decode: `query_len` tokens (1, or num_draft + 1 when verifying drafts) at the end of a
      `seq_len` context; every token needs its logits, so the lm_head counts.
    """
    from mimo_jax.params import count_params

    counts = count_params(cfg)
    lm_head = cfg.hidden_size * cfg.vocab_size
    h, dqk, dv, t = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim, seq_len
    queries = t if mode == "train" or query_len is None else query_len
    swa_context = min(t, cfg.sliding_window + 1)  # the window plus the query itself
    per_context = 2 * h * (dqk + dv)  # forward flops per (query, key) pair, all heads
    global_layers = sum(1 for lt in cfg.layer_types if lt == "global")
    swa_layers = cfg.num_layers - global_layers
    palm_context = global_layers * t + swa_layers * swa_context
    # Queries at positions t - queries .. t - 1 see (position + 1) global keys: t - (queries - 1)/2 on average.
    causal_context = global_layers * (t - (queries - 1) / 2) + swa_layers * swa_context
    factor = 1
    if mode == "train":
        mtp_heads = cfg.num_mtp_heads
        weights = counts["active"] + counts["mtp"] + mtp_heads * lm_head
        palm_context += mtp_heads * swa_context
        causal_context += mtp_heads * swa_context
        factor = 3  # forward + backward (2x forward)
    elif mode == "prefill":
        weights = counts["active"] - lm_head
    elif mode == "decode":
        weights = counts["active"]
    else:
        raise PlanError(f"unknown mode {mode!r} (train, prefill or decode)")
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
    seq_len: int  # train: tokens per sequence; prefill / decode: the KV cache's length (context)
    query_len: int = 0  # tokens per sequence in the step: seq_len (train), the chunk, 1 or num_draft + 1
    num_draft: int = 0
    compile_s: float = float("nan")
    fits: bool = False
    error: str | None = None
    params_bytes: int = 0  # per device, from the shardings
    opt_bytes: int = 0
    cache_bytes: int = 0  # the KV cache (prefill / decode)
    cache_seq: tuple[str, ...] = ()  # the sharding.cache_seq rule
    cache_spec: str = ""  # how the largest cache buffer is laid out
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
    stream_seconds: float = float("nan")  # parameters + KV cache read once from HBM (inference)
    traced_flops: dict[str, float] = dataclasses.field(default_factory=dict)  # global, loops counted
    hand: dict[str, float] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def tokens(self) -> int:
        """Tokens through the model in one step."""
        return self.global_batch * (self.query_len or self.seq_len)

    @property
    def tokens_per_second(self) -> tuple[float, float]:
        """(fewest, most) tokens a second: a decode step emits 1 token per sequence, a verify step
        1 to num_draft + 1 (as many drafts as agree, plus one); a prefill chunk advances the prompt
        by the chunk (this step is the prompt's costliest chunk, so it is a lower bound)."""
        rate = self.global_batch / self.step_seconds
        if self.mode == "decode":
            return rate, rate * (self.num_draft + 1)
        return rate * self.query_len, rate * self.query_len

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

    from mimo_jax.blocked_gmm import useful_flops

    totals = {"matmul": 0.0, "pallas": 0.0}

    def grouped_flops(eqn):  # the tiled grouped-matmul loops count their dropless work
        shapes = lambda xs: [tuple(getattr(x.aval, "shape", ())) for x in xs]  # noqa: E731
        return useful_flops(eqn.params.get("name", ""), shapes(eqn.invars), shapes(eqn.outvars))

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
            elif name == "ragged_dot_general":
                lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
                totals["matmul"] += times * 2.0 * math.prod(eqn.outvars[0].aval.shape) * lhs[-1]
            elif name in ("pjit", "jit") and grouped_flops(eqn) is not None:
                totals["matmul"] += times * grouped_flops(eqn)
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


DEFAULT_PREFILL_CHUNK = 8192
SEQ_SHARDED_CACHE = ("data", "fsdp", "expert")  # --search's second KV cache layout (sharding.cache_seq)


def compile_plan(cfg, topology: Topology, mode: str, seq_len: int, global_batch: int | None, *,
                 prefill_chunk: int | None = None, num_draft: int = 0) -> PlanResult:
    """Lowers and compiles the step for the topology and reads the compiler's figures.

    train: one optimizer step; prefill: the last `prefill_chunk`-token chunk (default
    DEFAULT_PREFILL_CHUNK, at most `seq_len`) of a prompt into a `seq_len`-token KV cache; decode:
    one step of 1 (or `num_draft` + 1) tokens per sequence with a full `seq_len`-token cache."""
    import jax
    import jax.numpy as jnp

    from mimo_jax.train_step import abstract_model_state, sharded_train_step

    model_cfg = cfg.model
    query_len = _query_len(mode, seq_len, prefill_chunk, num_draft, model_cfg)
    mesh = build_mesh(cfg, topology)
    rules = cfg.sharding
    devices = mesh.devices.size
    shards = batch_shards(mesh, rules)
    batch = global_batch or shards
    result = PlanResult(mode=mode, topology=topology.name, chips=topology.chips, devices=devices,
                        mesh=dict(mesh.shape), remat=model_cfg.remat, capacity_factor=model_cfg.moe_capacity_factor,
                        global_batch=batch, seq_len=seq_len, query_len=query_len, num_draft=num_draft,
                        hand=hand_flops_per_token(model_cfg, seq_len, mode, query_len))
    if batch % shards:
        result.notes.append(f"global batch {batch} does not divide over the {shards} batch shards "
                            f"({'x'.join(rules.batch)}): the batch is replicated, every device computes it all")
    if "expert" in mesh.shape and model_cfg.num_experts % mesh.shape["expert"]:
        raise PlanError(f"expert axis {mesh.shape['expert']} does not divide {model_cfg.num_experts} experts")

    graphdef, params, rest = abstract_model_state(model_cfg)
    if mode == "train":
        batch_shape = (batch, seq_len)
        tx = make_optimizer()
        step, shardings = sharded_train_step(graphdef, params, rest, tx, mesh, rules, batch_shape)
        opt_state = jax.eval_shape(tx.init, params)
        ids = jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=shardings["batch"])
        args = (_with_shardings(params, shardings["params"]), _with_shardings(opt_state, shardings["opt_state"]),
                _with_shardings(rest, shardings["rest"]), ids, ids)
        result.opt_bytes = _bytes_per_device(opt_state, shardings["opt_state"])
    else:
        cache = abstract_cache(model_cfg, batch, seq_len, num_draft)
        logits_at = 1 if mode == "prefill" else query_len
        step, shardings = _sharded_cached_step(graphdef, params, rest, cache, mesh, rules, (batch, query_len), logits_at,
                                               model_cfg.vocab_size)
        ids = jax.ShapeDtypeStruct((batch, query_len), jnp.int32, sharding=shardings["batch"])
        args = (_with_shardings(params, shardings["params"]), _with_shardings(rest, shardings["rest"]),
                _with_shardings(cache, shardings["cache"]), ids, ids)
        result.cache_bytes = _bytes_per_device(cache, shardings["cache"])
        result.cache_seq = rules.cache_seq
        largest = max(zip(jax.tree.leaves(cache), jax.tree.leaves(shardings["cache"])), key=lambda c: c[0].size)
        result.cache_spec = f"{list(largest[0].shape)} as {largest[1].spec}"
        if num_draft:
            result.notes.append(f"verify step: {query_len} tokens per sequence through the main model; the cache "
                                f"holds the MTP heads' rings too, but the {num_draft} drafting passes are not compiled")
    result.params_bytes = _bytes_per_device(params, shardings["params"])
    result.rest_bytes = _bytes_per_device(rest, shardings["rest"])

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
        if isinstance(e, jax.errors.JaxRuntimeError):  # refused for another reason: a verdict too
            result.error = "compiler error: " + " ".join(text.split())[:300]
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
    result.stream_seconds = (result.params_bytes + result.rest_bytes + result.cache_bytes) / bandwidth
    result.hbm_bytes = topology.chip.hbm_gib * GIB * per_chip
    result.fits = result.peak_bytes <= result.hbm_bytes


def device_share(result: PlanResult, topology: Topology) -> float:
    """The part of a chip one device is: 1, or 1/2 where libtpu lists each TensorCore (v4)."""
    return topology.chips / result.devices


def _query_len(mode: str, seq_len: int, prefill_chunk: int | None, num_draft: int, model_cfg) -> int:
    if num_draft and mode != "decode":
        raise PlanError("--num-draft plans the speculative verify step: it needs --mode decode")
    if prefill_chunk is not None and mode != "prefill":
        raise PlanError("--prefill-chunk needs --mode prefill")
    if mode == "train":
        return seq_len
    if mode == "prefill":
        chunk = min(seq_len, DEFAULT_PREFILL_CHUNK) if prefill_chunk is None else prefill_chunk
        if not 0 < chunk <= seq_len:
            raise PlanError(f"--prefill-chunk {chunk} must be in 1..--seq-len ({seq_len})")
        return chunk
    if mode == "decode":
        if not 0 <= num_draft <= model_cfg.num_mtp_heads:
            raise PlanError(f"--num-draft must be in 0..{model_cfg.num_mtp_heads} (the model's MTP heads), "
                            f"got {num_draft}")
        if num_draft + 1 > seq_len:
            raise PlanError(f"--seq-len {seq_len} is shorter than the {num_draft + 1} tokens of a step")
        return num_draft + 1
    raise PlanError(f"unknown mode {mode!r} (train, prefill or decode)")


def abstract_cache(model_cfg, batch: int, seq_len: int, num_draft: int = 0):
    """The KV cache of `batch` sequences of `seq_len` tokens as ShapeDtypeStructs (the MTP heads'
    rings too when drafting)."""
    import jax

    from mimo_jax.kv_cache import init_cache

    return jax.eval_shape(lambda: init_cache(model_cfg, batch, seq_len, num_draft=num_draft, mtp=num_draft > 0))


def cache_shardings(cache, mesh, rules):
    """NamedShardings for a `kv_cache.KVCache` from the `cache_*` rules: K/V buffers
    [..., B, S, K, D] by `kv_cache.CACHE_AXES` (the stacked-layer or MTP-head dims replicated), the
    slot positions [B, R] by batch."""
    import jax
    from jax.sharding import NamedSharding

    from mimo_jax.kv_cache import CACHE_AXES
    from mimo_jax.sharding import logical_spec

    def by(axes):
        return lambda x: NamedSharding(mesh, logical_spec((None,) * (x.ndim - len(axes)) + tuple(axes), rules, mesh,
                                                          x.shape))

    kv = by(CACHE_AXES)
    positions = by(("cache_batch", None))
    return cache.replace(
        layers=jax.tree.map(kv, cache.layers), ring_positions=positions(cache.ring_positions),
        mtp=None if cache.mtp is None else jax.tree.map(kv, cache.mtp),
        mtp_positions=None if cache.mtp_positions is None else positions(cache.mtp_positions))


def _sharded_cached_step(graphdef, params, rest, cache, mesh, rules, batch_shape, logits_at: int, vocab: int):
    """One cached model call on [B, T] tokens at the given positions: returns the logits of the
    last `logits_at` positions ([B, logits_at, V], fp32) and the updated cache (donated)."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding

    from mimo_jax import sharding

    shardings = {
        "params": sharding.state_shardings(params, mesh, rules),
        "rest": sharding.state_shardings(rest, mesh, rules),
        "cache": cache_shardings(cache, mesh, rules),
        "batch": NamedSharding(mesh, sharding.logical_spec(("batch", "seq"), rules, mesh, batch_shape)),
    }
    logits_shape = (batch_shape[0], logits_at, vocab)
    logits_sharding = NamedSharding(mesh, sharding.logical_spec(("batch", "seq", "act_vocab"), rules, mesh,
                                                                logits_shape))

    def step(params, rest, cache, input_ids_BT, positions_BT):
        with sharding.activate(mesh, rules):
            model = nnx.merge(graphdef, params, rest)
            out = model(input_ids_BT, positions_BT=positions_BT, cache=cache, logits=False)
            # The final norm is per position: only the positions that need logits go through the lm_head.
            return model.logits(out.hidden[:, -logits_at:]), out.cache

    jitted = jax.jit(step, in_shardings=(shardings["params"], shardings["rest"], shardings["cache"],
                                         shardings["batch"], shardings["batch"]),
                     out_shardings=(logits_sharding, shardings["cache"]), donate_argnums=(2,),
                     keep_unused=True)  # the MTP heads stay in HBM (they draft) though this step skips them
    return jitted, shardings


# --------------------------------------------------------------------------- reporting


def _gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:,.3f} MiB"


def mfu(result: PlanResult, topology: Topology) -> float:
    model_flops = result.hand["total"] * result.tokens
    return model_flops / (topology.chips * topology.chip.peak_tflops * 1e12 * result.step_seconds)


def _describe_step(result: PlanResult) -> str:
    b = result.global_batch
    if result.mode == "train":
        return f"train; batch {b} x {result.seq_len} tokens = {result.tokens:,} tokens per step"
    if result.mode == "prefill":
        first = result.seq_len - result.query_len
        return (f"prefill chunk; batch {b} x {result.query_len} tokens (positions {first:,}..{result.seq_len - 1:,}, "
                f"the last chunk of a {result.seq_len:,}-token prompt) = {result.tokens:,} tokens per step")
    kind = f"verify step ({result.num_draft} drafts + 1)" if result.num_draft else "decode step"
    return (f"{kind}; batch {b} x {result.query_len} token{'s' * (result.query_len > 1)} = {result.tokens:,} "
            f"tokens per step, with a full KV cache of {result.seq_len:,} tokens per sequence")


def report(result: PlanResult, topology: Topology, out=sys.stdout) -> None:
    p = lambda *a: print(*a, file=out)  # noqa: E731
    chip = topology.chip
    p(f"topology:        {topology.requested} -> {topology.name}: {topology.chips} chips ({chip.generation}, "
      f"{chip.hbm_gib:g} GiB HBM, {chip.peak_tflops:g} TFLOP/s bf16 per chip), {result.devices} devices")
    p("mesh:            " + " ".join(f"{k}={v}" for k, v in result.mesh.items()))
    p(f"mode:            {_describe_step(result)}; remat={result.remat}; "
      f"moe_capacity_factor={result.capacity_factor:g}")
    p(f"compile time:    {result.compile_s:.1f} s (on this machine)")
    for note in result.notes:
        p(f"note:            {note}")
    if result.error:
        p(f"fits:            NO ({result.error})")
        state = (f"optimizer state {_gib(result.opt_bytes)}" if result.mode == "train"
                 else f"KV cache {_gib(result.cache_bytes)}")
        p(f"memory/device:   parameters {_gib(result.params_bytes)}, {state} "
          "(from the shardings; the compiler refused the program)")
        return
    share = device_share(result, topology)
    p("memory/device:   (per chip where a device is a chip; libtpu lists v4 TensorCores separately)" if share != 1
      else "memory/chip:")
    p(f"  parameters          {_gib(result.params_bytes)}")
    if result.mode == "train":
        p(f"  optimizer state     {_gib(result.opt_bytes)}")
    else:
        p(f"  KV cache            {_gib(result.cache_bytes)} ({result.global_batch} x {result.seq_len:,} tokens; "
          f"donated: the updated cache reuses its buffers; largest buffer {result.cache_spec})")
    p(f"  other state         {_gib(result.rest_bytes)} (router biases)")
    p(f"  arguments (XLA)     {_gib(result.argument_bytes)} (state + {'batch' if result.mode == 'train' else 'tokens'})")
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
    if result.mode != "train":
        p(f"HBM floor:       {result.stream_seconds:.4g} s to read the parameters and the KV cache once per chip "
          f"(XLA's traffic above also counts copies the program makes, e.g. of scanned weights)")
    low, high = result.tokens_per_second
    if result.mode == "decode":
        per = f"{low:,.1f} tokens/s ({result.global_batch} sequences x 1 token per step)"
        if result.num_draft:
            per = (f"{low:,.1f} to {high:,.1f} tokens/s ({result.global_batch} sequences x 1 to "
                   f"{result.num_draft + 1} tokens per verify step, as many drafts as are accepted + 1)")
        floor = result.global_batch / result.stream_seconds
        floor_rate = f"{floor:,.1f}" + (f" to {floor * (result.num_draft + 1):,.1f}" if result.num_draft else "")
        p(f"throughput:      {per}; {result.step_seconds * 1e3:.3g} ms per step (at the HBM floor: {floor_rate} "
          f"tokens/s)")
    elif result.mode == "prefill":
        chunks = -(-result.seq_len // result.query_len)
        p(f"throughput:      >= {low:,.0f} prompt tokens/s (this is the costliest chunk); a {result.seq_len:,}-token "
          f"prompt takes <= {chunks} chunks x {result.step_seconds:.3g} s = {chunks * result.step_seconds:.3g} s")
    hand = result.hand
    p(f"model flops/token (hand): {hand['total']:.4g} = {'6' if result.mode == 'train' else '2'} x "
      f"{hand['weights'] / 1e9:.3f}B params ({hand['weight_flops']:.4g}) + attention {hand['attention_flops']:.4g} "
      f"[causal-exact attention: {hand['attention_flops_causal']:.4g}, total {hand['total_causal']:.4g}]")
    per_token = traced["total"] / result.tokens
    extra = ("remat recomputation, the attention backward's recomputed scores, block-granular masks and the fp32 "
             "router" if result.mode == "train" else
             "block-granular attention (queries padded to 16-row blocks, keys to 128-key blocks), the fp32 router, "
             "and work repeated on every device where the batch does not divide over the batch shards")
    p(f"traced flops/token: {per_token:.4g} = {per_token / hand['total']:.3f} x the hand count "
      f"({per_token / hand['total_causal']:.3f} x causal-exact; the traced count adds {extra})")
    p(f"MFU:             {100 * mfu(result, topology):.1f}% (hand model flops x tokens / (chips x peak x step time))")


# --------------------------------------------------------------------------- search


def candidate_meshes(devices: int, num_experts: int, mode: str = "train") -> list[dict[str, int]]:
    """Factorisations devices = data * fsdp * expert * tensor with expert | num_experts and tensor in
    1, 2, 4, 8, cheapest expected first.

    Training: no data replication (the 309B state must be sharded), little tensor parallelism (an
    all-reduce per matmul), then expert parallelism as wide as the experts allow (it divides the
    expert weights without gathering them). Inference: no data replication and no fsdp either (a
    step would gather every weight for a few tokens), then as much tensor parallelism as allowed
    (it splits the dense weights and the KV heads of a few sequences that the batch axes cannot)."""
    meshes = []
    for tensor in (1, 2, 4, 8):
        for expert in _divisors(devices // tensor if devices % tensor == 0 else 0):
            if num_experts % expert:
                continue
            rest = devices // (tensor * expert)
            for data in _divisors(rest):
                meshes.append(dict(data=data, fsdp=rest // data, expert=expert, tensor=tensor))
    if mode == "train":
        return sorted(meshes, key=lambda m: (m["data"], m["tensor"], -m["expert"]))
    return sorted(meshes, key=lambda m: (m["data"], m["fsdp"], -m["tensor"]))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0] if n > 0 else []


def search(base_cfg, topology: Topology, mode: str, seq_len: int, global_batch: int | None, max_compiles: int,
           out=sys.stdout, meshes_per_policy: int = 3, *, prefill_chunk: int | None = None,
           num_draft: int = 0) -> tuple[list[PlanResult], PlanResult | None]:
    """Compiles candidates until one fits (or `max_compiles` are spent); returns (tried, best).

    Order: capacity factor 0 (dropless) before bounded buffers, then remat none < dots < full
    (training only), and within a policy the `meshes_per_policy` cheapest meshes whose state fits
    HBM: a plan that keeps all activations rarely fits where recomputing them does, so more meshes
    per policy would spend the compile budget on the same verdict. Inference plans count the KV
    cache in the state and accept a batch smaller than the batch shards (a single 256k sequence
    is replicated over them; the expert and tensor axes still split the weights)."""
    from mimo_jax.config import apply_overrides

    query_len = _query_len(mode, seq_len, prefill_chunk, num_draft, base_cfg.model)
    devices = len(topology_devices(topology))
    if mode == "train":
        policies = [[f"model.remat={remat}"] for remat in ("none", "dots", "full")]
        capacities = (0.0, 1.25, 2.0)
    else:  # the KV cache as the rules place it, then its sequence over the batch axes a small batch leaves idle
        policies = [["model.remat=none"], ["model.remat=none", f"sharding.cache_seq=[{', '.join(SEQ_SHARDED_CACHE)}]"]]
        capacities = (0.0, 1.25)
    meshes = candidate_meshes(devices, base_cfg.model.num_experts, mode)
    tried: list[PlanResult] = []
    what = "remat policies" if mode == "train" else "KV cache layouts"
    print(f"search: {len(meshes)} meshes x {len(policies)} {what} x {len(capacities)} capacity factors on "
          f"{topology.name}, at most {max_compiles} compiles", file=out)
    print(SEARCH_HEADER, file=out, flush=True)
    shown_skips: set = set()
    ragged_refused = False  # some topologies' compilers refuse the ragged all-to-all of dropless dispatch
    for capacity in capacities:
        for policy in policies:
            compiled_here = 0
            for mesh in meshes:
                if compiled_here >= meshes_per_policy:
                    break
                if len(tried) >= max_compiles:
                    print(f"stopped: --max-compiles {max_compiles} reached", file=out)
                    return tried, None
                cfg = apply_overrides(base_cfg, [f"mesh.{k}={v}" for k, v in mesh.items()] + policy +
                                      [f"model.moe_capacity_factor={capacity}"])
                shards = math.prod(mesh[a] for a in cfg.sharding.batch)
                batch = global_batch or shards
                if mode == "train" and batch % shards:
                    continue  # the batch would be replicated over some devices: not a real candidate
                # Rows a device holds: its share of the batch, or all of it where the batch is replicated.
                tokens_per_device = query_len * (batch // shards if batch % shards == 0 else batch)
                hbm = topology.chip.hbm_gib * GIB * topology.chips / devices
                reason = None
                state = _state_bytes(cfg, topology, mode, batch, seq_len, num_draft)
                if state > hbm:
                    reason = f"state alone {state / GIB:.1f} GiB > HBM"
                elif capacity == 0.0 and ragged_refused:
                    reason = "dropless needs the ragged all-to-all the compiler refused above"
                elif capacity == 0.0:
                    buffer = dropless_dispatch_bytes(cfg.model, mesh, tokens_per_device)
                    if buffer > hbm:
                        reason = f"dropless all-to-all buffer {buffer / GIB:.0f} GiB > HBM"
                elif mode == "train":
                    logits = loss_logits_bytes(cfg.model, mesh, tokens_per_device)
                    if logits > hbm:
                        reason = f"fp32 logits and their gradient {logits / GIB:.0f} GiB > HBM"
                if reason:  # no compile needed for this verdict
                    key = (tuple(mesh.values()), capacity, tuple(policy), reason)
                    if key not in shown_skips:
                        shown_skips.add(key)
                        if len(shown_skips) <= 8:
                            skipped = compile_plan_stub(cfg, topology, mode, seq_len, batch, mesh, reason,
                                                        query_len, num_draft)
                            print(search_row(skipped), file=out, flush=True)
                    continue
                result = compile_plan(cfg, topology, mode, seq_len, global_batch,
                                      prefill_chunk=prefill_chunk, num_draft=num_draft)
                tried.append(result)
                compiled_here += 1
                ragged_refused |= "Ragged all-to-all" in (result.error or "")
                print(search_row(result), file=out, flush=True)
                if result.fits:
                    return tried, result
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


def compile_plan_stub(cfg, topology: Topology, mode: str, seq_len: int, global_batch: int, mesh, reason: str,
                      query_len: int, num_draft: int = 0):
    return PlanResult(mode=mode, topology=topology.name, chips=topology.chips, devices=math.prod(mesh.values()),
                      mesh=dict(mesh), remat=cfg.model.remat, capacity_factor=cfg.model.moe_capacity_factor,
                      global_batch=global_batch, seq_len=seq_len, query_len=query_len, num_draft=num_draft,
                      cache_seq=cfg.sharding.cache_seq if mode != "train" else (), compile_s=0.0,
                      error="skipped, " + reason)


def _state_bytes(cfg, topology: Topology, mode: str, batch: int, seq_len: int, num_draft: int = 0) -> int:
    """Parameters, plus AdamW moments in training or the KV cache in inference, per device, from
    the shardings alone."""
    import jax

    from mimo_jax import sharding
    from mimo_jax.train_step import abstract_model_state

    mesh = build_mesh(cfg, topology)
    _, params, _ = abstract_model_state(cfg.model)
    param_shardings = sharding.state_shardings(params, mesh, cfg.sharding)
    param_bytes = _bytes_per_device(params, param_shardings)
    if mode != "train":
        cache = abstract_cache(cfg.model, batch, seq_len, num_draft)
        return param_bytes + _bytes_per_device(cache, cache_shardings(cache, mesh, cfg.sharding))
    tx = make_optimizer()
    opt = jax.eval_shape(tx.init, params)
    opt_shardings = sharding.optimizer_shardings(tx, opt, param_shardings, mesh)
    return param_bytes + _bytes_per_device(opt, opt_shardings)


SEARCH_HEADER = ("| mesh (data,fsdp,expert,tensor) | remat | capacity | batch | fits | peak GiB/chip | "
                 "temp GiB | est. step s | MFU | tokens/s | compile s |\n|---|---|---|---|---|---|---|---|---|---|---|")


def search_row(r: PlanResult) -> str:
    mesh = ",".join(str(r.mesh[a]) for a in ("data", "fsdp", "expert", "tensor"))
    remat = r.remat + (f", cache_seq={'+'.join(r.cache_seq)}" if r.cache_seq else "")
    if r.error:
        error = r.error if len(r.error) <= 80 else f"{r.error[:20]}...{r.error[-57:]}"
        return (f"| {mesh} | {remat} | {r.capacity_factor:g} | {r.global_batch} | no ({error}) | | | | | | "
                f"{r.compile_s:.0f} |")
    top = parse_topology(r.topology)
    low, high = r.tokens_per_second
    rate = f"{low:,.0f}" if high == low else f"{low:,.0f}-{high:,.0f}"
    return (f"| {mesh} | {remat} | {r.capacity_factor:g} | {r.global_batch} | {'yes' if r.fits else 'no'} | "
            f"{r.peak_bytes / GIB:.2f} | {r.temp_bytes / GIB:.2f} | {r.step_seconds:.3g} | "
            f"{100 * mfu(r, top):.1f}% | {rate} | {r.compile_s:.0f} |")


# --------------------------------------------------------------------------- command line

DEFAULT_OVERRIDES = ["model.kernel_mode=mosaic", "model.attention_impl=pallas", "model.moe_impl=pallas"]


def main(argv: Sequence[str] | None = None, out=sys.stdout) -> int:
    parser = argparse.ArgumentParser(prog="python -m mimo_jax.plan", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", default="configs/mimo_v2_flash.yaml", help="YAML preset or file")
    parser.add_argument("--topology", required=True, help="v5p-256, v5e-64, v5p:4x4x8, ...")
    parser.add_argument("--mode", choices=("train", "prefill", "decode"), default="train")
    parser.add_argument("--seq-len", type=int, default=32768,
                        help="tokens per sequence (train) or the KV cache's length (prefill, decode)")
    parser.add_argument("--global-batch", type=int, default=None,
                        help="sequences per step (default: one per batch shard, data*fsdp*expert)")
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help=f"prefill: tokens per chunk (default {DEFAULT_PREFILL_CHUNK}, at most --seq-len)")
    parser.add_argument("--num-draft", type=int, default=0,
                        help="decode: plan the speculative verify step of this many MTP drafts + 1 (default 0: "
                             "plain decoding, 1 token)")
    parser.add_argument("--search", action="store_true", help="try meshes / remat / capacity until one fits")
    parser.add_argument("--max-compiles", type=int, default=6, help="cap on compiles in --search")
    parser.add_argument("--meshes-per-policy", type=int, default=3,
                        help="in --search, meshes tried per (capacity, remat or cache layout) before moving on")
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
                                  args.max_compiles, out, args.meshes_per_policy, prefill_chunk=args.prefill_chunk,
                                  num_draft=args.num_draft)
            if best is None:
                print(f"no fitting plan in {len(tried)} compiles (raise --max-compiles, add chips, or override "
                      f"model.param_dtype=bfloat16)", file=out)
                return 1
            print("\nbest found:", file=out)
            report(best, topology, out)
            return 0
        result = compile_plan(cfg, topology, args.mode, args.seq_len, args.global_batch,
                              prefill_chunk=args.prefill_chunk, num_draft=args.num_draft)
    except (PlanError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(result, topology, out)
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
