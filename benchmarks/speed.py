"""The speed table: our figures beside their comparisons, measured side by side in one process.

    python benchmarks/speed.py --out docs/speed.md    # the table of docs/speed.md (10-15 minutes on 2 quiet cores)
    python benchmarks/speed.py --quick                # a smoke run at reduced sizes (under 2 minutes)
    python benchmarks/speed.py --only gmm,attention   # some sections, at full size

Sections (--only), each row giving ours, the comparison, the ratio, the target and PASS/MISS:
  forward    forward tokens/s of a 174M-parameter MoE in the release's architecture against
             transformers' eager PyTorch on the same weights (the logits are compared too)
  gmm        grouped-matmul GFLOP/s of the default off-TPU path (blocked_gmm) against one batched
             einsum of the same work; ragged_dot beside it
  attention  sliding-window (W=128) attention forward+backward from T=512 to 4096: does the time
             grow linearly? The dense reference and causal attention beside it
  train      train-step useful FLOP/s of a 98M-parameter MoE against this machine's fp32 matmul peak
             (a 2048x2048 matmul, measured in the same run)
  decode     greedy decode tokens/s of the tiny model against transformers' `generate` (batch 1, 8)

Every time is the median of several calls after an untimed warm-up call with the same shapes (it
compiles), with jax.block_until_ready. Only a full run of every section writes docs/speed.md by
default; a --quick or --only run goes to runs/speed.md unless --out says otherwise, and a --quick
table never goes to docs/speed.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from importlib.metadata import version

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(1, HERE)  # benchmarks/decode.py, whose decode timers the decode rows reuse

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from machine import cpu_name  # noqa: E402  (benchmarks/machine.py)

from mimo_jax.attention import attention  # noqa: E402
from mimo_jax.config import ModelConfig, TrainConfig, load_config, release_layer_types, release_mlp_types  # noqa: E402
from mimo_jax.flops import hand_flops_per_token, jaxpr_flops  # noqa: E402
from mimo_jax.model import MiMoV2Flash, abstract_model  # noqa: E402
from mimo_jax.moe import grouped_matmul  # noqa: E402
from mimo_jax.params import count_params  # noqa: E402
from mimo_jax.train_step import make_optimizer, train_step_fn  # noqa: E402

SECTIONS = ("forward", "gmm", "attention", "train", "decode")
REAL_TABLE = "docs/speed.md"
SCRATCH_TABLE = "runs/speed.md"  # where --quick and --only runs go by default
# What CI runs of the command in docs/speed.md (tests/test_docs.py runs every bash block of docs/).
DOC_TEST_FORM = f"python benchmarks/speed.py --quick --only gmm --out {SCRATCH_TABLE}"
WINDOW = 128  # the release's sliding window
PEAK_N = 2048  # the matmul that stands for this machine's peak
DECODE_TARGETS = {1: 5.0, 8: 3.0}  # at least this many times transformers' generate, by batch
LOGITS_ATOL = 1e-3  # ours and transformers' fp32 logits agree to this (relative to the largest logit)
TIME_BUDGET_S = 10.0  # a measurement stops repeating (past min_repeats) once its timed calls took this long


@dataclasses.dataclass(frozen=True)
class Sizes:
    min_repeats: int  # timed calls of every measurement, at least
    max_repeats: int  # at most, while the timed calls so far took under TIME_BUDGET_S
    forward_layers: int
    forward_experts: int
    forward_batch: int
    forward_seq: int
    gmm_rows: int
    gmm_experts: int
    attention_lengths: tuple[int, ...]
    train_layers: int
    train_experts: int
    train_batch: int
    train_seq: int
    decode_prompt: int
    decode_new: int
    decode_batches: tuple[int, ...]


FULL = Sizes(min_repeats=3, max_repeats=10, forward_layers=13, forward_experts=32, forward_batch=4, forward_seq=512,
             gmm_rows=8192, gmm_experts=32, attention_lengths=(512, 1024, 2048, 4096), train_layers=13,
             train_experts=16, train_batch=4, train_seq=512, decode_prompt=64, decode_new=256, decode_batches=(1, 8))
QUICK = Sizes(min_repeats=1, max_repeats=2, forward_layers=2, forward_experts=8, forward_batch=1, forward_seq=128,
              gmm_rows=1024, gmm_experts=8, attention_lengths=(128, 256), train_layers=2, train_experts=8,
              train_batch=1, train_seq=128, decode_prompt=16, decode_new=16, decode_batches=(1,))

_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:6.0f}s] {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Row:
    measurement: str
    ours: str
    comparison: str
    ratio: str
    target: str = "-"
    result: str = "context"  # PASS / MISS where there is a target

    def markdown(self) -> str:
        cells = (self.measurement, self.ours, self.comparison, self.ratio, self.target, self.result)
        return "| " + " | ".join(cells) + " |"


def judged(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def median_seconds(run, sizes: Sizes, *, warmup: bool = True, max_repeats: int | None = None) -> float:
    """Median wall time of `run()`, after one untimed call with the same shapes (it compiles) unless
    `warmup` is False (the caller compiled ahead of time). Slow calls get sizes.min_repeats timed
    calls, fast ones more, up to sizes.max_repeats (or `max_repeats`) within TIME_BUDGET_S."""
    if warmup:
        jax.block_until_ready(run())
    most = sizes.max_repeats if max_repeats is None else max_repeats
    times = []
    while len(times) < most and (len(times) < sizes.min_repeats or sum(times) < TIME_BUDGET_S):
        start = time.perf_counter()
        jax.block_until_ready(run())  # torch results pass through: torch on CPU is synchronous
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def random_ids(batch: int, seq: int, vocab: int, seed: int = 0):
    return np.random.default_rng(seed).integers(3, vocab, (batch, seq), dtype=np.int32)


# --------------------------------------------------------------------------- the machine


def machine_lines(torch_threads: int | None) -> list[str]:
    cpu = cpu_name()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    # Other processes' load skews every figure (torch's threads suffer most): say how busy it was.
    load = "load average {:.1f} {:.1f} {:.1f} at the start".format(*os.getloadavg())
    return [
        f"- machine: {cpu}, {os.cpu_count()} cores, {load}; jax sees {jax.device_count()} {jax.default_backend()} "
        "device(s)",
        f"- jax {jax.__version__}, torch {version('torch')}"
        + (f" ({torch_threads} threads)" if torch_threads else "")
        + f", transformers {version('transformers')}, Python {platform.python_version()}",
        f"- date: {date}",
    ]


def torch_on_all_cores() -> int:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    return torch.get_num_threads()


# --------------------------------------------------------------------------- configurations


def moe_config(layers: int, experts: int, **overrides) -> ModelConfig:
    """The release's architecture (its layer pattern, SWA window, sinks, partial RoPE, value scale,
    sigmoid top-k routing, dense first layer) at width 512: 8 heads of dim 96 (q/k and v alike) over
    2 kv heads in the SWA layers and 1 in the global ones (transformers hard-codes the release's
    SWA = 2 x global kv heads, so 2 and 2 would not load there), experts of width 256 (the release's
    hidden/2), top-4, vocabulary 8192, fp32, and no MTP heads (transformers' model has none: a
    forward with them would do more work)."""
    return dataclasses.replace(
        ModelConfig(), vocab_size=8192, hidden_size=512, num_layers=layers, layer_types=release_layer_types(layers),
        mlp_types=release_mlp_types(layers), num_attention_heads=8, global_kv_heads=1, swa_kv_heads=2,
        qk_head_dim=96, v_head_dim=96, intermediate_size=1024, moe_intermediate_size=256, num_experts=experts,
        num_experts_per_token=4, sliding_window=WINDOW, num_mtp_heads=0, max_position_embeddings=4096,
        dtype="float32", param_dtype="float32", eos_token_id=None, pad_token_id=0, **overrides)


def describe(cfg: ModelConfig) -> str:
    counts = count_params(cfg)
    return (f"{counts['main'] / 1e6:.1f}M parameters ({counts['main']:,}; {counts['active'] / 1e6:.1f}M active per "
            f"token): {cfg.num_layers} layers ({cfg.layer_types.count('global')} global), hidden {cfg.hidden_size}, "
            f"{cfg.num_attention_heads} heads / {cfg.swa_kv_heads} kv heads (SWA; {cfg.global_kv_heads} global), "
            f"head dim {cfg.qk_head_dim} (q/k) {cfg.v_head_dim} (v), dense FFN {cfg.intermediate_size}, "
            f"{cfg.num_experts} experts top-{cfg.num_experts_per_token} of width {cfg.moe_intermediate_size}, "
            f"vocab {cfg.vocab_size}, window {cfg.sliding_window}, fp32")


def with_impls(cfg: ModelConfig, **impls):
    """The graphdef of the same model with other kernels (impls are static, read at construction)."""
    cfg = dataclasses.replace(cfg, **impls)
    return nnx.split(abstract_model(cfg))[0]


# --------------------------------------------------------------------------- 1. forward


def forward_rows(sizes: Sizes, notes: list[str]) -> list[Row]:
    import torch
    from transformers import MiMoV2FlashForCausalLM

    from mimo_jax import save_hf

    cfg = moe_config(sizes.forward_layers, sizes.forward_experts)
    b, t = sizes.forward_batch, sizes.forward_seq
    log(f"forward: building {describe(cfg)}")
    model = MiMoV2Flash(cfg, rngs=nnx.Rngs(0))
    _, state = nnx.split(model)
    ids_BT = random_ids(b, t, cfg.vocab_size)
    ids = jnp.asarray(ids_BT)

    def ours(timing: dict, **impls):
        graphdef = with_impls(cfg, **impls)
        forward = jax.jit(lambda state, ids_BT: nnx.merge(graphdef, state)(ids_BT, logits=True).logits)
        start = time.perf_counter()
        compiled = forward.lower(state, ids).compile()
        log(f"forward: compiled in {time.perf_counter() - start:.0f} s")
        return compiled(state, ids), median_seconds(lambda: compiled(state, ids), sizes, **timing)

    log("forward: ours, default impls (auto)")
    logits_BTV, default_s = ours({})
    log("forward: ours, attention_impl=dense moe_impl=ragged_dot (one timed call: ragged_dot is slow here)")
    _, old_s = ours(dict(warmup=False, max_repeats=1), attention_impl="dense", moe_impl="ragged_dot")

    log("forward: transformers eager (export, load, run)")
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, tmp)
        hf = MiMoV2FlashForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager").eval()
    ids_torch = torch.as_tensor(ids_BT, dtype=torch.long)
    with torch.no_grad():
        hf_logits = hf(input_ids=ids_torch, use_cache=False).logits
        hf_s = median_seconds(lambda: hf(input_ids=ids_torch, use_cache=False).logits, sizes)
    diff = float(np.max(np.abs(np.asarray(logits_BTV) - hf_logits.numpy())))
    scale = float(np.max(np.abs(hf_logits.numpy())))
    experts_impl = getattr(hf.config, "_experts_implementation", None) or "its default"
    del hf
    notes.append(f"Forward model: {describe(cfg)}. Batch {b} x {t} tokens, logits of every position. "
                 f"transformers: attn_implementation=eager, experts implementation {experts_impl}, "
                 f"torch.no_grad, {torch.get_num_threads()} threads. Same model: max |logits ours - transformers| "
                 f"= {diff:.2e} (largest logit {scale:.2f}). The old-defaults row is one timed call after an "
                 "ahead-of-time compile (ragged_dot lowers to one dense pass per expert on CPU: a call takes minutes).")
    log(f"forward: max abs logits diff {diff:.2e}")

    tokens = b * t
    hf_cell = f"{tokens / hf_s:,.0f} tok/s (transformers eager)"
    same_model = diff <= LOGITS_ATOL * max(1.0, scale)
    return [
        Row(f"forward tok/s, {count_params(cfg)['main'] / 1e6:.0f}M MoE, {b}x{t}, default impls (attention_impl=auto "
            f"-> {cfg.resolved_attention_impl}, moe_impl=auto -> {cfg.resolved_moe_impl})",
            f"{tokens / default_s:,.0f} tok/s", hf_cell, f"{hf_s / default_s:.2f}x", ">= 3x",
            judged(hf_s / default_s >= 3) if same_model else "INVALID: the logits differ"),
        Row("forward tok/s, same, old defaults (attention_impl=dense, moe_impl=ragged_dot)",
            f"{tokens / old_s:,.0f} tok/s", hf_cell, f"{hf_s / old_s:.2f}x"),
    ]


# --------------------------------------------------------------------------- 2. grouped matmul


def gmm_rows(sizes: Sizes, notes: list[str]) -> list[Row]:
    m, g, k, n = sizes.gmm_rows, sizes.gmm_experts, 512, 256
    rng = np.random.default_rng(0)
    group_sizes_G = jnp.asarray(rng.multinomial(m, np.full(g, 1 / g)), jnp.int32)
    lhs_MK = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    rhs_GKN = jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), jnp.float32)
    d_out_MN = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    sizes_G = np.asarray(group_sizes_G)
    notes.append(f"Grouped matmul: {m} rows, {g} groups (multinomial sizes {sizes_G.min()}-{sizes_G.max()}), "
                 f"{k} -> {n}, fp32; the einsum runs the same flops as [{g}, {m // g}, {k}] x [{g}, {k}, {n}]. "
                 "Forward+backward is the gradient with respect to both operands (3x the forward's flops).")
    matmuls = {
        "blocked_gmm": lambda lhs, rhs, gs: grouped_matmul(lhs, rhs, gs, impl="xla"),
        "ragged_dot": lambda lhs, rhs, gs: grouped_matmul(lhs, rhs, gs, impl="ragged_dot"),
        # The same work as one batched matmul: equal groups, the layout a dense expert batch would have.
        "einsum": lambda lhs, rhs, gs: jnp.einsum("gmk,gkn->gmn", lhs.reshape(g, m // g, k), rhs).reshape(m, n),
    }

    def forward(matmul):
        return jax.jit(matmul)

    def forward_backward(matmul):
        return jax.jit(jax.grad(lambda lhs, rhs, gs: jnp.sum(matmul(lhs, rhs, gs) * d_out_MN), argnums=(0, 1)))

    rows = []
    for label, make, flops in (("forward", forward, 2 * m * k * n),
                               ("forward+backward", forward_backward, 6 * m * k * n)):
        gflops = {}
        for name, matmul in matmuls.items():
            log(f"gmm: {name} {label}")
            fn = make(matmul)
            gflops[name] = flops / median_seconds(lambda: fn(lhs_MK, rhs_GKN, group_sizes_G), sizes) / 1e9
        einsum_cell = f"{gflops['einsum']:.1f} GFLOP/s (batched einsum)"
        ratio = gflops["blocked_gmm"] / gflops["einsum"]
        rows.append(Row(f"grouped matmul GFLOP/s, {m}x{g}x{k}->{n}, {label}, blocked_gmm (impl=xla, the default)",
                        f"{gflops['blocked_gmm']:.1f} GFLOP/s", einsum_cell, f"{ratio:.2f}", ">= 0.5",
                        judged(ratio >= 0.5)))
        rows.append(Row(f"grouped matmul GFLOP/s, same, {label}, ragged_dot", f"{gflops['ragged_dot']:.1f} GFLOP/s",
                        einsum_cell, f"{gflops['ragged_dot'] / gflops['einsum']:.2f}"))
    return rows


# --------------------------------------------------------------------------- 3. attention


def attention_seconds(t: int, window, impl: str, sizes: Sizes) -> float | None:
    """Forward+backward seconds of self-attention at B=1, H=8, K=2, d 192/128, sinks on; None where
    `impl` does not exist."""
    rng = np.random.default_rng(t)
    b, h, kv, dqk, dv = 1, 8, 2, 192, 128
    q_BTHD, k_BTKD = (jnp.asarray(rng.standard_normal((b, t, n, dqk)), jnp.float32) for n in (h, kv))
    v_BTKV = jnp.asarray(rng.standard_normal((b, t, kv, dv)), jnp.float32)
    sinks_H = jnp.asarray(rng.standard_normal(h), jnp.float32)
    d_out_BTHV = jnp.asarray(rng.standard_normal((b, t, h, dv)), jnp.float32)
    positions_BT = jnp.broadcast_to(jnp.arange(t), (b, t))

    def loss(q, k, v, sinks, pos):
        # One positions object for queries and keys: how the seam knows this is self-attention.
        out = attention(q, k, v, sinks, window=window, q_positions=pos, kv_positions=pos, segment_ids=None, impl=impl)
        return jnp.sum(out * d_out_BTHV)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    try:
        return median_seconds(lambda: grads(q_BTHD, k_BTKD, v_BTKV, sinks_H, positions_BT), sizes)
    except ValueError as e:  # an impl this checkout does not have yet
        log(f"attention: impl={impl!r} unavailable ({e})")
        return None


def attention_rows(sizes: Sizes, notes: list[str]) -> list[Row]:
    lengths = sizes.attention_lengths
    notes.append(f"Attention: B=1, H=8 over 2 kv heads, d_qk 192, d_v 128, sinks on, fp32, window {WINDOW}; "
                 "forward+backward is the gradient with respect to q, k, v and the sinks. impl=dense is timed "
                 "once per T, with the window: it computes the full [T, T] scores whatever the mask, so the "
                 "causal rows compare against the same figure.")
    seconds = {}
    for kind, window, impl in (("swa", WINDOW, "xla"), ("causal", None, "xla"), ("dense", WINDOW, "dense")):
        for t in lengths:
            log(f"attention: {kind} impl={impl} T={t}")
            seconds[kind, t] = attention_seconds(t, window, impl, sizes)

    def cell(kind, t):
        return "n/a" if seconds[kind, t] is None else f"{1e3 * seconds[kind, t]:,.1f} ms"

    def ratio(numerator, denominator):
        return "n/a" if None in (numerator, denominator) else numerator / denominator

    rows = []
    for kind, label in (("swa", f"SWA W={WINDOW}"), ("causal", "causal")):
        for t in lengths:
            speedup = ratio(seconds["dense", t], seconds[kind, t])
            rows.append(Row(f"{label} attention fwd+bwd, T={t}, impl=xla", cell(kind, t),
                            f"{cell('dense', t)} (impl=dense)", speedup if speedup == "n/a" else f"{speedup:.2f}x"))
        if kind == "swa":
            first, last = lengths[0], lengths[-1]
            linear = last / first
            growth = seconds["swa", last] / seconds["swa", first]
            dense = ratio(seconds["dense", last], seconds["dense", first])
            rows.append(Row(f"SWA W={WINDOW} fwd+bwd time growth T={first} -> {last} (impl=xla)", f"{growth:.1f}x",
                            dense if dense == "n/a" else f"{dense:.1f}x (impl=dense)",
                            f"{growth / linear:.2f} of linear",
                            f"<= {1.25 * linear:g}x ({linear:g}x is linear)", judged(growth <= 1.25 * linear)))
    return rows


# --------------------------------------------------------------------------- 4. train step


def matmul_peak_gflops(sizes: Sizes) -> float:
    rng = np.random.default_rng(0)
    a_NN, b_NN = (jnp.asarray(rng.standard_normal((PEAK_N, PEAK_N)), jnp.float32) for _ in range(2))
    matmul = jax.jit(jnp.matmul)
    return 2 * PEAK_N**3 / median_seconds(lambda: matmul(a_NN, b_NN), sizes) / 1e9


def train_rows(sizes: Sizes, notes: list[str]) -> list[Row]:
    log(f"train: peak, {PEAK_N}x{PEAK_N} fp32 matmul")
    peak = matmul_peak_gflops(sizes)
    cfg = moe_config(sizes.train_layers, sizes.train_experts)
    b, t = sizes.train_batch, sizes.train_seq
    log(f"train: building {describe(cfg)}")
    train = TrainConfig(batch_size=b, seq_len=t, warmup_steps=1)
    graphdef, params, rest = nnx.split(MiMoV2Flash(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    tx = make_optimizer(train, params)
    step = jax.jit(train_step_fn(graphdef, tx, train), donate_argnums=(0, 1))
    ids_BT = jnp.asarray(random_ids(b, t, cfg.vocab_size))
    seg_BT = jnp.ones((b, t), jnp.int32)
    carry = {"params": params, "opt_state": tx.init(params)}
    # training.py's flops_per_second: the traced step's matmul flops (scan bodies times their length).
    traced = jaxpr_flops(jax.make_jaxpr(step)(carry["params"], carry["opt_state"], rest, ids_BT, seg_BT))["total"]
    by_hand = hand_flops_per_token(cfg, t, "train")["total_causal"] * b * t

    def one_step():
        carry["params"], carry["opt_state"], metrics = step(carry["params"], carry["opt_state"], rest, ids_BT, seg_BT)
        return metrics["loss"]

    log("train: steps")
    seconds = median_seconds(one_step, sizes)
    notes.append(f"Train-step model: {describe(cfg)}. Batch {b} x {t}, AdamW (make_optimizer) in the jitted "
                 f"train_step_fn as train.py runs it; {seconds:.2f} s per step. Peak: a {PEAK_N}x{PEAK_N} fp32 "
                 f"jnp.matmul, {peak:.1f} GFLOP/s.")
    notes.append(f"Useful FLOPs per step: {traced / 1e9:,.1f} GFLOP, counted as training.py counts its "
                 "flops_per_second (flops.jaxpr_flops of the traced step: matmuls, scan bodies times their length, "
                 "the grouped-matmul loops by their dropless work, elementwise work left out). By hand "
                 f"(flops.hand_flops_per_token(cfg, {t}, 'train')['total_causal'] x tokens: 6 x the parameters a "
                 f"token uses + causal/windowed attention): {by_hand / 1e9:,.1f} GFLOP"
                 + ("." if abs(traced / by_hand - 1) < 0.25 else ": the two disagree by more than 25%, so one "
                    "of the counts is off."))
    useful = traced / seconds / 1e9
    peak_cell = f"{peak:.1f} GFLOP/s (peak matmul)"
    return [
        Row(f"train step useful GFLOP/s, {count_params(cfg)['main'] / 1e6:.0f}M MoE, {b}x{t}", f"{useful:.1f} GFLOP/s",
            peak_cell, f"{useful / peak:.0%}", ">= 50%", judged(useful >= 0.5 * peak)),
        Row("train step GFLOP/s, same step, FLOPs counted by hand (flops.hand_flops_per_token)",
            f"{by_hand / seconds / 1e9:.1f} GFLOP/s", peak_cell, f"{by_hand / seconds / 1e9 / peak:.0%}"),
    ]


# --------------------------------------------------------------------------- 5. decode


def decode_rows(sizes: Sizes, notes: list[str]) -> list[Row]:
    from decode import held_out_prompts, time_generate, time_transformers

    from mimo_jax.training import load_checkpoint

    workdir = "runs/tiny"
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        source = f"the trained {workdir}, held-out prompts"
        model = load_checkpoint(workdir)
        prompts = held_out_prompts(workdir, max(sizes.decode_batches), sizes.decode_prompt)
    else:
        source = "configs/tiny.yaml, random init (no runs/tiny), random prompts"
        model = MiMoV2Flash(load_config("tiny").model, rngs=nnx.Rngs(0))
        prompts = random_ids(max(sizes.decode_batches), sizes.decode_prompt, model.config.vocab_size).tolist()
    notes.append(f"Decode model: {source}; {sizes.decode_prompt}-token prompts, {sizes.decode_new} new tokens, "
                 "greedy, plain decoding (no speculation). transformers' generate: its default attention. Each side "
                 f"is the median of {sizes.min_repeats} timed calls, taken in turns (ours, then transformers, "
                 "benchmarks/decode.py's timers) so that a slower minute of a shared machine hits both.")
    rows = []
    for batch in sizes.decode_batches:
        log(f"decode: batch {batch}, ours and transformers in turns")
        ours, hf_runs = [], []
        for _ in range(sizes.min_repeats):
            ours.append(time_generate(model, prompts[:batch], sizes.decode_new, repeats=1))
            hf_runs.append(time_transformers(model, prompts[:batch], sizes.decode_new))
        ours_tps = float(np.median([tps for _, tps in ours]))
        hf_tps = float(np.median([tps for _, tps in hf_runs]))
        same = float(np.mean(hf_runs[0][0] == ours[0][0].tokens[:, sizes.decode_prompt:]))
        target = DECODE_TARGETS.get(batch, DECODE_TARGETS[max(DECODE_TARGETS)])
        rows.append(Row(f"greedy decode tok/s, tiny model, batch {batch} ({same:.0%} of tokens equal)",
                        f"{ours_tps:,.0f} tok/s", f"{hf_tps:,.0f} tok/s (transformers generate)",
                        f"{ours_tps / hf_tps:.2f}x", f">= {target:g}x", judged(ours_tps >= target * hf_tps)))
    return rows


# --------------------------------------------------------------------------- the table

ROWS = {"forward": forward_rows, "gmm": gmm_rows, "attention": attention_rows, "train": train_rows,
        "decode": decode_rows}


def render(rows: list[Row], notes: list[str], machine: list[str], command: str, quick: bool,
           sections: list[str] | None) -> str:
    title = "# Speed (generated by benchmarks/speed.py)"
    if quick:
        title += " - QUICK SMOKE RUN, reduced sizes: not the real table"
    if sections:
        title += f" - sections {', '.join(sections)} only"
    return "\n".join([
        title,
        "",
        "Ours beside the comparison, measured in one process on this machine. Times are medians of "
        "several calls after a warm-up call (compile excluded). The ratio is ours relative to the "
        "comparison as a speed (higher is better for ours), except in the growth row, where it is the "
        "time's growth relative to linear growth (1.00 is linear).",
        "",
        *machine,
        "",
        "Made with:",
        "",
        f"<!-- doc-test: reduced {DOC_TEST_FORM} -->",
        "```bash",
        command,
        "```",
        "",
        "| measurement | ours | comparison | ratio | target | result |",
        "|---|---|---|---|---|---|",
        *(row.markdown() for row in rows),
        "",
        *(f"- {note}" for note in notes),
        "",
    ])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--out", help=f"the markdown file to write (default {REAL_TABLE}; {SCRATCH_TABLE} with "
                        "--quick or --only)")
    parser.add_argument("--quick", action="store_true", help="reduced sizes and repeats: a smoke run, not the table")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {','.join(SECTIONS)}")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown sections {unknown}; choose from {','.join(SECTIONS)}")
    partial = set(sections) != set(SECTIONS)
    out = args.out or (SCRATCH_TABLE if args.quick or partial else REAL_TABLE)
    if args.quick and os.path.abspath(out) == os.path.abspath(REAL_TABLE):
        parser.error(f"a --quick run does not write {REAL_TABLE}; pass another --out")
    sizes = QUICK if args.quick else FULL

    torch_threads = torch_on_all_cores() if {"forward", "decode"} & set(sections) else None
    command = shlex.join(["python", "benchmarks/speed.py", *argv])
    machine = machine_lines(torch_threads)
    rows, notes, failed = [], [], []
    for section in SECTIONS:
        if section in sections:
            try:
                new_rows = ROWS[section](sizes, notes)
            except Exception as e:  # one broken section should not cost the others' minutes
                traceback.print_exc()
                failed.append(section)
                message = str(e).splitlines()[0].replace("|", "/") if str(e) else ""
                new_rows = [Row(f"{section}: failed", f"{type(e).__name__}: {message}", "-", "-", "-", "ERROR")]
            log("\n".join(row.markdown() for row in new_rows))
            rows += new_rows
    table = render(rows, notes, machine, command, args.quick, sections if partial else None)
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(table)
    log(f"wrote {out}" + (f"; sections that failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
