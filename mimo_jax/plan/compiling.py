"""Compiling one training, prefill or decode step for a TPU slice ahead of time, and reading the
compiler's memory and cost figures into a `PlanResult`."""

from __future__ import annotations

import dataclasses
import functools
import glob
import math
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from mimo_jax import inference, sharding
from mimo_jax.config import ConfigError
from mimo_jax.flops import hand_flops_per_token, jaxpr_flops
from mimo_jax.hf_io import fp8_resident_params
from mimo_jax.kv_cache import CACHE_AXES, DEFAULT_PREFILL_CHUNK, init_cache
from mimo_jax.model import abstract_model
from mimo_jax.plan.cost import CostEstimate, estimate_cost, xla_cost
from mimo_jax.plan.topology import GIB, PlanError, Topology, topology_devices
from mimo_jax.sharding import logical_spec, make_mesh
from mimo_jax.train_step import abstract_model_state, make_optimizer, sharded_train_step


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
    weights: str = ""  # the parameters' dtype, or "fp8" (FP8-resident)
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
    cost: CostEstimate | None = None  # the cost model's figures (compile_plan(..., cost_model=True))
    largest_buffers: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (bytes, shapes) per device

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
        """The cost model's overlapped estimate; without one XLA's estimate scaled by the loop
        factor (at least the HBM floor, but for the drafting passes), or the roofline where XLA gives none."""
        if self.cost is not None:
            return self.cost.overlapped_seconds
        if self.xla_seconds and self.xla_seconds > 0:
            return max(self.xla_seconds * self.loop_factor, 0.0 if self.mode == "draft" else self.stream_seconds)
        return self.roofline_seconds

    @property
    def time_source(self) -> str:
        if self.cost is not None:
            return "cost model: max(compute, HBM, ICI), all overlapped"
        if self.xla_seconds and self.xla_seconds > 0:
            return "XLA optimal_seconds x loop factor"
        return "roofline, XLA gave no usable estimate"


def bytes_per_device(abstract_tree, sharding_tree) -> int:
    total = 0
    for value, placed in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(sharding_tree)):
        total += math.prod(placed.shard_shape(value.shape)) * np.dtype(value.dtype).itemsize
    return total


def _with_shardings(abstract_tree, sharding_tree):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, sharding_tree)


def build_mesh(cfg, topology: Topology):
    devices = topology_devices(topology)
    try:
        return make_mesh(cfg.mesh, devices)
    except ConfigError as e:
        raise PlanError(f"mesh {dataclasses.asdict(cfg.mesh)} on {topology.name} ({len(devices)} devices): {e}") from None


def batch_shards(mesh, rules) -> int:
    return math.prod(mesh.shape[a] for a in rules.batch)


SEQ_SHARDED_CACHE = ("data", "fsdp", "expert")  # --search's second KV cache layout (sharding.cache_seq)


def compile_training_run(cfg, topology: Topology, cost_model: bool = False, largest_buffers: int = 5) -> PlanResult:
    """The train step `train.py` would run with `cfg`, compiled for `topology` (`train.py --aot`):
    `train.batch_size` rows of `train.seq_len` tokens, its optimizer, gradient accumulation and
    loss (`train.loss_vocab_chunk` included), on its mesh and sharding rules, with the Pallas
    kernels compiled by Mosaic where `model.kernel_mode` is auto (as on a TPU)."""
    if cfg.train.mode == "mopd":
        raise PlanError("train.py --aot compiles the lm and mtp_distill step; a MOPD step also samples rollouts")
    if cfg.model.kernel_mode == "auto":
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kernel_mode="mosaic"))
    if cfg.model.kernel_mode != "mosaic":
        raise PlanError("model.kernel_mode must be auto or mosaic when compiling for TPU")
    return compile_plan(cfg, topology, "train", cfg.train.seq_len, cfg.train.batch_size, cost_model=cost_model,
                        largest_buffers=largest_buffers)


def compile_plan(cfg, topology: Topology, mode: str, seq_len: int, global_batch: int | None, *,
                 prefill_chunk: int | None = None, num_draft: int = 0, cost_model: bool = False,
                 largest_buffers: int = 5, weights: str | None = None) -> PlanResult:
    """Lowers and compiles the step for the topology and reads the compiler's figures, with the
    `largest_buffers` biggest HBM buffers of XLA's buffer assignment; with `cost_model`, a step
    that compiled is also costed by `mimo_jax.plan.cost` (more compiles).

    train: one optimizer step; prefill: the last `prefill_chunk`-token chunk (default
    DEFAULT_PREFILL_CHUNK, at most `seq_len`) of a prompt into a `seq_len`-token KV cache; decode:
    one step of 1 (or `num_draft` + 1) tokens per sequence with a full `seq_len`-token cache.
    `weights="fp8"` plans FP8-resident weights (inference modes), as `load_hf(..., weights="fp8")`
    loads them."""

    model_cfg = cfg.model
    query_len = step_query_len(mode, seq_len, prefill_chunk, num_draft, model_cfg)
    mesh = build_mesh(cfg, topology)
    rules = cfg.sharding
    devices = mesh.devices.size
    shards = batch_shards(mesh, rules)
    batch = global_batch or shards
    result = PlanResult(mode=mode, topology=topology.name, chips=topology.chips, devices=devices,
                        mesh=dict(mesh.shape), remat=model_cfg.remat, capacity_factor=model_cfg.moe_capacity_factor,
                        global_batch=batch, seq_len=seq_len, query_len=query_len, num_draft=num_draft,
                        weights=weights or model_cfg.param_dtype,
                        hand={} if mode == "draft" else hand_flops_per_token(model_cfg, seq_len, mode, query_len))
    if batch % shards:
        result.notes.append(f"global batch {batch} does not divide over the {shards} batch shards "
                            f"({'x'.join(rules.batch)}): the batch is replicated, every device computes it all")
    if "expert" in mesh.shape and model_cfg.num_experts % mesh.shape["expert"]:
        raise PlanError(f"expert axis {mesh.shape['expert']} does not divide {model_cfg.num_experts} experts")

    build = functools.partial(build_step, weights=weights)
    step, args, state = build(cfg, mesh, mode, batch, seq_len, query_len, num_draft)
    result.params_bytes, result.opt_bytes, result.cache_bytes, result.rest_bytes = (
        state["params"], state.get("opt_state", 0), state.get("cache", 0), state["rest"])
    if mode == "draft":
        result.notes.append(f"the {num_draft} MTP drafting passes of a speculative round ({query_len} positions "
                            f"per head, then the lm_head at the last): add the verify step (--mode decode "
                            f"--num-draft {num_draft}) for a round")
    if mode != "train":
        result.cache_seq = rules.cache_seq
        result.cache_spec = state["cache_spec"]
        if num_draft and mode == "decode":
            result.notes.append(f"verify step: {query_len} tokens per sequence through the main model; the cache "
                                f"holds the MTP heads' rings too, but the {num_draft} drafting passes are not compiled "
                                f"(--mode draft compiles them)")

    t0 = time.perf_counter()
    traced = step.trace(*args)
    result.traced_flops = jaxpr_flops(traced.jaxpr)
    try:
        compiled, result.largest_buffers = compile_reading_buffers(traced.lower(), largest_buffers)
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
    if cost_model:
        try:
            result.cost = estimate_cost(cfg, topology, mesh, mode, batch, seq_len, query_len, num_draft, build,
                                        device_share(result, topology),
                                        progress=lambda m: print(m, file=sys.stderr, flush=True))
        except jax.errors.JaxRuntimeError as e:  # a probe refused: the plan stands without the estimate
            result.notes.append("cost model: a probe did not compile: " + " ".join(str(e).split())[:200])
    return result


def build_step(cfg, mesh, mode: str, batch: int, seq_len: int, query_len: int, num_draft: int = 0,
               weights: str | None = None):
    """(jitted step, its abstract sharded arguments, per-device state bytes by kind) for one
    training step (`cfg.train`'s optimizer, accumulation and loss) or one cached model call, the
    latter with FP8-resident weights where `weights="fp8"`."""
    model_cfg, rules = cfg.model, cfg.sharding
    graphdef, params, rest = abstract_state(model_cfg, mode, weights)
    state = {}
    if mode == "train":
        batch_shape = (batch, seq_len)
        tx = make_optimizer(cfg.train, params)
        step, shardings = sharded_train_step(graphdef, params, rest, tx, mesh, rules, batch_shape, cfg.train)
        opt_state = jax.eval_shape(tx.init, params)
        ids = jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=shardings["batch"])
        args = (_with_shardings(params, shardings["params"]), _with_shardings(opt_state, shardings["opt_state"]),
                _with_shardings(rest, shardings["rest"]), ids, ids)
        state["opt_state"] = bytes_per_device(opt_state, shardings["opt_state"])
    elif mode == "draft":
        step, shardings, decode_state = _sharded_draft_step(graphdef, params, rest, model_cfg, mesh, rules, batch,
                                                            seq_len, num_draft)
        args = (_with_shardings(params, shardings["params"]), _with_shardings(rest, shardings["rest"]),
                _with_shardings(decode_state, shardings["state"]))
        state["cache"] = bytes_per_device(decode_state.cache, shardings["state"].cache)
        state["cache_spec"] = _largest_cache_buffer(decode_state.cache, shardings["state"].cache)
    else:
        cache = abstract_cache(model_cfg, batch, seq_len, num_draft)
        logits_at = 1 if mode == "prefill" else query_len
        step, shardings = _sharded_cached_step(graphdef, params, rest, cache, mesh, rules, (batch, query_len), logits_at,
                                               model_cfg.vocab_size)
        ids = jax.ShapeDtypeStruct((batch, query_len), jnp.int32, sharding=shardings["batch"])
        args = (_with_shardings(params, shardings["params"]), _with_shardings(rest, shardings["rest"]),
                _with_shardings(cache, shardings["cache"]), ids, ids)
        state["cache"] = bytes_per_device(cache, shardings["cache"])
        state["cache_spec"] = _largest_cache_buffer(cache, shardings["cache"])
    state["params"] = bytes_per_device(params, shardings["params"])
    state["rest"] = bytes_per_device(rest, shardings["rest"])
    return step, args, state


def abstract_state(model_cfg, mode: str, weights: str | None = None):
    """(graphdef, params, rest) as ShapeDtypeStructs; with `weights="fp8"` the quantised weights
    are FP8-resident (`hf_io.fp8_resident_params`), which only the inference modes take."""
    graphdef, params, rest = abstract_model_state(model_cfg)
    if weights == "fp8":
        if mode == "train":
            raise PlanError("FP8-resident weights (--weights fp8) are for inference: plan --mode prefill or decode")
        params = fp8_resident_params(params, abstract_model(model_cfg).plan)
    elif weights is not None:
        raise PlanError(f"--weights {weights!r}: expected fp8 (or none: model.param_dtype)")
    return graphdef, params, rest


_REPORT_LINE = re.compile(r"^\s*[\d.]+\w*\(\s*\d+%\);\s*([\d.]+)(B|KiB|MiB|GiB|TiB);\s*\d+;\s*\d+;\s*(.*)$")
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def compile_reading_buffers(lowered, top: int):
    """(compiled, the `top` largest buffers [(bytes, shapes sharing it)]) of XLA's buffer
    assignment: parameters, outputs and slices of the temporaries, per device."""
    if not top:
        return lowered.compile(), []
    with tempfile.TemporaryDirectory() as dump:
        compiled = lowered.compile(compiler_options={"xla_dump_to": dump})
        reports = [open(path).read() for path in glob.glob(os.path.join(dump, "*memory-usage-report.txt"))]
    return compiled, largest_buffers(max(reports, key=len, default=""), top)


def largest_buffers(memory_usage_report: str, top: int) -> list[tuple[int, str]]:
    """The `top` largest entries of an XLA memory-usage report (from `xla_dump_to`)."""
    found = []
    for line in memory_usage_report.splitlines():
        m = _REPORT_LINE.match(line)
        if m:
            found.append((int(float(m.group(1)) * _UNITS[m.group(2)]), m.group(3).strip()))
    return sorted(found, key=lambda entry: -entry[0])[:top]


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
    cost = xla_cost(compiled)
    result.flops_per_device = float(cost.get("flops", float("nan")))
    result.bytes_accessed_per_device = float(cost.get("bytes accessed", float("nan")))
    xla = cost.get("optimal_seconds")
    result.xla_seconds = float(xla) if xla is not None else None
    per_chip = device_share(result, topology)
    peak = topology.chip.peak_tflops * 1e12 * per_chip
    bandwidth = topology.chip.hbm_gbps * 1e9 * per_chip
    # Both counts with loop bodies multiplied out: flops from the traced program, bytes scaled alike.
    flops = max(result.flops_per_device, result.traced_flops.get("total", 0.0) / result.devices)
    result.stream_seconds = (result.params_bytes + result.rest_bytes + result.cache_bytes) / bandwidth
    # The loop factor is a flop ratio, so the scaled bytes can fall below the state read once: the floor
    # (not for the drafting passes, which read the MTP heads and the embeddings only).
    result.roofline_seconds = max(flops / peak, result.bytes_accessed_per_device * result.loop_factor / bandwidth,
                                  0.0 if result.mode == "draft" else result.stream_seconds)
    result.hbm_bytes = topology.chip.hbm_gib * GIB * per_chip
    result.fits = result.peak_bytes <= result.hbm_bytes


def device_share(result: PlanResult, topology: Topology) -> float:
    """The part of a chip one device is: 1, or 1/2 where libtpu lists each TensorCore (v4)."""
    return topology.chips / result.devices


def step_query_len(mode: str, seq_len: int, prefill_chunk: int | None, num_draft: int, model_cfg) -> int:
    if mode == "draft":
        if prefill_chunk is not None:
            raise PlanError("--prefill-chunk needs --mode prefill")
        try:
            model_cfg.check_num_draft(num_draft)
        except ValueError as e:
            raise PlanError(f"--mode draft needs --num-draft in 1..{model_cfg.num_mtp_heads}: {e}") from None
        return 2 * num_draft  # each head rewrites positions p - 2D + 1 .. p (mimo_jax.inference.draft)
    if num_draft and mode != "decode":
        raise PlanError("--num-draft plans the speculative verify step (--mode decode) or its drafts (--mode draft)")
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
        if num_draft:
            try:
                model_cfg.check_num_draft(num_draft)
            except ValueError as e:
                raise PlanError(f"--num-draft must be in 0..{model_cfg.num_mtp_heads} (0: plain decode): {e}") from None
        if num_draft + 1 > seq_len:
            raise PlanError(f"--seq-len {seq_len} is shorter than the {num_draft + 1} tokens of a step")
        return num_draft + 1
    raise PlanError(f"unknown mode {mode!r} (train, prefill, decode or draft)")


def abstract_cache(model_cfg, batch: int, seq_len: int, num_draft: int = 0):
    """The KV cache of `batch` sequences of `seq_len` tokens as ShapeDtypeStructs (the MTP heads'
    rings too when drafting)."""

    return jax.eval_shape(lambda: init_cache(model_cfg, batch, seq_len, num_draft=num_draft, mtp=num_draft > 0))


def cache_shardings(cache, mesh, rules):
    """NamedShardings for a `kv_cache.KVCache` from the `cache_*` rules: K/V buffers
    [..., B, S, K, D] by `kv_cache.CACHE_AXES` (the stacked-layer or MTP-head dims replicated), the
    slot positions [B, R] by batch."""
    def by(axes):
        return lambda x: NamedSharding(mesh, logical_spec((None,) * (x.ndim - len(axes)) + tuple(axes), rules, mesh,
                                                          x.shape))

    kv = by(CACHE_AXES)
    positions = by(("cache_batch", None))
    return cache.replace(
        layers=jax.tree.map(kv, cache.layers), ring_positions=positions(cache.ring_positions),
        mtp=None if cache.mtp is None else jax.tree.map(kv, cache.mtp),
        mtp_positions=None if cache.mtp_positions is None else positions(cache.mtp_positions))


def _model_shardings(params, rest, mesh, rules) -> dict:
    return {"params": sharding.state_shardings(params, mesh, rules), "rest": sharding.state_shardings(rest, mesh, rules)}


def _largest_cache_buffer(cache, cache_shardings) -> str:
    largest = max(zip(jax.tree.leaves(cache), jax.tree.leaves(cache_shardings)), key=lambda c: c[0].size)
    return f"{list(largest[0].shape)} as {largest[1].spec}"


def _sharded_draft_step(graphdef, params, rest, model_cfg, mesh, rules, batch: int, seq_len: int, num_draft: int):
    """`mimo_jax.inference.draft` on a decode state of `batch` sequences with `seq_len`-token caches
    (the MTP heads' rings included): the drafting half of a speculative round. The state's per-row
    arrays split by the cache_batch rule, the cache by the cache rules; the state is donated."""
    decode_state = jax.eval_shape(lambda: inference.new_state(abstract_model(model_cfg), batch, seq_len,
                                                              num_draft=num_draft))

    def by_rows(x):
        axes = ("cache_batch",) + (None,) * (len(x.shape) - 1)
        return NamedSharding(mesh, logical_spec(axes, rules, mesh, x.shape))

    state_shardings = jax.tree.map(by_rows, decode_state).replace(cache=cache_shardings(decode_state.cache, mesh, rules))
    shardings = {**_model_shardings(params, rest, mesh, rules), "state": state_shardings}

    def step(params, rest, decode_state):
        with sharding.activate(mesh, rules):
            return inference.draft(nnx.merge(graphdef, params, rest), decode_state, num_draft)

    jitted = jax.jit(step, in_shardings=(shardings["params"], shardings["rest"], state_shardings),
                     out_shardings=state_shardings, donate_argnums=(2,), keep_unused=True)
    return jitted, shardings, decode_state


def _sharded_cached_step(graphdef, params, rest, cache, mesh, rules, batch_shape, logits_at: int, vocab: int):
    """One cached model call on [B, T] tokens at the given positions: returns the logits of the
    last `logits_at` positions ([B, logits_at, V], fp32) and the updated cache (donated)."""

    shardings = {
        **_model_shardings(params, rest, mesh, rules),
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
