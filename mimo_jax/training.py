"""Language-model training (`train.mode=lm`, and `mtp_distill`), and the train.py command line.

The loop itself (resume, metrics, checkpoints, SIGTERM, NaN stop) is `mimo_jax.run_loop.run`,
shared with MOPD; this module supplies the LM mode: grain batches (`mimo_jax.data`) whose iterator
position is checkpointed, the LM + MTP objective, eval loss on the held-out split, and the unigram
baseline as the first metrics line. See docs/training.md for the workdir layout.
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np
from flax import nnx

from mimo_jax import distributed, sharding
from mimo_jax.checkpoint import load_checkpoint, load_model  # noqa: F401 - re-exported: the loaders lived here
from mimo_jax.config import Config, ConfigError, load_config
from mimo_jax.data import make_dataset, unigram_entropy
from mimo_jax.mopd import mopd_mode
from mimo_jax.objective import lm_loss
from mimo_jax.plan.compiling import compile_training_run
from mimo_jax.plan.report import report
from mimo_jax.plan.topology import PlanError, parse_topology
from mimo_jax.run_loop import RunMode, host_scalars, run
from mimo_jax.train_step import lm_objective


def evaluate(eval_fn, model, cfg: Config, tokenizer, place) -> float:
    """Mean main-head loss over `train.eval_batches` batches of the held-out split."""
    it = make_dataset(cfg.data, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size, split="eval",
                      seed=cfg.train.seed, tokenizer=tokenizer, num_epochs=None)
    losses = []
    for _ in range(cfg.train.eval_batches):
        batch = next(it)
        losses.append(float(eval_fn(model, place(batch["input_ids"]), place(batch["segment_ids"]))))
    return float(np.mean(losses))


def lm_mode(cfg: Config, tokenizer, mesh, log) -> RunMode:
    """train.mode=lm or mtp_distill: packed grain batches of `train.batch_size` rows."""
    tcfg = cfg.train
    data_iter = make_dataset(cfg.data, seq_len=tcfg.seq_len, batch_size=tcfg.batch_size, split="train",
                             seed=tcfg.seed, tokenizer=tokenizer)

    chunk = tcfg.loss_vocab_chunk

    @nnx.jit
    def eval_fn(model, ids, seg):
        with sharding.activate(mesh, cfg.sharding):
            return lm_loss(model(ids, seg, logits=not chunk), ids, seg, vocab_chunk=chunk)[1]["lm"]

    def next_batch(step, model, place):
        batch = next(data_iter)
        return {"input_ids": place(batch["input_ids"]), "segment_ids": place(batch["segment_ids"])}, None

    def first_record(model):
        baseline = unigram_entropy(cfg.data, split="eval", tokenizer=tokenizer)
        log(f"unigram baseline of the eval split: {baseline:.3f} nats/token")
        return {"unigram_baseline": baseline}

    return RunMode(
        objective=lm_objective(tcfg), rows=tcfg.batch_size, next_batch=next_batch,
        record=lambda metrics, _: host_scalars(metrics),
        evaluate=lambda step, model, place: {"eval_loss": evaluate(eval_fn, model(), cfg, tokenizer, place)},
        first_record=first_record, progress=_progress_line, data_iter=data_iter)


def train(cfg: Config, workdir: str, log=print, on_step=None) -> list[dict]:
    """Runs (or resumes) LM or mtp_distill training; returns the per-step metric records of this
    invocation.

    `on_step(record)`, if given, is called on the main process after every step with that step's
    record (the dict written to metrics.jsonl, with `eval_loss` on eval steps), e.g. to plot the
    curves live in a notebook (notebooks/mimo_jax_colab.ipynb).
    """
    return run(cfg, workdir, lm_mode, log, on_step)


MODES = {"lm": lm_mode, "mtp_distill": lm_mode, "mopd": mopd_mode}


def _progress_line(r: dict, total: int) -> str:
    parts = [f"step {r['step']}/{total}", f"loss {r['loss']:.4f}", f"lm {r['lm']:.4f}"]
    if "mtp" in r:
        parts.append("mtp " + "/".join(f"{x:.3f}" for x in r["mtp"]))
        parts.append("mtp top1 " + "/".join(f"{x:.2f}" for x in r["mtp_top1"]))
    if "eval_loss" in r:
        parts.append(f"eval {r['eval_loss']:.4f}")
    parts += [f"imbalance {r['expert_load_imbalance']:.2f}", f"lr {r['learning_rate']:.2e}",
              f"{r['tokens_per_second']:,.0f} tok/s"]
    return " | ".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="train.py", description="Train MiMo-V2-Flash (LM + MTP).")
    parser.add_argument("--config", default="tiny", help="YAML file, preset name, or HF config.json/dir")
    parser.add_argument("--workdir", help="checkpoints, metrics.jsonl, config.yaml (resumes if present); "
                                           "not needed with --aot")
    parser.add_argument("--aot", metavar="TOPOLOGY", default=None,
                        help="instead of training, compile this run's train step for a TPU slice ahead of time "
                             "(v5p-128, v5e-64, v5p:4x4x8, ...) and print per-chip memory and a step-time estimate")
    parser.add_argument("--cost-model", action="store_true",
                        help="with --aot: also cost the step with the plan's cost model (unrolled probes: flops, "
                             "HBM and ICI time)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. train.steps=100 mesh.fsdp=-1")
    args = parser.parse_args(argv)
    if args.workdir is None and args.aot is None:
        parser.error("the following arguments are required: --workdir")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        parser.error(str(e))
    if args.aot is not None:
        return compile_ahead_of_time(cfg, args.aot, cost_model=args.cost_model)
    run(cfg, args.workdir, MODES[cfg.train.mode], log=distributed.log)
    return 0


def compile_ahead_of_time(cfg: Config, topology_name: str, out=sys.stdout, cost_model: bool = False) -> int:
    """`train.py --aot`: the run's own step compiled for a TPU slice (`plan.compile_training_run`)
    and its report; 0 if it fits the chips' HBM, 1 if not, 2 on a bad topology or config."""
    jax.config.update("jax_platforms", "cpu")  # compiled for TPU; nothing runs here
    try:
        topology = parse_topology(topology_name)
        result = compile_training_run(cfg, topology, cost_model)
    except (PlanError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(result, topology, out)
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
