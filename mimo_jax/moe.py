"""Mixture of experts: fp32 sigmoid router with a selection-only bias, dropless sorted dispatch.

The grouped matmul is the seam (`grouped_matmul`): `moe_impl="ragged_dot"` uses
`jax.lax.ragged_dot`, `moe_impl="pallas"` the Pallas `kernels_pallas.gmm` kernel (tgmm for the weight
gradient). `moe_impl="dense"` is the simple reference that runs every expert on every token.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from kernels_pallas.gmm import gmm
from kernels_pallas.gmm_reference import gmm_reference
from mimo_jax import sharding
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


def _expert_ffn(xs_MD, group_sizes_E, w_gate_EDI, w_up_EDI, w_down_EID, impl, interpret):
    """SwiGLU of each expert on its rows (sorted by expert; rows past the groups give zeros)."""
    def matmul(lhs, rhs):
        return grouped_matmul(lhs, rhs, group_sizes_E, impl, interpret)

    return matmul(jax.nn.silu(matmul(xs_MD, w_gate_EDI)) * matmul(xs_MD, w_up_EDI), w_down_EID)


def experts_sorted(x_ND, weights_Nk, experts_Nk, w_gate_EDI, w_up_EDI, w_down_EID, impl="ragged_dot", interpret=False):
    """Dropless dispatch: sort (token, choice) pairs by expert, grouped matmuls, unsort, combine."""
    n, k = experts_Nk.shape
    flat_experts = experts_Nk.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    group_sizes_E = jnp.bincount(flat_experts, length=w_gate_EDI.shape[0]).astype(jnp.int32)
    out_MD = _expert_ffn(x_ND[order // k], group_sizes_E, w_gate_EDI, w_up_EDI, w_down_EID, impl, interpret)
    unsorted_NkD = out_MD[jnp.argsort(order)].reshape(n, k, -1)
    return jnp.einsum("nkd,nk->nd", unsorted_NkD.astype(jnp.float32), weights_Nk).astype(x_ND.dtype)


def expert_capacity(tokens: int, k: int, shards: int, capacity_factor: float) -> int:
    """Slots each device sends to each expert shard: every choice (dropless) when the factor is 0."""
    if capacity_factor <= 0 or shards == 1:
        return tokens * k
    return min(tokens * k, -(-int(math.ceil(capacity_factor * tokens * k / shards)) // 8) * 8)


def experts_expert_parallel(x_ND, weights_Nk, experts_Nk, w_gate, w_up, w_down, *, num_experts, shards,
                            capacity, tensor_split, impl, interpret):
    """Per-device body under shard_map: experts live on `shards` devices of the `expert` axis.

    Each (token, choice) goes to the shard holding its expert through a padded all-to-all of
    [shards, capacity] slots, the local experts run on what arrives, and the results come back
    the same way. The FFN width may be split over `tensor` (partial sums are psum'd).
    """
    n, k = experts_Nk.shape
    local_experts = num_experts // shards
    flat = experts_Nk.reshape(-1)
    dest, local_expert = flat // local_experts, flat % local_experts
    order = jnp.argsort(dest, stable=True)
    counts = jnp.bincount(dest, length=shards)
    rank_sorted = jnp.arange(n * k) - (jnp.cumsum(counts) - counts)[dest[order]]
    rank = jnp.zeros(n * k, jnp.int32).at[order].set(rank_sorted.astype(jnp.int32))
    kept = rank < capacity  # only with a capacity factor: the rest are dropped (zero output)
    slot = jnp.where(kept, dest * capacity + rank, shards * capacity)  # an overflow slot, cut below

    d = x_ND.shape[1]
    send_x = jnp.zeros((shards * capacity + 1, d), x_ND.dtype).at[slot].set(x_ND[jnp.arange(n * k) // k])
    send_e = jnp.full((shards * capacity + 1,), local_experts, jnp.int32).at[slot].set(local_expert)
    recv_x = jax.lax.all_to_all(send_x[:-1].reshape(shards, capacity, d), "expert", 0, 0, tiled=True)
    recv_e = jax.lax.all_to_all(send_e[:-1].reshape(shards, capacity), "expert", 0, 0, tiled=True)

    recv_x, recv_e = recv_x.reshape(shards * capacity, d), recv_e.reshape(-1)
    by_expert = jnp.argsort(recv_e, stable=True)  # empty slots (expert id = local_experts) sort last
    group_sizes = jnp.bincount(recv_e, length=local_experts).astype(jnp.int32)
    out = _expert_ffn(recv_x[by_expert], group_sizes, w_gate, w_up, w_down, impl, interpret)
    if tensor_split:
        out = jax.lax.psum(out, "tensor")
    out = out[jnp.argsort(by_expert)]

    back = jax.lax.all_to_all(out.reshape(shards, capacity, d), "expert", 0, 0, tiled=True).reshape(-1, d)
    back = jnp.concatenate([back, jnp.zeros((1, d), back.dtype)])
    per_choice_NkD = back[slot].reshape(n, k, d)
    return jnp.einsum("nkd,nk->nd", per_choice_NkD.astype(jnp.float32), weights_Nk).astype(x_ND.dtype)


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
        dt = x_BTD.dtype
        w = (self.w_gate[...].astype(dt), self.w_up[...].astype(dt), self.w_down[...].astype(dt))
        if self.cfg.moe_impl != "dense" and sharding.active() is not None:
            return self._sharded(x_BTD, *w)
        b, t, d = x_BTD.shape
        x_ND = x_BTD.reshape(b * t, d)
        weights, experts = route(x_ND, self.router[...], self.bias[...], self.cfg)
        if self.cfg.moe_impl == "dense":
            y_ND = experts_dense(x_ND, weights, experts, *w)
        else:
            y_ND = experts_sorted(x_ND, weights, experts, *w, impl=self.cfg.moe_impl, interpret=self.cfg.pallas_interpret)
        return y_ND.reshape(b, t, d)

    def _sharded(self, x_BTD, w_gate, w_up, w_down):
        """Under a mesh: tokens stay on their devices, experts on the `expert` axis (shard_map)."""
        mesh, rules = sharding.active()
        cfg = self.cfg
        shards = mesh.shape["expert"]
        if cfg.num_experts % shards:
            raise ValueError(f"{cfg.num_experts} experts do not divide over an expert axis of {shards}")
        b, t, d = x_BTD.shape
        batch = sharding.logical_spec(("batch",), rules, mesh, (b,))
        tokens_per_device = b * t // math.prod(mesh.shape[a] for a in jax.tree.leaves(tuple(batch)))
        tensor = "tensor" if mesh.shape["tensor"] > 1 and cfg.moe_intermediate_size % mesh.shape["tensor"] == 0 else None
        capacity = expert_capacity(tokens_per_device, cfg.num_experts_per_token, shards, cfg.moe_capacity_factor)

        def body(x_btd, router, bias, w_gate, w_up, w_down):
            x_ND = x_btd.reshape(-1, d)
            weights, experts = route(x_ND, router, bias, cfg)
            y_ND = experts_expert_parallel(
                x_ND, weights, experts, w_gate, w_up, w_down, num_experts=cfg.num_experts, shards=shards,
                capacity=capacity, tensor_split=tensor is not None, impl=cfg.moe_impl, interpret=cfg.pallas_interpret,
            )
            return y_ND.reshape(x_btd.shape)

        x_spec = P(*batch, None, None) if batch else P()
        return jax.shard_map(
            body, mesh=mesh, check_vma=False,
            in_specs=(x_spec, P(), P(), P("expert", None, tensor), P("expert", None, tensor), P("expert", tensor, None)),
            out_specs=x_spec,
        )(x_BTD, self.router[...], self.bias[...], w_gate, w_up, w_down)
