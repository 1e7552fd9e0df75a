"""`python -m mimo_jax.plot WORKDIR [--out PNG]`: training curves from WORKDIR/metrics.jsonl."""

from __future__ import annotations

import argparse
import json
import os
import sys

from matplotlib.figure import Figure  # no pyplot: no GUI backend, and a notebook's stays as it is


def read_metrics(workdir: str) -> tuple[list[dict], float | None]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no metrics (is {workdir} a train.py workdir?)")
    records, baseline = [], None
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
            if "unigram_baseline" in record:
                baseline = record["unigram_baseline"]
            elif "loss" in record:
                records.append(record)
    return records, baseline


def plot(workdir: str, out: str | None = None) -> str:
    records, baseline = read_metrics(workdir)
    if not records:
        raise ValueError(f"{workdir}/metrics.jsonl has no training steps yet")
    steps = [r["step"] for r in records]
    fig = Figure(figsize=(16, 4.5))
    axes = fig.subplots(1, 3)
    ax = axes[0]
    ax.plot(steps, [r["lm"] for r in records], label="train LM loss", lw=1)
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval LM loss")
    if baseline is not None:
        ax.axhline(baseline, color="gray", ls="--", label=f"unigram baseline {baseline:.2f}")
    ax.set(xlabel="step", ylabel="nats/token", title="language-model loss")
    ax.legend()
    ax = axes[1]
    heads = len(records[-1].get("mtp_top1", []))
    for k in range(heads):
        ax.plot(steps, [r["mtp_top1"][k] for r in records], lw=1, label=f"MTP head {k + 1} top-1")
        ax.plot(steps, [r["mtp_agree"][k] for r in records], lw=1, ls=":", label=f"head {k + 1} agrees with main")
    ax.set(xlabel="step", ylabel="fraction", title="MTP heads")
    if heads:
        ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(steps, [r["expert_load_imbalance"] for r in records], lw=1, label="expert load max/mean")
    ax.set(xlabel="step", title="MoE balance")
    ax.legend()
    fig.tight_layout()
    out = out or os.path.join(workdir, "curves.png")
    fig.savefig(out, dpi=110)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("workdir")
    parser.add_argument("--out", help="PNG path (default WORKDIR/curves.png)")
    args = parser.parse_args(argv)
    print(plot(args.workdir, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
