"""Kernel figures at the released model's shapes, compiled ahead of time for TPU chips.

    python benchmarks/kernels.py                  # v5e and v5p, all sections (about 5 minutes, 2 cores)
    python benchmarks/kernels.py --topologies v5p --sections attention
    python benchmarks/kernels.py --markdown docs/kernels_benchmark.md

For each kernel and shape it prints, beside jax's shipped baseline for the same work (splash
attention with LocalMask/CausalMask + sinks; megablox gmm):
  - blocks visited versus dense causal (attention),
  - the kernels' flops and HBM bytes from their own cost estimates (splash ships none: its figures
    are computed here from its 128x128 block structure),
  - XLA's cost analysis of the whole compiled program (flops, its time estimate) and HBM use,
  - VMEM per kernel (double-buffered blocks + scratch, tile-padded; see tpu_aot.pallas_kernels),
and the full train step of a reduced-depth model at full width compiled with the Pallas kernels.
On a GPU machine it also times the XLA paths GPU users run (the Pallas kernels are TPU kernels).
Nothing here runs on a TPU: figures are the compiler's, not measurements.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import mimo_jax  # noqa: E402,F401  (keeps libtpu quiet on a machine without a TPU)
from kernels_pallas.gmm import gmm  # noqa: E402
from kernels_pallas.swa_attention import _default_block_q, swa_attention, visited_blocks  # noqa: E402
from kernels_pallas.tpu_aot import compile_for_tpu, pallas_kernels  # noqa: E402

BF16 = jnp.bfloat16
HEADS, D_QK, D_V = 64, 192, 128
# (layer kind, kv heads, window): the release's two attention shapes.
ATTENTION_LAYERS = [("swa", 8, 128), ("global", 4, None)]
EXPERTS, TOP_K, HIDDEN, MOE_WIDTH, TOKENS = 256, 8, 4096, 2048, 4096


def _sds(shape, dtype=BF16):
    return jax.ShapeDtypeStruct(shape, dtype)


def _figures(fn, args, topology, resident_gib=False):
    """Kernel flops/bytes (the kernels' own cost estimates), VMEM, and XLA's view of the whole program."""
    t0 = time.perf_counter()
    compiled = compile_for_tpu(fn, *args, topology=topology)
    compile_s = time.perf_counter() - t0
    cost, mem = compiled.cost_analysis(), compiled.memory_analysis()
    kernels = pallas_kernels(fn, *args).values()
    hbm = mem.temp_size_in_bytes + (mem.argument_size_in_bytes if resident_gib else 0)
    return dict(compile_s=compile_s, flops=sum(k["flops"] for k in kernels), bytes=sum(k["bytes"] for k in kernels),
                est_ms=1e3 * cost.get("optimal_seconds", float("nan")), vmem_mib=max(k["vmem"] for k in kernels) / 2**20,
                hbm_gib=hbm / 2**30, program_gflop=cost["flops"] / 1e9)


def _with_grads(fn, argnums):
    def loss(*args):
        return fn(*args).astype(jnp.float32).sum()
    return jax.value_and_grad(loss, argnums=argnums)


def _splash(t, kv_heads, window):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    one = masks.LocalMask((t, t), (window, 0), 0) if window is not None else masks.CausalMask((t, t))
    kernel = splash.make_splash_mha_single_device(masks.MultiHeadMask([one] * HEADS))

    def attention(q, k, v, sinks):  # [B,T,H,D] like ours; splash wants [H,T,D] and unscaled logits
        def one_example(q, k, v):
            return kernel((q * D_QK**-0.5).transpose(1, 0, 2), k.transpose(1, 0, 2), v.transpose(1, 0, 2),
                          sinks=sinks).transpose(1, 0, 2)
        return jax.vmap(one_example)(q, k, v)
    return attention


def _splash_analytic(t, window, direction):
    """Splash's work from its block structure (128x128 blocks, every q head streams its K/V)."""
    visits = visited_blocks(t, t, window, 128, 128)[0]
    tiles = HEADS * visits * 128 * 128
    kv_stream = HEADS * visits * 128 * (D_QK + D_V) * 2
    q_and_o = t * HEADS * (D_QK + D_V) * 2
    if direction == "fwd":
        return dict(flops=2 * tiles * (D_QK + D_V), bytes=kv_stream + q_and_o)
    # dq kernel: QK^T, dO V^T, dS K; dkv kernel: QK^T, dO V^T, P^T dO, dS^T Q, re-reading q and dO per visit.
    return dict(flops=2 * tiles * (5 * D_QK + 4 * D_V), bytes=3 * kv_stream + 3 * q_and_o)


def attention_rows(topology, lengths):
    rows = []
    for t in lengths:
        for kind, kv_heads, window in ATTENTION_LAYERS:
            args = (_sds((1, t, HEADS, D_QK)), _sds((1, t, kv_heads, D_QK)), _sds((1, t, kv_heads, D_V)),
                    _sds((HEADS,), jnp.float32))
            block_q = _default_block_q(HEADS // kv_heads)
            visited, _ = visited_blocks(t, t, window, block_q, 128)
            dense = visited_blocks(t, t, None, block_q, 128)[0]  # dense causal at the same tiling

            def ours(q, k, v, sinks, window=window):
                return swa_attention(q, k, v, sinks, window=window)

            for label, fn in (("ours", ours), ("splash", _splash(t, kv_heads, window))):
                for direction, f in (("fwd", fn), ("fwd+bwd", _with_grads(fn, (0, 1, 2, 3)))):
                    fig = _figures(f, args, topology)
                    if label == "splash":  # it ships no cost estimate, so XLA cannot estimate its time either
                        fig.update(_splash_analytic(t, window, direction), est_ms=float("nan"))
                    rows.append(dict(kernel=f"attention {kind}", impl=label, shape=f"T={t} Hq={HEADS} Hkv={kv_heads} "
                                     f"W={window}", direction=direction, topology=topology,
                                     blocks=f"{visited}/{dense}" if label == "ours" else "", **fig))
                    print(_format_row(rows[-1]), flush=True)
    return rows


def gmm_rows(topology):
    from jax.experimental.pallas.ops.tpu.megablox import gmm as megablox_gmm

    rows = []
    m = TOKENS * TOP_K
    for k, n in ((HIDDEN, MOE_WIDTH), (MOE_WIDTH, HIDDEN)):
        args = (_sds((m, k)), _sds((EXPERTS, k, n)), _sds((EXPERTS,), jnp.int32))

        def theirs(lhs, rhs, sizes):
            return megablox_gmm(lhs, rhs, sizes, BF16, (128, 512, 512))

        for label, fn in (("ours", gmm), ("megablox", theirs)):
            for direction, f in (("fwd", fn), ("fwd+bwd", _with_grads(fn, (0, 1)))):
                fig = _figures(f, args, topology)
                rows.append(dict(kernel="gmm", impl=label, shape=f"M={m} G={EXPERTS} {k}->{n}", direction=direction,
                                 topology=topology, blocks="", **fig))
                print(_format_row(rows[-1]), flush=True)
    return rows


def train_step_rows(topology, seq_len, num_experts):
    """Loss, gradients and an AdamW update of a 2-layer model at full width (global dense + SWA MoE)."""
    import optax
    from flax import nnx

    from mimo_jax import load_config
    from mimo_jax.model import abstract_model

    overrides = [
        "model.num_layers=2", "model.layer_types=[global, swa]", "model.mlp_types=[dense, moe]",
        "model.vocab_size=16384", f"model.num_experts={num_experts}", "model.num_mtp_heads=1",
        "model.param_dtype=bfloat16", "model.attention_impl=pallas", "model.moe_impl=pallas",
        "model.kernel_mode=mosaic",
    ]
    cfg = load_config("mimo_v2_flash", overrides).model
    graphdef, params, rest = nnx.split(abstract_model(cfg), nnx.Param, ...)
    tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.1, mu_dtype=BF16)
    opt_state = jax.eval_shape(tx.init, params)

    def train_step(params, opt_state, rest, input_ids):
        def loss(params):
            logits = nnx.merge(graphdef, params, rest)(input_ids).logits[:, :-1]
            return optax.softmax_cross_entropy_with_integer_labels(logits, input_ids[:, 1:]).mean()
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    ids = _sds((1, seq_len), jnp.int32)
    shape = f"2 layers, T={seq_len}, {num_experts} experts"
    try:
        fig = _figures(train_step, (params, opt_state, rest, ids), topology, resident_gib=True)
    except jax.errors.JaxRuntimeError as e:  # the compiler's own verdict on one chip's HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        needed = re.search(r"temporaries \(([\d.]+G)\) exceeds available HBM \(([\d.]+G)\)", str(e))
        note = f"does not fit one chip: needs {needed.group(1)} > HBM {needed.group(2)}" if needed else str(e)[:80]
        row = dict(kernel="train step", shape=shape, topology=topology, note=note)
        print(_format_row(row), flush=True)
        return [row]
    row = dict(kernel="train step", impl="ours", shape=shape,
               direction="fwd+bwd+adamw", topology=topology, blocks="", **fig)
    print(_format_row(row), flush=True)
    return [row]


def gpu_rows(lengths):
    """Wall time of the XLA paths on a GPU, if this machine has one."""
    from kernels_pallas.gmm_reference import gmm_reference
    from kernels_pallas.swa_attention_reference import swa_attention_reference

    try:
        gpu = jax.devices("gpu")[0]
    except RuntimeError:
        print("no GPU on this machine: no measured times", flush=True)
        return []

    def timed(fn, *args):
        fn = jax.jit(fn)
        args = [jax.device_put(a, gpu) for a in args]
        jax.block_until_ready(fn(*args))
        t0 = time.perf_counter()
        for _ in range(10):
            out = fn(*args)
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / 10

    rows, key = [], jax.random.key(0)
    for t in [t for t in lengths if t <= 8192]:  # the reference materialises [H, T, T] fp32 scores
        for kind, kv_heads, window in ATTENTION_LAYERS:
            q = jax.random.normal(key, (1, t, HEADS, D_QK), BF16)
            k = jax.random.normal(key, (1, t, kv_heads, D_QK), BF16)
            v = jax.random.normal(key, (1, t, kv_heads, D_V), BF16)
            ms = 1e3 * timed(lambda q, k, v, w=window: swa_attention_reference(q, k, v, None, window=w), q, k, v)
            rows.append(dict(kernel=f"attention {kind}", impl="xla reference", shape=f"T={t}", measured_ms=ms))
            print(f"| {gpu.device_kind} | attention {kind} | T={t} | fwd | xla reference | {ms:.3f} ms |", flush=True)
    lhs = jax.random.normal(key, (TOKENS * TOP_K, HIDDEN), BF16)
    rhs = jax.random.normal(key, (EXPERTS, HIDDEN, MOE_WIDTH), BF16)
    sizes = jnp.full((EXPERTS,), TOKENS * TOP_K // EXPERTS, jnp.int32)
    ms = 1e3 * timed(gmm_reference, lhs, rhs, sizes)
    rows.append(dict(kernel="gmm", impl="ragged_dot", shape=f"M={TOKENS * TOP_K} G={EXPERTS}", measured_ms=ms))
    print(f"| {gpu.device_kind} | gmm | M={TOKENS * TOP_K} G={EXPERTS} {HIDDEN}->{MOE_WIDTH} | fwd | ragged_dot | "
          f"{ms:.3f} ms |", flush=True)
    return rows


def _format_row(r):
    if "note" in r:
        return f"| {r['topology']} | {r['kernel']} | {r['shape']} | fwd+bwd+adamw | ours | {r['note']} |" + " |" * 7
    est = f"{r['est_ms']:,.3f}" if r["est_ms"] > 0 else "n/a"  # XLA gives no usable estimate for some programs
    return (f"| {r['topology']} | {r['kernel']} | {r['shape']} | {r['direction']} | {r['impl']} | {r['blocks']} | "
            f"{r['flops'] / 1e9:,.1f} | {r['bytes'] / 2**30:,.2f} | {r['program_gflop']:,.1f} | {est} | "
            f"{r['vmem_mib']:.1f} | {r['hbm_gib']:.2f} | {r['compile_s']:.1f} |")


HEADER = ("| chip | kernel | shape | pass | impl | blocks visited / dense causal | kernel GFLOP | kernel HBM GiB | "
          "program GFLOP | XLA est. ms | VMEM MiB | HBM GiB | compile s |\n|" + "---|" * 13)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topologies", nargs="+", default=["v5e", "v5p"])
    parser.add_argument("--sections", nargs="+", default=["attention", "gmm", "train_step", "gpu"],
                        choices=["attention", "gmm", "train_step", "gpu"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 32768])
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)
    print(HEADER, flush=True)
    rows = []
    for topology in args.topologies:
        if "attention" in args.sections:
            rows += attention_rows(topology, args.lengths)
        if "gmm" in args.sections:
            rows += gmm_rows(topology)
        if "train_step" in args.sections:
            for seq_len in args.lengths:
                # Where 256 experts' weights and AdamW state do not fit one chip, 8 experts of the same
                # shape (top-8 needs 8) still put every kernel inside a full train step on that chip.
                rows += train_step_rows(topology, seq_len, EXPERTS)
                if "note" in rows[-1]:
                    rows += train_step_rows(topology, seq_len, TOP_K)
    if "gpu" in args.sections:
        rows += gpu_rows(args.lengths)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(HEADER + "\n" + "\n".join(_format_row(r) for r in rows if "measured_ms" not in r) + "\n")
    return rows


if __name__ == "__main__":
    main()
