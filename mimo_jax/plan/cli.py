"""Pod planning: compile a training, prefill or decode step for a TPU slice ahead of time, on CPU.

    python -m mimo_jax.plan --config configs/mimo_v2_flash.yaml --topology v5p-256 \
        [--seq-len 32768] [--global-batch N] [--mode train|prefill|decode|draft] [--search] [key=value ...]
        [--prefill-chunk 512] [--num-draft 3] [--weights fp8]

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
- `draft` (with `--num-draft D`): those D drafting passes, `mimo_jax.inference.draft` as
  `generate(..., speculative=True)` runs it: each MTP head on 2D positions and the lm_head at the
  last. A speculative round is this step plus the verify step.
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
import sys
from collections.abc import Sequence

import jax

from mimo_jax.config import ConfigError, load_config
from mimo_jax.plan.compiling import DEFAULT_PREFILL_CHUNK, compile_plan
from mimo_jax.plan.report import report
from mimo_jax.plan.search import search
from mimo_jax.plan.topology import PlanError, parse_topology

DEFAULT_OVERRIDES = ["model.kernel_mode=mosaic", "model.attention_impl=pallas", "model.moe_impl=pallas"]


def main(argv: Sequence[str] | None = None, out=sys.stdout) -> int:
    parser = argparse.ArgumentParser(prog="python -m mimo_jax.plan", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", default="configs/mimo_v2_flash.yaml", help="YAML preset or file")
    parser.add_argument("--topology", required=True, help="v5p-256, v5e-64, v5p:4x4x8, ...")
    parser.add_argument("--mode", choices=("train", "prefill", "decode", "draft"), default="train")
    parser.add_argument("--seq-len", type=int, default=32768,
                        help="tokens per sequence (train) or the KV cache's length (prefill, decode)")
    parser.add_argument("--global-batch", type=int, default=None,
                        help="sequences per step (default: one per batch shard, data*fsdp*expert)")
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help=f"prefill: tokens per chunk (default {DEFAULT_PREFILL_CHUNK}, at most --seq-len)")
    parser.add_argument("--num-draft", type=int, default=0,
                        help="decode: plan the speculative verify step of this many MTP drafts + 1 (default 0: "
                             "plain decoding, 1 token); draft: the MTP passes that make these drafts")
    parser.add_argument("--weights", choices=("fp8",), default=None,
                        help="inference: FP8-resident weights, as load_hf(..., weights='fp8') / serve.py --weights fp8 "
                             "keep them (default: every weight in model.param_dtype)")
    parser.add_argument("--cost-model", action="store_true",
                        help="also compile the cost model's probes (layers unrolled) for flops, HBM and ICI time "
                             "(mimo_jax.plan.cost)")
    parser.add_argument("--largest-buffers", type=int, default=5, metavar="N",
                        help="list the N largest buffers of XLA's buffer assignment (default 5; 0: none)")
    parser.add_argument("--search", action="store_true", help="try meshes / remat / capacity until one fits")
    parser.add_argument("--max-compiles", type=int, default=6, help="cap on compiles in --search")
    parser.add_argument("--meshes-per-policy", type=int, default=3,
                        help="in --search, meshes tried per (capacity, remat or cache layout) before moving on")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides (model.*, mesh.*, sharding.*)")
    args = parser.parse_args(argv)
    if args.cost_model and args.search:
        parser.error("--cost-model costs one plan: run it on the plan --search finds")
    if args.mode == "draft" and (args.search or args.cost_model):
        parser.error("--mode draft compiles the drafting passes as they are: no --search or --cost-model")


    jax.config.update("jax_platforms", "cpu")  # the program is compiled for TPU; nothing runs here

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
                                  num_draft=args.num_draft, weights=args.weights)
            if best is None:
                print(f"no fitting plan in {len(tried)} compiles (raise --max-compiles, add chips, or override "
                      f"model.param_dtype=bfloat16)", file=out)
                return 1
            print("\nbest found:", file=out)
            report(best, topology, out)
            return 0
        result = compile_plan(cfg, topology, args.mode, args.seq_len, args.global_batch,
                              prefill_chunk=args.prefill_chunk, num_draft=args.num_draft, cost_model=args.cost_model,
                              largest_buffers=args.largest_buffers, weights=args.weights)
    except (PlanError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(result, topology, out)
    return 0 if result.fits else 1

