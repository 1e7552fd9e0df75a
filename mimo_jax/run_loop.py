"""The one training loop: setup, resume, metrics, checkpoints, SIGTERM and NaN handling, for every
training mode.

A mode (`train.mode`: lm and mtp_distill in `mimo_jax.training`, mopd in `mimo_jax.mopd`) is a
function `(cfg, tokenizer, mesh, log) -> RunMode` that supplies what differs: its objective, the
rows of its batch, how a step's batch is made, what a metrics line holds, its evaluation and its
progress line. `run` does the rest, the same way for all of them:

- writes `config.yaml`, builds the model (`checkpoint.initial_model`), optimizer and sharded step;
- resumes from the workdir's latest checkpoint (model, optimizer, router biases and, where the mode
  has one, the data iterator), dropping metrics lines written after it;
- per step: batch, step, router-bias rule, one `metrics.jsonl` line, progress, `on_step`;
- stops on a non-finite loss (the last checkpoint is kept), saves every `checkpoint_every` steps,
  at the end, and on SIGTERM / SIGINT (then exits cleanly).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from mimo_jax import distributed, sharding
from mimo_jax.checkpoint import (
    StopRequested,
    checkpoint_manager,
    initial_model,
    restore_state,
    save_state,
    truncate_metrics,
)
from mimo_jax.config import Config, to_dict
from mimo_jax.flops import jaxpr_flops
from mimo_jax.layers import RouterBias
from mimo_jax.tokenization import check_tokenizer_fits, make_tokenizer
from mimo_jax.train_step import (
    Objective,
    learning_rate_schedule,
    make_optimizer,
    router_bias_step,
    sharded_train_step,
)


@dataclasses.dataclass
class RunMode:
    """What a training mode gives `run`.

    - `next_batch(step, model, place)` -> (batch, context): `batch` maps the objective's
      `batch_keys` to global arrays (`place` turns a host [rows, T] array into one); `context` is
      passed on to `record`. `model()` gives the current model (MOPD rolls out with it).
    - `record(metrics, context)` -> the mode's part of the step's metrics line (it has "loss").
    - `evaluate(step, model, place)` -> {} or the eval entries of the step's line (run every
      `train.eval_every` steps and at the end).
    - `first_record(model)` -> the step-0 line of a fresh run.
    - `progress(record, total_steps)` -> the progress line logged for a step.
    - `data_iter`: a grain iterator saved and restored with the checkpoint, or None when the step
      number is the data position.
    """

    objective: Objective
    rows: int
    next_batch: Callable[[int, Callable, Callable], tuple[dict, Any]]
    record: Callable[[dict, Any], dict]
    evaluate: Callable[[int, Callable, Callable], dict]
    first_record: Callable[[Callable], dict]
    progress: Callable[[dict, int], str]
    data_iter: Any = None


def host_scalars(metrics: dict) -> dict:
    """The step's metrics as JSON numbers and lists (the router loads left out)."""
    out = {}
    for key, value in metrics.items():
        if key == "router":
            continue
        value = np.asarray(value)
        out[key] = value.tolist() if value.ndim else float(value)
    return out


def router_bias_norm(rest) -> float:
    biases = [v.get_value() for _, v in nnx.to_flat_state(rest) if isinstance(v, RouterBias)]
    return float(jnp.sqrt(sum(jnp.sum(b * b) for b in biases))) if biases else 0.0


def run(cfg: Config, workdir: str, make_mode: Callable[..., RunMode], log=print, on_step=None) -> list[dict]:
    """Runs (or resumes) training in `workdir` with the mode `make_mode(cfg, tokenizer, mesh, log)`;
    returns the per-step metric records of this invocation. `on_step(record)` is called on the main
    process after every step."""
    distributed.initialize(cfg.distributed)
    os.makedirs(workdir, exist_ok=True)
    if distributed.is_main_process():
        with open(os.path.join(workdir, "config.yaml"), "w") as f:
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    tokenizer = make_tokenizer(cfg.data)
    check_tokenizer_fits(tokenizer, cfg.model.vocab_size)
    mesh = sharding.make_mesh(cfg.mesh)
    mode = make_mode(cfg, tokenizer, mesh, log)

    tcfg = dataclasses.replace(cfg.train, batch_size=mode.rows)
    graphdef, params, rest = nnx.split(initial_model(cfg, mesh), nnx.Param, ...)
    tx = make_optimizer(tcfg, params, mode.objective)
    schedule = learning_rate_schedule(tcfg)
    step_fn, shardings = sharded_train_step(graphdef, params, rest, tx, mesh, cfg.sharding, (mode.rows, tcfg.seq_len),
                                            tcfg, mode.objective)
    params = jax.device_put(params, shardings["params"])
    rest = jax.device_put(rest, shardings["rest"])
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    bias_fn = jax.jit(lambda p, r, loads: router_bias_step(graphdef, p, r, loads, tcfg.bias_update_rate),
                      out_shardings=(shardings["rest"], None))

    def model():
        return nnx.merge(graphdef, params, rest)

    def place(host_array):
        return distributed.global_batch(host_array, shardings["batch"])

    manager = checkpoint_manager(workdir, tcfg.keep_checkpoints)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    start = manager.latest_step() or 0
    if start:
        state = restore_state(manager, start, {"params": params, "opt_state": opt_state, "rest": rest}, mode.data_iter)
        params, opt_state, rest = state["params"], state["opt_state"], state["rest"]
        if distributed.is_main_process():
            truncate_metrics(metrics_path, start)
        log(f"resumed from {workdir}/checkpoints/{start}")
    else:
        first = {"step": 0, **mode.first_record(model)}
        if distributed.is_main_process():
            with open(metrics_path, "w") as f:
                f.write(json.dumps(first) + "\n")

    tokens_per_step = mode.rows * tcfg.seq_len
    flops_per_step = None
    records = []
    last = time.perf_counter()
    try:
        with StopRequested() as stop, open(metrics_path, "a") as metrics_file:
            for step in range(start + 1, tcfg.steps + 1):
                batch, context = mode.next_batch(step, model, place)
                arrays = [batch[key] for key in mode.objective.batch_keys]
                if flops_per_step is None:  # counted on the traced step: XLA counts a scanned layer once
                    flops_per_step = jaxpr_flops(jax.make_jaxpr(step_fn)(params, opt_state, rest, *arrays))["total"]
                params, opt_state, metrics = step_fn(params, opt_state, rest, *arrays)
                rest, imbalance = bias_fn(params, rest, metrics["router"])
                record = {"step": step, **mode.record(metrics, context), "expert_load_imbalance": float(imbalance),
                          "router_bias_norm": router_bias_norm(rest)}
                now = time.perf_counter()
                record.update(learning_rate=float(schedule(step - 1)), step_seconds=now - last,
                              tokens_per_second=tokens_per_step / (now - last),
                              flops_per_second=flops_per_step / (now - last))
                evaluated = {}
                if tcfg.eval_every and step % tcfg.eval_every == 0 or step == tcfg.steps:
                    evaluated = mode.evaluate(step, model, place)
                    record.update(evaluated)
                    now = time.perf_counter()
                last = now
                records.append(record)
                if distributed.is_main_process():
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    if step % tcfg.log_every == 0 or step == tcfg.steps or evaluated:
                        log(mode.progress(record, tcfg.steps))
                    if on_step is not None:
                        on_step(record)
                if not math.isfinite(record["loss"]):
                    raise FloatingPointError(f"loss became {record['loss']} at step {step}; the last checkpoint is kept")
                if step % tcfg.checkpoint_every == 0 or step == tcfg.steps or stop.signal is not None:
                    save_state(manager, step, {"params": params, "opt_state": opt_state, "rest": rest}, mode.data_iter, cfg)
                if stop.signal is not None:
                    log(f"signal {stop.signal}: saved checkpoint {step}, exiting")
                    break
    finally:  # a save in flight completes, whatever stopped the loop
        manager.wait_until_finished()
        manager.close()
    return records
