"""The jitted training step, shared by train.py, the pod plan (`mimo_jax.plan`) and the tests.

`sharded_train_step` places parameters, optimizer state and the batch by the sharding rules and
pins them there across steps (`out_shardings`), so a step never silently changes the layout.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from mimo_jax import sharding
from mimo_jax.config import ModelConfig, ShardingRules
from mimo_jax.model import MiMoV2Flash
from mimo_jax.objective import lm_loss


def abstract_model_state(cfg: ModelConfig):
    """(graphdef, params, rest) of a model as ShapeDtypeStructs: nothing is allocated."""
    return nnx.split(nnx.eval_shape(lambda: MiMoV2Flash(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)


def train_step_fn(graphdef, tx: optax.GradientTransformation, mtp_weight: float = 0.3):
    """step(params, opt_state, rest, input_ids, segment_ids) -> (params, opt_state, metrics)."""

    def step(params, opt_state, rest, input_ids_BT, segment_ids_BT):
        def loss_fn(params):
            out = nnx.merge(graphdef, params, rest)(input_ids_BT, segment_ids_BT)
            return lm_loss(out, input_ids_BT, segment_ids_BT, mtp_weight)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        return optax.apply_updates(params, updates), opt_state, metrics

    return step


def sharded_train_step(graphdef, params, rest, tx, mesh: Mesh, rules: ShardingRules, batch_shape,
                       mtp_weight: float = 0.3):
    """(jitted step, shardings dict) for `params`/`rest` (arrays or abstract) on `mesh`.

    The shardings dict has "params", "opt_state", "rest" and "batch" for device_put / restore.
    """
    shardings = {
        "params": sharding.state_shardings(params, mesh, rules),
        "rest": sharding.state_shardings(rest, mesh, rules),
        "batch": NamedSharding(mesh, sharding.logical_spec(("batch", "seq"), rules, mesh, batch_shape)),
    }
    shardings["opt_state"] = sharding.optimizer_shardings(tx, jax.eval_shape(tx.init, params), shardings["params"], mesh)
    step = train_step_fn(graphdef, tx, mtp_weight)

    def traced(*args):
        with sharding.activate(mesh, rules):
            return step(*args)

    jitted = jax.jit(
        traced,
        in_shardings=(shardings["params"], shardings["opt_state"], shardings["rest"], shardings["batch"],
                      shardings["batch"]),
        out_shardings=(shardings["params"], shardings["opt_state"], None),
        donate_argnums=(0, 1),
    )
    return jitted, shardings
