"""Model directories: the Orbax workdir of a training run, and the one loader for every model path.

A train.py workdir holds `config.yaml`, `metrics.jsonl` and `checkpoints/<step>/` (model,
optimizer state, router biases and, in LM mode, the data iterator's position). A Hugging Face
checkpoint directory holds `config.json` and safetensors.

Every model path of the project (`train.init_from`, MOPD teachers, `serve.py --model`, the
benchmarks, `python -m mimo_jax.mopd eval`) goes through `model_source`, so one precedence holds
everywhere: **a directory with `checkpoints/` is a train.py workdir, even if it also holds a
`config.json`** (say, an export written into the run's directory); only then is `config.json` read
as a Hugging Face checkpoint. The workdir wins because it is the source of the export: full
precision, with the router biases as trained.
"""

from __future__ import annotations

import json
import os
import signal

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from mimo_jax import sharding
from mimo_jax.config import Config, ModelConfig, ShardingRules, from_dict, to_dict
from mimo_jax.hf_io import load_hf
from mimo_jax.model import MiMoV2Flash, abstract_model

WORKDIR, HF = "workdir", "hf"


def model_source(path: str) -> str:
    """WORKDIR or HF for a model directory, by the module's precedence; FileNotFoundError otherwise."""
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return WORKDIR
    if os.path.isfile(os.path.join(path, "config.json")):
        return HF
    raise FileNotFoundError(f"{path}: neither a train.py workdir (checkpoints/) nor a Hugging Face checkpoint "
                            "directory (config.json)")


def load_model(path: str, dtype=None, weights: str | None = None) -> MiMoV2Flash:
    """The model in a directory: a train.py workdir's latest checkpoint, in the run's own dtypes, or
    a Hugging Face checkpoint loaded in `dtype` (default bfloat16), with `weights="fp8"` keeping an
    FP8 checkpoint's quantised weights resident (`load_hf`). Neither applies to a workdir."""
    if model_source(path) == WORKDIR:
        if weights is not None:
            raise ValueError(f"{path}: weights={weights!r} needs a Hugging Face FP8 checkpoint; this is a train.py "
                             "workdir (export it with save_hf(..., 'fp8') first)")
        return load_checkpoint(path)
    return load_hf(path, jnp.dtype(dtype or jnp.bfloat16), weights=weights)


def load_checkpoint(workdir: str, step: int | None = None, model_cfg: ModelConfig | None = None,
                    mesh: Mesh | None = None, rules: ShardingRules = ShardingRules()) -> MiMoV2Flash:
    """The model of a train.py workdir's checkpoint (latest by default), e.g. to export it with
    `mimo_jax.save_hf(load_checkpoint("runs/tiny"), "out")` for transformers / vLLM / SGLang.

    `model_cfg` builds the model from another config of the same shapes (say, other kernels);
    by default the checkpoint's own config is used. With `mesh`, each array is read straight into
    its shards by the logical-axis `rules`; by default everything goes to the first device.
    """
    manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint")
    if model_cfg is None:
        saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        model_cfg = from_dict(Config, saved).model
    # An abstract target (nothing allocated or initialised), restored onto its shardings.
    graphdef, params, rest = nnx.split(abstract_model(model_cfg), nnx.Param, ...)
    state = {"params": params, "rest": rest}
    if mesh is None:
        shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), state)
    else:
        shardings = {name: sharding.state_shardings(part, mesh, rules) for name, part in state.items()}
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))["state"]
    manager.close()
    return nnx.merge(graphdef, restored["params"], restored["rest"])


def sharded_initializer(cfg: Config, mesh: Mesh):
    """(graphdef, abstract state, its shardings, init): `init()` creates the model's state at
    `train.seed` inside one jit whose `out_shardings` follow the logical-axis rules, so each device
    computes and holds only its shards (`init.lower().compile().memory_analysis()` shows the
    per-device bytes)."""
    graphdef, abstract_state = nnx.split(abstract_model(cfg.model))
    shardings = sharding.state_shardings(abstract_state, mesh, cfg.sharding)
    init = jax.jit(lambda: nnx.state(MiMoV2Flash(cfg.model, rngs=nnx.Rngs(cfg.train.seed))), out_shardings=shardings)
    return graphdef, abstract_state, shardings, init


def initial_model(cfg: Config, mesh: Mesh | None = None) -> MiMoV2Flash:
    """A run's starting model on `mesh` (default: the run's `cfg.mesh`), every array created in its
    shards by the logical-axis rules, so that no device or host ever holds the whole model: from
    scratch (`sharded_initializer`; the numbers of an eager init at that seed, up to float
    rounding in the samplers: XLA fuses them differently), or streamed from `train.init_from` (a
    workdir's latest checkpoint or a Hugging Face checkpoint, by `model_source`; the optimizer and
    data start fresh), in the run's own model config (its kernels and compute dtype)."""
    mesh = sharding.make_mesh(cfg.mesh) if mesh is None else mesh
    graphdef, abstract_state, shardings, build = sharded_initializer(cfg, mesh)
    init = cfg.train.init_from
    if not init:
        return nnx.merge(graphdef, build())
    try:
        source = model_source(init)
    except FileNotFoundError as e:
        raise ValueError(f"train.init_from={init!r}: {e}") from None
    if source == WORKDIR:
        return load_checkpoint(init, model_cfg=cfg.model, mesh=mesh, rules=cfg.sharding)
    # load_hf gives params and activations one dtype; the run's model may compute in another.
    # Each tensor goes to the shards of our parameter at its path; one we lack (the shape check
    # below then names it) to the first device.
    targets = {path: var.get_value() for path, var in nnx.to_flat_state(shardings)}
    first = SingleDeviceSharding(jax.devices()[0])
    place = lambda path, shape, axes: targets.get(path, first)  # noqa: E731
    loaded = dict(nnx.to_flat_state(nnx.state(load_hf(init, jnp.dtype(cfg.model.param_dtype), sharding=place))))
    ours = nnx.to_flat_state(abstract_state)
    for path, var in ours:
        got = loaded[path].get_value().shape if path in loaded else None
        if got != var.get_value().shape:
            raise ValueError(f"train.init_from={init!r}: {'/'.join(map(str, path))} has shape {got}, "
                             f"the configured model needs {var.get_value().shape}")
    return nnx.merge(graphdef, nnx.from_flat_state([(path, loaded[path]) for path, _ in ours]))


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True),
    )


def save_state(manager, step: int, state: dict, data_iter, cfg: Config) -> None:
    """Saves {params, opt_state, rest}, the config and, unless `data_iter` is None (a loop whose data
    position is the step itself), the data iterator's position."""
    data = {} if data_iter is None else {"data": grain.checkpoint.CheckpointSave(data_iter)}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               config=ocp.args.JsonSave(to_dict(cfg)), **data))


def restore_state(manager, step: int, target: dict, data_iter) -> dict:
    """The saved state, laid out like `target`; restores `data_iter` in place when given."""
    data = {} if data_iter is None else {"data": grain.checkpoint.CheckpointRestore(data_iter)}
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), **data))["state"]


def truncate_metrics(path: str, after_step: int) -> None:
    """Drops lines a killed run wrote after its last checkpoint, so the file reads as one run."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if json.loads(line).get("step", 0) <= after_step]
    with open(path, "w") as f:
        f.writelines(lines)


class StopRequested:
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
