"""Mixture of experts: fp32 sigmoid router with a selection-only bias, dropless sorted dispatch.

The grouped matmul is the seam (`grouped_matmul`): `moe_impl="ragged_dot"` uses
`jax.lax.ragged_dot`, `moe_impl="pallas"` the Pallas `kernels_pallas.gmm` kernel (tgmm for the weight
gradient). `moe_impl="dense"` is the simple reference that runs every expert on every token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kernels_pallas.gmm import gmm
from kernels_pallas.gmm_reference import gmm_reference
from mimo_jax.config import ModelConfig
from mimo_jax.layers import RouterBias, make_param


def route(x_ND, router_DE, bias_E, cfg: ModelConfig):
    """Returns (weights [N, k] fp32, expert ids [N, k] int32).

    Scores are sigmoid(x @ W) in fp32 at full precision (bf16 truncation mis-routes). The bias
    only steers which experts are chosen; the weights come from the unbiased scores.
    """
    logits_NE = jnp.dot(x_ND.astype(jnp.float32), router_DE.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    scores_NE = jax.nn.sigmoid(logits_NE)
    choice_NE = scores_NE + bias_E.astype(jnp.float32)
    if cfg.n_group > 1:
        n = x_ND.shape[0]
        grouped = choice_NE.reshape(n, cfg.n_group, cfg.num_experts // cfg.n_group)
        group_score_NG = jax.lax.top_k(grouped, 2)[0].sum(-1)
        _, top_groups = jax.lax.top_k(group_score_NG, cfg.topk_group)
        keep_NG = jnp.zeros_like(group_score_NG, dtype=bool).at[jnp.arange(n)[:, None], top_groups].set(True)
        keep_NE = jnp.repeat(keep_NG, cfg.num_experts // cfg.n_group, axis=1)
        choice_NE = jnp.where(keep_NE, choice_NE, -jnp.inf)
    _, experts_Nk = jax.lax.top_k(choice_NE, cfg.num_experts_per_token)
    weights_Nk = jnp.take_along_axis(scores_NE, experts_Nk, axis=1)
    if cfg.norm_topk_prob:
        weights_Nk = weights_Nk / (weights_Nk.sum(-1, keepdims=True) + 1e-20)
    return weights_Nk * cfg.routed_scaling_factor, experts_Nk.astype(jnp.int32)


def grouped_matmul(lhs_MK, rhs_GKN, group_sizes_G, impl: str = "ragged_dot", interpret=False):
    """Rows of `lhs` sorted by group; rows of group g are multiplied by `rhs[g]`. fp32 accumulate."""
    if impl == "ragged_dot":
        return gmm_reference(lhs_MK, rhs_GKN, group_sizes_G)
    if impl == "pallas":
        return gmm(lhs_MK, rhs_GKN, group_sizes_G, interpret=interpret)
    raise ValueError(f"unknown grouped matmul impl {impl!r}")


def experts_sorted(x_ND, weights_Nk, experts_Nk, w_gate_EDI, w_up_EDI, w_down_EID, impl="ragged_dot", interpret=False):
    """Dropless dispatch: sort (token, choice) pairs by expert, grouped matmuls, unsort, combine."""
    n, k = experts_Nk.shape
    num_experts = w_gate_EDI.shape[0]
    flat_experts = experts_Nk.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    token_of = order // k
    group_sizes_E = jnp.bincount(flat_experts, length=num_experts).astype(jnp.int32)
    xs_MD = x_ND[token_of]
    def matmul(lhs, rhs):
        return grouped_matmul(lhs, rhs, group_sizes_E, impl, interpret)

    h_MI = jax.nn.silu(matmul(xs_MD, w_gate_EDI)) * matmul(xs_MD, w_up_EDI)
    out_MD = matmul(h_MI, w_down_EID)
    unsorted_NkD = out_MD[jnp.argsort(order)].reshape(n, k, -1)
    return jnp.einsum("nkd,nk->nd", unsorted_NkD.astype(jnp.float32), weights_Nk).astype(x_ND.dtype)


def experts_dense(x_ND, weights_Nk, experts_Nk, w_gate_EDI, w_up_EDI, w_down_EID):
    """Reference: every expert on every token, combined with a [N, E] weight matrix."""
    n = x_ND.shape[0]
    combine_NE = jnp.zeros((n, w_gate_EDI.shape[0]), jnp.float32).at[jnp.arange(n)[:, None], experts_Nk].add(weights_Nk)
    h_ENI = jax.nn.silu(jnp.einsum("nd,edi->eni", x_ND, w_gate_EDI)) * jnp.einsum("nd,edi->eni", x_ND, w_up_EDI)
    y_END = jnp.einsum("eni,eid->end", h_ENI, w_down_EID)
    return jnp.einsum("end,ne->nd", y_END.astype(jnp.float32), combine_NE).astype(x_ND.dtype)


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, stack=(), *, rngs: nnx.Rngs):
        d, i, e, std, dt = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.initializer_range, cfg.param_dtype
        self.router = make_param(rngs, (d, e), ("embed", None), jnp.float32, stack, std=std)
        self.bias = make_param(rngs, (e,), (None,), jnp.float32, stack, init="zeros", kind=RouterBias)
        self.w_gate = make_param(rngs, (e, d, i), ("experts", "embed", "mlp"), dt, stack, std=std)
        self.w_up = make_param(rngs, (e, d, i), ("experts", "embed", "mlp"), dt, stack, std=std)
        self.w_down = make_param(rngs, (e, i, d), ("experts", "mlp", "embed"), dt, stack, std=std)
        self.cfg = cfg

    def __call__(self, x_BTD):
        b, t, d = x_BTD.shape
        dt = x_BTD.dtype
        x_ND = x_BTD.reshape(b * t, d)
        weights, experts = route(x_ND, self.router[...], self.bias[...], self.cfg)
        w = (self.w_gate[...].astype(dt), self.w_up[...].astype(dt), self.w_down[...].astype(dt))
        if self.cfg.moe_impl == "dense":
            y_ND = experts_dense(x_ND, weights, experts, *w)
        else:
            y_ND = experts_sorted(x_ND, weights, experts, *w, impl=self.cfg.moe_impl, interpret=self.cfg.pallas_interpret)
        return y_ND.reshape(b, t, d)
