"""The training loop behind train.py: data, sharded step, router-bias rule, eval, metrics and
Orbax checkpoints with exact resume.

A workdir holds `config.yaml`, `metrics.jsonl` (one JSON object per step, plus eval lines) and
`checkpoints/<step>/` (model, optimizer state, router biases and the data iterator's position).
Starting again in the same workdir resumes from the latest checkpoint; SIGTERM / SIGINT save one
before exiting.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from mimo_jax import distributed, sharding
from mimo_jax.config import Config, to_dict
from mimo_jax.data import check_tokenizer_fits, make_dataset, make_tokenizer, unigram_entropy
from mimo_jax.model import MiMoV2Flash
from mimo_jax.train_step import learning_rate_schedule, make_optimizer, router_bias_step, sharded_train_step


class _StopRequested:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps (then saves and exits)."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _checkpoint_manager(workdir: str, keep: int):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True),
    )


def _save(manager, step: int, state: dict, data_iter, cfg: Config):
    """`data_iter` None: a loop whose data position is the step itself (MOPD)."""
    import grain
    import orbax.checkpoint as ocp

    data = {} if data_iter is None else {"data": grain.checkpoint.CheckpointSave(data_iter)}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               config=ocp.args.JsonSave(to_dict(cfg)), **data))


def _restore(manager, step: int, target: dict, data_iter) -> dict:
    import grain
    import orbax.checkpoint as ocp

    data = {} if data_iter is None else {"data": grain.checkpoint.CheckpointRestore(data_iter)}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), **data))
    return restored["state"]


def _initial_model(cfg: Config):
    """From scratch, from a Hugging Face checkpoint directory, or from another train.py workdir's
    latest checkpoint (its weights only: the optimizer and data start fresh)."""
    init = cfg.train.init_from
    if not init:
        return MiMoV2Flash(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
    if os.path.exists(os.path.join(init, "config.json")):
        from mimo_jax.hf_io import load_hf

        # load_hf gives params and activations one dtype; the run's model may compute in another.
        model = MiMoV2Flash(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
        loaded = nnx.state(load_hf(init, jnp.dtype(cfg.model.param_dtype)))
        ours = dict(nnx.to_flat_state(nnx.state(model)))
        for path, var in nnx.to_flat_state(loaded):
            want = ours[path].get_value().shape if path in ours else None
            if want != var.get_value().shape:
                raise ValueError(f"train.init_from={init!r}: {'/'.join(map(str, path))} has shape "
                                 f"{var.get_value().shape}, the configured model needs {want}")
        nnx.update(model, loaded)
        return model
    if os.path.isdir(os.path.join(init, "checkpoints")):
        return load_checkpoint(init, model_cfg=cfg.model)
    raise ValueError(f"train.init_from={init!r}: neither a Hugging Face checkpoint directory (config.json) nor a "
                     "train.py workdir (checkpoints/)")


def _truncate_metrics(path: str, after_step: int) -> None:
    """Drops lines a killed run wrote after its last checkpoint, so the file reads as one run."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if json.loads(line).get("step", 0) <= after_step]
    with open(path, "w") as f:
        f.writelines(lines)


def _host_scalars(metrics: dict) -> dict:
    out = {}
    for key, value in metrics.items():
        if key == "router":
            continue
        value = np.asarray(value)
        out[key] = value.tolist() if value.ndim else float(value)
    return out


def evaluate(eval_fn, params, rest, cfg: Config, tokenizer, batch_sharding) -> float:
    """Mean main-head loss over `train.eval_batches` batches of the held-out split."""
    it = make_dataset(cfg.data, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size, split="eval",
                      seed=cfg.train.seed, tokenizer=tokenizer, num_epochs=None)
    losses = []
    for _ in range(cfg.train.eval_batches):
        batch = next(it)
        ids = distributed.global_batch(batch["input_ids"], batch_sharding)
        seg = distributed.global_batch(batch["segment_ids"], batch_sharding)
        losses.append(float(eval_fn(params, rest, ids, seg)))
    return float(np.mean(losses))


def train(cfg: Config, workdir: str, log=print, on_step=None) -> list[dict]:
    """Runs (or resumes) training; returns the per-step metric records of this invocation.

    `on_step(record)`, if given, is called on the main process after every step with that step's
    record (the dict written to metrics.jsonl, with `eval_loss` on eval steps), e.g. to plot the
    curves live in a notebook (notebooks/mimo_jax_colab.ipynb).
    """
    distributed.initialize(cfg.distributed)
    os.makedirs(workdir, exist_ok=True)
    if distributed.is_main_process():
        with open(os.path.join(workdir, "config.yaml"), "w") as f:
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    tcfg = cfg.train
    tokenizer = make_tokenizer(cfg.data)
    check_tokenizer_fits(tokenizer, cfg.model.vocab_size)
    mesh = sharding.make_mesh(cfg.mesh)

    graphdef, params, rest = nnx.split(_initial_model(cfg), nnx.Param, ...)
    tx = make_optimizer(tcfg, params)
    schedule = learning_rate_schedule(tcfg)
    batch_shape = (tcfg.batch_size, tcfg.seq_len)
    step_fn, shardings = sharded_train_step(graphdef, params, rest, tx, mesh, cfg.sharding, batch_shape, tcfg)
    params = jax.device_put(params, shardings["params"])
    rest = jax.device_put(rest, shardings["rest"])
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    bias_fn = jax.jit(lambda p, r, loads: router_bias_step(graphdef, p, r, loads, tcfg.bias_update_rate),
                      out_shardings=(shardings["rest"], None))

    def eval_loss(params, rest, ids, seg):
        with sharding.activate(mesh, cfg.sharding):
            from mimo_jax.objective import lm_loss

            return lm_loss(nnx.merge(graphdef, params, rest)(ids, seg), ids, seg)[1]["lm"]

    eval_fn = jax.jit(eval_loss)

    data_iter = make_dataset(cfg.data, seq_len=tcfg.seq_len, batch_size=tcfg.batch_size, split="train",
                             seed=tcfg.seed, tokenizer=tokenizer)
    manager = _checkpoint_manager(workdir, tcfg.keep_checkpoints)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    start = 0
    if manager.latest_step() is not None:
        start = manager.latest_step()
        state = _restore(manager, start, {"params": params, "opt_state": opt_state, "rest": rest}, data_iter)
        params, opt_state, rest = state["params"], state["opt_state"], state["rest"]
        if distributed.is_main_process():
            _truncate_metrics(metrics_path, start)
        log(f"resumed from {workdir}/checkpoints/{start}")
    elif distributed.is_main_process():
        baseline = unigram_entropy(cfg.data, split="eval", tokenizer=tokenizer)
        with open(metrics_path, "w") as f:
            f.write(json.dumps({"step": 0, "unigram_baseline": baseline}) + "\n")
        log(f"unigram baseline of the eval split: {baseline:.3f} nats/token")

    tokens_per_step = tcfg.batch_size * tcfg.seq_len
    flops_per_step = None
    records = []
    last = time.perf_counter()
    with _StopRequested() as stop, open(metrics_path, "a") as metrics_file:
        for step in range(start + 1, tcfg.steps + 1):
            batch = next(data_iter)
            ids = distributed.global_batch(batch["input_ids"], shardings["batch"])
            seg = distributed.global_batch(batch["segment_ids"], shardings["batch"])
            if flops_per_step is None:  # counted on the traced step: XLA counts a scanned layer once
                from mimo_jax.plan import jaxpr_flops

                flops_per_step = jaxpr_flops(jax.make_jaxpr(step_fn)(params, opt_state, rest, ids, seg))["total"]
            params, opt_state, metrics = step_fn(params, opt_state, rest, ids, seg)
            rest, imbalance = bias_fn(params, rest, metrics["router"])
            record = {"step": step, **_host_scalars(metrics), "expert_load_imbalance": float(imbalance),
                      "router_bias_norm": _bias_norm(rest)}
            now = time.perf_counter()
            record.update(learning_rate=float(schedule(step - 1)), step_seconds=now - last,
                          tokens_per_second=tokens_per_step / (now - last),
                          flops_per_second=flops_per_step / (now - last))
            last = now
            if tcfg.eval_every and step % tcfg.eval_every == 0 or step == tcfg.steps:
                record["eval_loss"] = evaluate(eval_fn, params, rest, cfg, tokenizer, shardings["batch"])
                last = time.perf_counter()
            records.append(record)
            if distributed.is_main_process():
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                if step % tcfg.log_every == 0 or step == tcfg.steps or "eval_loss" in record:
                    log(_progress_line(record, tcfg.steps))
                if on_step is not None:
                    on_step(record)
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(f"loss became {record['loss']} at step {step}; the last checkpoint is kept")
            save_now = step % tcfg.checkpoint_every == 0 or step == tcfg.steps or stop.signal is not None
            if save_now:
                _save(manager, step, {"params": params, "opt_state": opt_state, "rest": rest}, data_iter, cfg)
            if stop.signal is not None:
                log(f"signal {stop.signal}: saved checkpoint {step}, exiting")
                break
    manager.wait_until_finished()
    manager.close()
    return records


def load_checkpoint(workdir: str, step: int | None = None, model_cfg=None) -> MiMoV2Flash:
    """The model of a train.py workdir's checkpoint (latest by default), e.g. to export it with
    `mimo_jax.save_hf(load_checkpoint("runs/tiny"), "out")` for transformers / vLLM / SGLang.

    `model_cfg` builds the model from another config of the same shapes (say, other kernels);
    by default the checkpoint's own config is used.
    """
    import orbax.checkpoint as ocp

    from mimo_jax.config import from_dict

    manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint")
    if model_cfg is None:
        saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        model_cfg = from_dict(Config, saved).model
    from jax.sharding import SingleDeviceSharding

    from mimo_jax.train_step import abstract_model_state

    # An abstract target (nothing allocated or initialised), restored onto the default device.
    graphdef, params, rest = abstract_model_state(model_cfg)
    device = SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          {"params": params, "rest": rest})
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))["state"]
    manager.close()
    return nnx.merge(graphdef, restored["params"], restored["rest"])


def load_model(path: str, dtype=None) -> MiMoV2Flash:
    """A train.py workdir's latest checkpoint (checkpoints/) or a Hugging Face checkpoint directory
    (config.json, loaded in `dtype`, default bfloat16)."""
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return load_checkpoint(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        from mimo_jax.hf_io import load_hf

        return load_hf(path, jnp.dtype(dtype or jnp.bfloat16))
    raise FileNotFoundError(f"{path}: neither a train.py workdir (checkpoints/) nor a Hugging Face checkpoint "
                            "directory (config.json)")


def _bias_norm(rest) -> float:
    from mimo_jax.layers import RouterBias

    biases = [v.get_value() for _, v in nnx.to_flat_state(rest) if isinstance(v, RouterBias)]
    return float(jnp.sqrt(sum(jnp.sum(b * b) for b in biases))) if biases else 0.0


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
    import argparse

    from mimo_jax.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="train.py", description="Train MiMo-V2-Flash (LM + MTP).")
    parser.add_argument("--config", default="tiny", help="YAML file, preset name, or HF config.json/dir")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, config.yaml (resumes if present)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. train.steps=100 mesh.fsdp=-1")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        parser.error(str(e))
    if cfg.train.mode == "mopd":
        from mimo_jax.mopd import train_mopd

        train_mopd(cfg, args.workdir, log=lambda msg: distributed.log(msg))
    else:
        train(cfg, args.workdir, log=lambda msg: distributed.log(msg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
