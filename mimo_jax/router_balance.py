"""Auxiliary-loss-free load balancing: the router correction bias follows a rule, not gradients.

After each step, for every MoE layer, b_e += rate * sign(mean_load - load_e): under-loaded experts
get a higher selection score, over-loaded ones a lower one. The bias only changes which experts
are chosen, never the routing weights (see moe.route).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def update_router_bias(model, router_stats: dict, rate: float) -> None:
    """In place on an nnx model, from ModelOutput.router of the step that just ran."""
    for key, moe in model.moe_runs().items():
        load = router_stats[key].load_E  # [repeats, length, E], like the bias
        moe.bias[...] = moe.bias[...] + rate * jnp.sign(load.mean(-1, keepdims=True) - load)


def load_imbalance(router_stats: dict) -> jax.Array:
    """Mean over MoE layers of max expert load / mean expert load (1.0 is perfectly balanced)."""
    ratios = [jnp.ravel(s.load_E.max(-1) / s.load_E.mean(-1)) for s in router_stats.values()]
    return jnp.concatenate(ratios).mean() if ratios else jnp.float32(1.0)
