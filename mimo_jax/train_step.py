"""The jitted training step, shared by train.py, the pod plan (`mimo_jax.plan`) and the tests.

`sharded_train_step` places parameters, optimizer state and the batch by the sharding rules and
pins them there across steps (`out_shardings`), so a step never silently changes the layout. The
router-bias update is a separate jitted function (`router_bias_step`): it follows a rule, not the
optimizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from mimo_jax import sharding
from mimo_jax.config import ModelConfig, ShardingRules, TrainConfig
from mimo_jax.model import abstract_model
from mimo_jax.moe import RouterStats
from mimo_jax.objective import lm_loss, mtp_distill_loss
from mimo_jax.router_balance import load_imbalance, update_router_bias


def abstract_model_state(cfg: ModelConfig):
    """(graphdef, params, rest) of a model as ShapeDtypeStructs: nothing is allocated."""
    return nnx.split(abstract_model(cfg), nnx.Param, ...)


def learning_rate_schedule(train: TrainConfig):
    """Linear warm-up to the peak, `constant_steps` at the peak, then cosine to the minimum (or
    constant), as in the paper's pre-training stages."""
    parts, boundaries = [], []
    if train.warmup_steps:
        parts.append(optax.linear_schedule(0.0, train.learning_rate, train.warmup_steps))
        boundaries.append(train.warmup_steps)
    if train.constant_steps:
        parts.append(optax.constant_schedule(train.learning_rate))
        boundaries.append(train.warmup_steps + train.constant_steps)
    decay_steps = max(train.steps - train.warmup_steps - train.constant_steps, 1)
    parts.append(optax.cosine_decay_schedule(train.learning_rate, decay_steps, train.min_learning_rate / train.learning_rate)
                 if train.decay == "cosine" else optax.constant_schedule(train.learning_rate))
    return optax.join_schedules(parts, boundaries) if boundaries else parts[0]


@dataclasses.dataclass(frozen=True)
class Objective:
    """A training mode's loss: `loss(model_output, batch) -> (loss, metrics)`, with `batch` a dict of
    [B, T, ...] arrays: input_ids, segment_ids and the mode's `inputs`, which the step takes, in
    that order, after input_ids and segment_ids. `trains(path)` says which parameters the mode fits
    (by their `nnx.Param` path); None fits them all. `logits=False` runs the model without its
    logits (`model(..., logits=False)`), for a loss that computes them in vocabulary chunks."""

    loss: Callable
    inputs: tuple[str, ...] = ()
    trains: Callable[[tuple], bool] | None = None
    logits: bool = True

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return ("input_ids", "segment_ids") + self.inputs


def _in_mtp_heads(path) -> bool:
    return any(getattr(k, "key", None) == "mtp" for k in path)


def lm_objective(train: TrainConfig) -> Objective:
    """`train.mode=lm`: LM + MTP loss; `mtp_distill`: the MTP heads fitted to the main model's own
    distribution, the main model frozen."""
    if train.mode == "mtp_distill":
        return Objective(lambda out, batch: mtp_distill_loss(out, batch["input_ids"], batch["segment_ids"]),
                         trains=_in_mtp_heads)
    return Objective(lambda out, batch: lm_loss(out, batch["input_ids"], batch["segment_ids"], train.mtp_weight,
                                                train.balance_weight, train.z_loss_weight, train.loss_vocab_chunk),
                     logits=not train.loss_vocab_chunk)


def make_optimizer(train: TrainConfig, params, objective: Objective | None = None) -> optax.GradientTransformation:
    """AdamW with clipping; weight decay on matrices only. Parameters the objective does not train
    (default `lm_objective(train)`) get zero updates."""
    objective = lm_objective(train) if objective is None else objective
    decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)
    adamw = optax.adamw(learning_rate_schedule(train), b1=train.b1, b2=train.b2, eps=train.eps,
                        weight_decay=train.weight_decay, mask=decay_mask)
    if train.moment_dtype:
        adamw = stored_as(adamw, jnp.dtype(train.moment_dtype))
    tx = optax.chain(optax.clip_by_global_norm(train.grad_clip), adamw)
    if objective.trains is not None:
        labels = jax.tree_util.tree_map_with_path(lambda path, _: "train" if objective.trains(path) else "freeze", params)
        tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
    return tx


def stored_as(tx: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """`tx` with its floating-point state kept in `dtype` between steps: each update computes in
    the state's own dtype (fp32 for fp32 parameters) and rounds the new state back."""
    def floats_as(tree, dtypes):
        return jax.tree.map(lambda x, d: x.astype(d) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree, dtypes)

    def init(params):
        state = tx.init(params)
        return floats_as(state, jax.tree.map(lambda _: dtype, state))

    def update(updates, state, params=None):
        own = jax.tree.map(lambda x: x.dtype, jax.eval_shape(tx.init, params if params is not None else updates))
        updates, state = tx.update(updates, floats_as(state, own), params)
        return updates, floats_as(state, jax.tree.map(lambda _: dtype, state))

    return optax.GradientTransformation(init, update)


def train_step_fn(graphdef, tx: optax.GradientTransformation, train: TrainConfig = TrainConfig(),
                  objective: Objective | None = None):
    """step(params, opt_state, rest, input_ids, segment_ids, *inputs) -> (params, opt_state, metrics).

    `objective` gives the loss and names the per-token `inputs` after input_ids and segment_ids
    (default: `lm_objective(train)`, which takes none). With grad_accum_steps > 1 the batch is split
    into that many micro-batches whose gradients are averaged before one optimizer update.
    metrics["router"] holds the router loads for `router_bias_step`.
    """
    objective = lm_objective(train) if objective is None else objective

    def loss_fn(params, rest, *arrays):
        batch = dict(zip(objective.batch_keys, arrays))
        out = nnx.merge(graphdef, params, rest)(batch["input_ids"], batch["segment_ids"], logits=objective.logits)
        loss, metrics = objective.loss(out, batch)
        return loss, {**metrics, "loss": loss, "router": {k: s.load_E for k, s in out.router.items()}}

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(params, opt_state, rest, input_ids_BT, segment_ids_BT, *extras):
        if train.grad_accum_steps == 1:
            (_, metrics), grads = grad_fn(params, rest, input_ids_BT, segment_ids_BT, *extras)
        else:
            micro = train.grad_accum_steps

            def split(x):
                return x.reshape((micro, x.shape[0] // micro) + x.shape[1:])

            def accumulate(total, batch):
                (_, metrics), grads = grad_fn(params, rest, *batch)
                return jax.tree.map(jnp.add, total, grads), metrics

            zeros = jax.tree.map(jnp.zeros_like, params)
            batches = tuple(split(x) for x in (input_ids_BT, segment_ids_BT, *extras))
            grads, metrics = jax.lax.scan(accumulate, zeros, batches)
            grads = jax.tree.map(lambda g: g / micro, grads)
            router = jax.tree.map(lambda x: x.mean(0), metrics.pop("router"))
            # Per-row metrics ("row_*", [micro, rows]) become [B]; the others are averaged.
            metrics = {k: v.reshape(-1) if k.startswith("row_") else v.mean(0) for k, v in metrics.items()}
            metrics["router"] = router
        updates, opt_state = tx.update(grads, opt_state, params)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return optax.apply_updates(params, updates), opt_state, metrics

    return step


def router_bias_step(graphdef, params, rest, router_loads: dict, rate: float):
    """The rest state (router biases...) after b_e += rate * sign(mean load - load_e); and the
    load imbalance (max / mean load, averaged over MoE layers) of the step that produced the loads."""
    model = nnx.merge(graphdef, params, rest)
    stats = {k: RouterStats(load_E=v, balance=jnp.float32(0)) for k, v in router_loads.items()}
    imbalance = load_imbalance(stats)
    if rate:
        update_router_bias(model, stats, rate)
    return nnx.state(model, nnx.Not(nnx.Param)), imbalance


def sharded_train_step(graphdef, params, rest, tx, mesh: Mesh, rules: ShardingRules, batch_shape,
                       train: TrainConfig = TrainConfig(), objective: Objective | None = None):
    """(jitted step, shardings dict) for `params`/`rest` (arrays or abstract) on `mesh`.

    The shardings dict has "params", "opt_state", "rest" and "batch" for device_put / restore.
    """
    shardings = {
        "params": sharding.state_shardings(params, mesh, rules),
        "rest": sharding.state_shardings(rest, mesh, rules),
        "batch": NamedSharding(mesh, sharding.logical_spec(("batch", "seq"), rules, mesh, batch_shape)),
    }
    shardings["opt_state"] = sharding.optimizer_shardings(tx, jax.eval_shape(tx.init, params), shardings["params"], mesh)
    objective = lm_objective(train) if objective is None else objective
    step = train_step_fn(graphdef, tx, train, objective)

    def traced(*args):
        with sharding.activate(mesh, rules):
            return step(*args)

    jitted = jax.jit(
        traced,
        in_shardings=(shardings["params"], shardings["opt_state"], shardings["rest"],
                      *(shardings["batch"],) * len(objective.batch_keys)),
        out_shardings=(shardings["params"], shardings["opt_state"], None),
        donate_argnums=(0, 1),
    )
    return jitted, shardings
