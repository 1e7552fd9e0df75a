"""Decode speed with and without MTP speculative decoding, beside transformers' `generate`.

    python train.py --config configs/tiny.yaml --workdir runs/tiny     # the demo model (once)
    python benchmarks/decode.py --workdir runs/tiny --markdown docs/decode_benchmark.md

Prompts are the openings of held-out documents of the workdir's data (the stdlib's .py files for
the demo). For batch 1 and 8, greedy and sampled, it times `mimo_jax.generate` without and with
speculation in the same run (compile excluded: each configuration is run once to warm up with the
same shapes), and records the acceptance length (tokens per main-model step) and its distribution.
transformers' `generate` runs the same weights (exported with `save_hf`; it has no MTP heads, so
plain decoding only) on the same prompts. All timings are wall-clock on this machine's CPUs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mimo_jax import generate, load_config, save_hf  # noqa: E402
from mimo_jax.checkpoint import load_checkpoint  # noqa: E402
from mimo_jax.data import load_split, make_tokenizer  # noqa: E402


def held_out_prompts(workdir: str, count: int, prompt_tokens: int) -> list[list[int]]:
    cfg = load_config(os.path.join(workdir, "config.yaml"))
    tokenizer = make_tokenizer(cfg.data)
    docs = load_split(cfg.data, "eval")
    prompts = []
    for i in range(len(docs)):
        ids = tokenizer.encode(docs[i])
        if len(ids) >= prompt_tokens:
            prompts.append(ids[:prompt_tokens])
        if len(prompts) == count:
            return prompts
    raise SystemExit(f"{workdir}: fewer than {count} held-out documents of {prompt_tokens}+ tokens")


def time_generate(model, prompts, new_tokens, repeats=3, **kwargs):
    """(result, tokens/s): the median of `repeats` timed calls after a warm-up with the same shapes."""
    generate(model, prompts, new_tokens, **kwargs)  # warm-up: compiles for these shapes
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = generate(model, prompts, new_tokens, **kwargs)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    generated = int((result.lengths - np.array([len(p) for p in prompts])).sum())
    return result, generated / seconds


def time_transformers(model, prompts, new_tokens):
    import torch
    from transformers import MiMoV2FlashForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, tmp)
        hf = MiMoV2FlashForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32).eval()
    ids = torch.tensor(prompts, dtype=torch.long)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        hf.generate(ids, **kwargs)
        start = time.perf_counter()
        out = hf.generate(ids, **kwargs)
        seconds = time.perf_counter() - start
    return out[:, ids.shape[1]:].numpy(), ids.shape[0] * new_tokens / seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/tiny", help="a train.py workdir (the demo model)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--temperature", type=float, default=0.7, help="for the sampled rows")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--markdown", help="write the tables to this file")
    args = parser.parse_args(argv)

    if not os.path.isdir(os.path.join(args.workdir, "checkpoints")):
        raise SystemExit(f"{args.workdir}: no checkpoint; run: python train.py --config configs/tiny.yaml "
                         f"--workdir {args.workdir}")
    model = load_checkpoint(args.workdir)
    batches = [int(b) for b in args.batches.split(",")]
    prompts = held_out_prompts(args.workdir, max(batches), args.prompt_tokens)
    tokenizer = make_tokenizer(load_config(os.path.join(args.workdir, "config.yaml")).data)
    cpus = os.cpu_count()
    rows, hist_rows, samples = [], [], []
    for batch in batches:
        for label, sampling in (("greedy", {}), (f"T={args.temperature}", {"temperature": args.temperature})):
            plain, plain_tps = time_generate(model, prompts[:batch], args.new_tokens, **sampling)
            spec, spec_tps = time_generate(model, prompts[:batch], args.new_tokens, speculative=True, **sampling)
            same = "yes" if not sampling and np.array_equal(plain.tokens, spec.tokens) else ("-" if sampling else "NO")
            rows.append(f"| {batch} | {label} | {plain_tps:,.0f} | {spec_tps:,.0f} | {spec_tps / plain_tps:.2f}x | "
                        f"{spec.acceptance_length:.2f} | {same} |")
            if batch == 1:
                text = tokenizer.decode(spec.tokens[0, args.prompt_tokens:])
                samples.append(f"- {label}: `{text[:160]!r}`")
            shares = spec.count_hist[1:] / spec.count_hist[1:].sum()
            hist_rows.append(f"| {batch} | {label} | " + " | ".join(f"{s:.2f}" for s in shares) + " |")
            print(rows[-1], flush=True)
        if not args.no_transformers:
            hf_tokens, hf_tps = time_transformers(model, prompts[:batch], args.new_tokens)
            ours = generate(model, prompts[:batch], args.new_tokens).tokens[:, args.prompt_tokens:]
            agree = float(np.mean(hf_tokens == ours))
            rows.append(f"| {batch} | transformers greedy | {hf_tps:,.0f} | | | | {agree:.0%} of tokens equal ours |")
            print(rows[-1], flush=True)
    num_draft = len(spec.count_hist) - 2
    table = "\n".join([
        f"Demo model `{args.workdir}`, {args.prompt_tokens}-token held-out prompts, {args.new_tokens} new tokens, "
        f"{num_draft} drafts, jax {jax.__version__} on {cpus} CPU cores; tokens/s are medians of 3 timed runs.",
        "",
        "| batch | sampling | plain tok/s | speculative tok/s | speedup | acceptance length | same tokens |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Share of speculative steps by tokens produced per main-model step:",
        "",
        "| batch | sampling | " + " | ".join(str(n) for n in range(1, num_draft + 2)) + " |",
        "|---|---|" + "---|" * (num_draft + 1),
        *hist_rows,
        "",
        "What the batch-1 speculative runs generated (first 160 characters):",
        "",
        *samples,
    ])
    print(table)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write("# Decode benchmark (generated by benchmarks/decode.py)\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
