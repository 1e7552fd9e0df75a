"""Throughput plans for serving the released model with FP8-resident weights: the inference table of
docs/scaling.md, every row a program compiled ahead of time for its TPU slice (libtpu; no TPU).

    python benchmarks/inference_plans.py --out docs/scaling.md     # rewrites the table there, ~15 min
    python benchmarks/inference_plans.py                           # prints it

Each row is `mimo_jax.plan.compile_plan` on configs/mimo_v2_flash.yaml (bf16 compute, Pallas
kernels compiled by Mosaic) with `weights="fp8"`: the command beside the table in docs/scaling.md
reproduces any row (`python -m mimo_jax.plan --weights fp8 ...`). The rows:

- decode at batch 1, 16 and 64 and a context (the KV cache's length) of 1k, 16k and 256k tokens on
  one slice (GRID_SLICE);
- the smallest slice that holds a 256k-token sequence;
- a speculative round at batch 16, 16k: the verify step with 3 drafts and the 3 MTP drafting passes;
- chunked-prefill chunks (the prompt's last, costliest one) of a 16k and a 256k prompt, with the
  Pallas attention kernel;
- sglang-jax's two published MiMo-V2-Flash shapes, on the slices they name.

Times are the planner's: the roofline of the compiled program (XLA's own estimate is negative for
these programs), without ICI time, so a lower bound on step time and an upper bound on tokens/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

CONFIG = "configs/mimo_v2_flash.yaml"
START, END = "<!-- inference-table:start -->", "<!-- inference-table:end -->"
GRID_SLICE, GRID_MESH = "v5p-16", (1, 1, 2, 4)
PAPER_ACCEPTANCE = 3.6  # tokens per main-model step with 3 MTP heads (the paper)


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    topology: str
    mesh: tuple[int, int, int, int]  # data, fsdp, expert, tensor
    batch: int
    context: int
    mode: str = "decode"
    num_draft: int = 0
    prefill_chunk: int | None = None
    overrides: tuple[str, ...] = ()
    published: str = ""  # sglang-jax's figure for this shape

    def overrides_list(self) -> list[str]:
        names = ("data", "fsdp", "expert", "tensor")
        return [f"mesh.{n}={v}" for n, v in zip(names, self.mesh)] + ["model.param_dtype=bfloat16", *self.overrides]

    def command(self) -> str:
        extra = f" --num-draft {self.num_draft}" if self.num_draft else ""
        extra += f" --prefill-chunk {self.prefill_chunk}" if self.prefill_chunk else ""
        quoted = [f'"{o}"' if " " in o or "[" in o else o for o in self.overrides_list()]
        return (f"python -m mimo_jax.plan --config {CONFIG} --weights fp8 --topology {self.topology} --mode {self.mode} "
                f"--seq-len {self.context} --global-batch {self.batch}{extra} {' '.join(quoted)}")


def rows() -> list[Row]:
    grid = [Row("decode", GRID_SLICE, GRID_MESH, batch, context)
            for context in (1024, 16384, 262144) for batch in (1, 16, 64)]
    return grid + [
        Row("decode, smallest slice for 256k", "v5p-8", (1, 1, 1, 4), 1, 262144),
        # v5e's compiler refuses the dropless ragged all-to-all ("limited ICI routing"): capacity 1.25.
        Row("decode, smallest slice for 256k", "v5e-32", (1, 1, 8, 4), 1, 262144,
            overrides=("model.moe_capacity_factor=1.25", "sharding.cache_seq=[expert]")),
        Row("verify (3 drafts + 1)", GRID_SLICE, GRID_MESH, 16, 16384, num_draft=3),
        Row("MTP drafting passes (3)", GRID_SLICE, GRID_MESH, 16, 16384, mode="draft", num_draft=3),
        Row("prefill, last 2048-token chunk", GRID_SLICE, GRID_MESH, 1, 16384, mode="prefill", prefill_chunk=2048),
        Row("prefill, last 8192-token chunk", GRID_SLICE, GRID_MESH, 1, 262144, mode="prefill", prefill_chunk=8192),
        Row("decode, sglang-jax shape", "v6e-16", (1, 1, 4, 4), 16, 2048, overrides=("model.moe_capacity_factor=1.25",),
            published="1,034 output tok/s, 13.3 ms mean TPOT (1k in / 1k out, 16 concurrent)"),
        Row("decode, sglang-jax shape", "v7x-8", (1, 1, 2, 4), 64, 17408,
            published="480 output tok/s (16k in / 1k out, 64 concurrent)"),
    ]


def cache_per_sequence(model_cfg, context: int, num_draft: int) -> tuple[int, int]:
    """(SWA ring bytes, global cache bytes) of one sequence: leaves holding `context` slots are the
    global layers' caches, the rest the rings (the MTP heads' too when drafting) and their positions."""
    import jax

    from mimo_jax.plan.compiling import abstract_cache

    cache = abstract_cache(model_cfg, 1, context, num_draft)
    rings = global_ = 0
    for leaf in jax.tree.leaves(cache):
        nbytes = math.prod(leaf.shape) * leaf.dtype.itemsize
        if context in leaf.shape[-3:-1]:
            global_ += nbytes
        else:
            rings += nbytes
    return rings, global_


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.1f} MiB"


def run_row(row: Row):
    from mimo_jax.config import load_config
    from mimo_jax.plan import DEFAULT_OVERRIDES, compile_plan, parse_topology

    cfg = load_config(CONFIG, DEFAULT_OVERRIDES + row.overrides_list())
    topology = parse_topology(row.topology)
    result = compile_plan(cfg, topology, row.mode, row.context, row.batch, prefill_chunk=row.prefill_chunk,
                          num_draft=row.num_draft, largest_buffers=0, weights="fp8")
    return cfg, topology, result


def table_line(row: Row, cfg, topology, result, draft_seconds: float | None) -> str:
    rings, global_ = cache_per_sequence(cfg.model, row.context, row.num_draft)
    mesh = ",".join(map(str, row.mesh))
    settings = ", ".join(o for o in row.overrides) or "dropless"
    head = (f"| {row.label} | {row.topology} ({topology.chips} chips) | {mesh} | {settings} | {row.batch} x "
            f"{row.context:,} | {_gib(rings)} + {_gib(global_)} |")
    if result.error:
        return head + f" {result.error[:120]} | | | | {result.compile_s:.0f} s |"
    verdict = f"{'fits' if result.fits else 'does not fit'}: {result.peak_bytes / 2**30:.2f} of {result.hbm_bytes / 2**30:.0f} GiB"
    memory = f"{_gib(result.params_bytes)} + {_gib(result.cache_bytes)} + {_gib(result.temp_bytes)}"
    step = result.step_seconds
    floor = result.stream_seconds
    if row.mode == "prefill":
        rate = f"≥ {row.batch * row.prefill_chunk / step:,.0f} prompt tok/s"
        per_token = "-"
    elif row.mode == "draft":
        rate = "(part of a round: see the verify row)"
        per_token = "-"
    elif row.num_draft:
        round_s = step + (draft_seconds or 0.0)
        rate = (f"{row.batch / round_s:,.0f} to {row.batch * (row.num_draft + 1) / round_s:,.0f}; "
                f"**{row.batch * PAPER_ACCEPTANCE / round_s:,.0f}** at {PAPER_ACCEPTANCE} accepted")
        per_token = f"{round_s * 1e3 / PAPER_ACCEPTANCE:.1f} ms at {PAPER_ACCEPTANCE} (round {round_s * 1e3:.1f} ms)"
    else:
        rate = f"**{row.batch / step:,.0f}**"
        per_token = f"{step * 1e3:.1f} ms"
    published = f" {row.published} |" if row.published else " |"
    return (head + f" {verdict} | {memory} | {step * 1e3:.1f} ms ({floor * 1e3:.1f} ms) | {rate} | {per_token} |"
            f"{published} {result.compile_s:.0f} s |")


HEADER = ("| step | slice | mesh (data,fsdp,expert,tensor) | settings | batch x context | KV cache per sequence: "
          "SWA rings + global | verdict: peak of HBM per chip | params + KV cache + temporaries per chip | "
          "step time (HBM floor) | output tokens/s per slice | time per output token | sglang-jax published | "
          "compile |\n" + "|---" * 13 + "|")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help=f"a markdown file whose {START} ... {END} block is replaced by the table")
    parser.add_argument("--only", type=int, nargs="*", help="row numbers to compile (default: all)")
    args = parser.parse_args(argv)
    from mimo_jax.libtpu_setup import quiet_libtpu

    quiet_libtpu()
    import jax

    jax.config.update("jax_platforms", "cpu")
    plan_rows = rows()
    chosen = range(len(plan_rows)) if not args.only else args.only
    results, lines = {}, []
    t0 = time.perf_counter()
    for i in chosen:
        row = plan_rows[i]
        print(f"[{i + 1}/{len(plan_rows)}] {row.command()}", file=sys.stderr, flush=True)
        results[i] = run_row(row)
    drafts = {(r.topology, r.batch, r.context): results[i][2].step_seconds
              for i, r in enumerate(plan_rows) if i in results and r.mode == "draft" and not results[i][2].error}
    for i in chosen:
        row = plan_rows[i]
        lines.append(table_line(row, *results[i], drafts.get((row.topology, row.batch, row.context))))
    commands = "\n".join(plan_rows[i].command() for i in chosen)
    block = (f"{START}\n{HEADER}\n" + "\n".join(lines) +
             f"\n\nGenerated by benchmarks/inference_plans.py (with `--out docs/scaling.md`; "
             f"{time.perf_counter() - t0:.0f} s of compiles on the 2-core machine). Each row's own command:\n\n"
             f"```text\n{commands}\n```\n{END}")
    if args.out:
        text = open(args.out).read()
        if START not in text or END not in text:
            print(f"error: {args.out} has no {START} ... {END} block to replace", file=sys.stderr)
            return 2
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
        open(args.out, "w").write(text)
    else:
        print(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
