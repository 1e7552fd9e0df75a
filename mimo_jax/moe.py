"""Mixture of experts: fp32 sigmoid router with a selection-only bias, dropless sorted dispatch.

The grouped matmul is the seam (`grouped_matmul`): `moe_impl="xla"` loops over row tiles
(`mimo_jax.blocked_gmm`, the default off TPU), `moe_impl="pallas"` uses the Pallas
`kernels_pallas.gmm` kernel (tgmm for the weight gradient, the default on TPU), `moe_impl="ragged_dot"`
`jax.lax.ragged_dot`. `moe_impl="dense"` is the simple reference that runs every expert on every token.

Under `xla`, a call with few tokens (a decode step) skips the sort and the loops, which cost more
than its matmuls there: with N tokens, k choices and E experts, N k <= E gathers each choice's
expert weights (`experts_gathered`; it reads no more weights than the experts hold). On 2 CPU cores
this doubles batch-1 decode of the tiny model; at batch 8 (N k = 2 E) the sorted path is faster again.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from kernels_pallas.gmm import gmm
from kernels_pallas.gmm_reference import gmm_reference
from mimo_jax import sharding
from mimo_jax.blocked_gmm import blocked_gmm
from mimo_jax.config import ModelConfig
from mimo_jax.fp8 import BLOCK as FP8_BLOCK
from mimo_jax.fp8_resident import Fp8Weight, operand, weight
from mimo_jax.layer_view import LayerView
from mimo_jax.layers import RouterBias, make_param


@flax.struct.dataclass
class RouterStats:
    """Per MoE layer: the share of routed choices each expert got, and the sequence-level balance
    loss term sum_e f_e * P_e averaged over sequences (f: the sequence's load share scaled by E,
    P: its mean normalised score), as in the paper's auxiliary balance loss."""

    load_E: jax.Array
    balance: jax.Array


def router_stats(scores_BTE, experts_BTk, num_experts: int, segment_ids_BT=None) -> RouterStats:
    """Loads and the balance term over real tokens: positions with segment id 0 (padding) are left
    out, so a mostly padded row (MOPD rollouts, a stream's last row) does not steer the bias rule.
    load_E is the share of all real tokens' choices; the balance averages over rows with a real
    token. Without segment ids every position counts."""
    b, t, k = experts_BTk.shape
    real_BT = jnp.ones((b, t), jnp.float32) if segment_ids_BT is None else (segment_ids_BT != 0).astype(jnp.float32)
    choices_BTk = jnp.broadcast_to(real_BT[..., None], (b, t, k))
    counts_BE = jnp.zeros((b, num_experts), jnp.float32).at[jnp.arange(b)[:, None, None], experts_BTk].add(choices_BTk)
    tokens_B = real_BT.sum(1)
    share_BE = counts_BE / (jnp.maximum(tokens_B, 1.0) * k)[:, None]
    probs_BTE = scores_BTE / scores_BTE.sum(-1, keepdims=True)
    probs_BE = jnp.einsum("bte,bt->be", probs_BTE, real_BT) / jnp.maximum(tokens_B, 1.0)[:, None]
    rows_B = (tokens_B > 0).astype(jnp.float32)
    balance_B = jnp.sum(num_experts * share_BE * probs_BE, axis=-1)
    balance = jnp.sum(balance_B * rows_B) / jnp.maximum(rows_B.sum(), 1.0)
    load_E = counts_BE.sum(0) / (jnp.maximum(tokens_B.sum(), 1.0) * k)
    return RouterStats(load_E=jax.lax.stop_gradient(load_E), balance=balance)


def route(x_ND, router_DE, bias_E, cfg: ModelConfig):
    """Returns (weights [N, k] fp32, expert ids [N, k] int32, sigmoid scores [N, E] fp32).

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
    return weights_Nk * cfg.routed_scaling_factor, experts_Nk.astype(jnp.int32), scores_NE


def grouped_matmul(lhs_MK, rhs_GKN, group_sizes_G, impl: str = "xla", interpret=False):
    """Rows of `lhs` sorted by group; rows of group g are multiplied by `rhs[g]`. fp32 accumulate.
    An FP8-resident `rhs` (`Fp8Weight`) is dequantised block by block inside the Pallas kernel, and
    as a whole in `lhs.dtype` for the other impls; a `LayerView` is read from its stack by the
    Pallas kernel, and sliced out for the others."""
    layer = None
    if isinstance(rhs_GKN, LayerView):
        if impl == "pallas":
            rhs_GKN, layer = rhs_GKN.stack, rhs_GKN.index
        else:
            rhs_GKN = rhs_GKN.materialize()
    if isinstance(rhs_GKN, Fp8Weight):
        if impl == "pallas":
            return gmm(lhs_MK, rhs_GKN.values, group_sizes_G, rhs_scale=rhs_GKN.scale, rhs_layer=layer,
                       interpret=interpret)
        rhs_GKN = rhs_GKN.dequantize(lhs_MK.dtype)
    if layer is not None:
        return gmm(lhs_MK, rhs_GKN, group_sizes_G, rhs_layer=layer, interpret=interpret)
    if impl == "xla":
        return blocked_gmm(lhs_MK, rhs_GKN, group_sizes_G)
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


def experts_sorted(x_ND, weights_Nk, experts_Nk, w_gate_EDI, w_up_EDI, w_down_EID, impl="xla", interpret=False):
    """Dropless dispatch: sort (token, choice) pairs by expert, grouped matmuls, unsort, combine."""
    n, k = experts_Nk.shape
    flat_experts = experts_Nk.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    group_sizes_E = jnp.bincount(flat_experts, length=w_gate_EDI.shape[0]).astype(jnp.int32)
    out_MD = _expert_ffn(x_ND[order // k], group_sizes_E, w_gate_EDI, w_up_EDI, w_down_EID, impl, interpret)
    unsorted_NkD = out_MD[jnp.argsort(order)].reshape(n, k, -1)
    return jnp.einsum("nkd,nk->nd", unsorted_NkD.astype(jnp.float32), weights_Nk).astype(x_ND.dtype)


def expert_capacity(tokens: int, k: int, shards: int, capacity_factor: float) -> int | None:
    """Slots each device sends to each expert shard, or None for dropless (factor 0)."""
    if capacity_factor <= 0:
        return None
    return min(tokens * k, -(-int(math.ceil(capacity_factor * tokens * k / shards)) // 8) * 8)


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis, emulate: bool):
    """`jax.lax.ragged_all_to_all` over the mesh axes `axis`; `emulate` (XLA:CPU has no ragged
    all-to-all) gathers every shard's rows and lets each receiver pick its slices, same semantics."""
    if not emulate:
        return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                         axis_name=axis)
    me = jax.lax.axis_index(axis)
    rows = jax.lax.all_gather(operand, axis)
    from_offsets, to_offsets, sizes = (jax.lax.all_gather(a, axis)[:, me]
                                       for a in (input_offsets, output_offsets, send_sizes))
    position = jnp.arange(output.shape[0])
    for source in range(rows.shape[0]):
        hit = (position >= to_offsets[source]) & (position < to_offsets[source] + sizes[source])
        picked = rows[source][jnp.clip(from_offsets[source] + position - to_offsets[source], 0, operand.shape[0] - 1)]
        output = jnp.where(hit.reshape((-1,) + (1,) * (output.ndim - 1)), picked, output)
    return output


def _exclusive_cumsum(x, axis=0):
    return jnp.cumsum(x, axis=axis) - x


def experts_expert_parallel(x_ND, weights_Nk, experts_Nk, w_gate, w_up, w_down, *, num_experts, shards,
                            capacity, impl, interpret, emulate_ragged, axis=("expert",), width_axis=None,
                            replicated_axis=None):
    """Per-device body under shard_map: experts live on the `shards` devices of the mesh axes `axis`.

    Each (token, choice) goes to the shard holding its expert and its result comes back. Dropless
    (capacity None): a ragged all-to-all moves exactly the rows each shard gets, into a buffer
    big enough for the worst case. With a capacity: a padded all-to-all of [shards, capacity]
    slots, choices past a shard's capacity are dropped. The FFN width may be split over the mesh
    axes `width_axis` (partial outputs summed there). Where the tokens are the same on every
    device of the mesh axes `replicated_axis` (a batch too small to split over them, as in
    batch-1 decoding), each of those devices sends only every r-th choice and the partial outputs
    are summed there, so no expert computes a choice twice.
    """
    n, k = experts_Nk.shape
    d = x_ND.shape[1]
    local_experts = num_experts // shards
    flat = experts_Nk.reshape(-1)
    dest, local_expert = flat // local_experts, (flat % local_experts).astype(jnp.int32)
    if replicated_axis:
        copies = math.prod(jax.lax.axis_size(a) for a in replicated_axis)
        mine = jnp.arange(n * k) % copies == jax.lax.axis_index(replicated_axis)
        dest = jnp.where(mine, dest, shards)  # sorted last and counted nowhere: never sent
    order = jnp.argsort(dest, stable=True)  # choices grouped by destination shard
    counts = jnp.bincount(dest, length=shards).astype(jnp.int32)
    rows_sorted, experts_sorted_ = x_ND[order // k], local_expert[order]

    if capacity is None:
        counts_SS = jax.lax.all_gather(counts, axis)  # [source, destination]
        me = jax.lax.axis_index(axis)
        from_me, to_me = counts, counts_SS[:, me]
        # (input offsets, send sizes, offsets on the receivers, receive sizes) for each direction.
        there_offsets = (_exclusive_cumsum(from_me), from_me, _exclusive_cumsum(counts_SS, axis=0)[me], to_me)
        back_offsets = (_exclusive_cumsum(to_me), to_me, _exclusive_cumsum(counts_SS, axis=1)[:, me], from_me)

        def exchange(operand, fill, there=True):
            offsets = there_offsets if there else back_offsets
            length = shards * n * k if there else n * k  # worst case there: every choice of every shard
            output = jnp.full((length,) + operand.shape[1:], fill, operand.dtype)
            return ragged_all_to_all(operand, output, *offsets, axis=axis, emulate=emulate_ragged)

        recv_x, recv_e = exchange(rows_sorted, 0), exchange(experts_sorted_, local_experts)
    else:
        sent = dest[order] < shards
        rank = jnp.arange(n * k) - _exclusive_cumsum(counts)[jnp.minimum(dest[order], shards - 1)]
        slot = jnp.where(sent & (rank < capacity), dest[order] * capacity + rank, shards * capacity)  # last: dropped

        def exchange(operand, fill, there=True):
            if there:
                buffer = jnp.full((shards * capacity + 1,) + operand.shape[1:], fill, operand.dtype)
                operand = buffer.at[slot].set(operand)[:-1]
            moved = jax.lax.all_to_all(operand.reshape((shards, capacity) + operand.shape[1:]), axis, 0, 0, tiled=True)
            moved = moved.reshape((shards * capacity,) + operand.shape[1:])
            if there:
                return moved
            return jnp.concatenate([moved, jnp.zeros((1,) + moved.shape[1:], moved.dtype)])[slot]

        recv_x, recv_e = exchange(rows_sorted, 0), exchange(experts_sorted_, local_experts)

    by_expert = jnp.argsort(recv_e, stable=True)  # empty slots (expert id = local_experts) sort last
    group_sizes = jnp.bincount(recv_e, length=local_experts).astype(jnp.int32)
    out = _expert_ffn(recv_x[by_expert], group_sizes, w_gate, w_up, w_down, impl, interpret)
    if width_axis:
        out = jax.lax.psum(out, width_axis)
    back_sorted = exchange(out[jnp.argsort(by_expert)], 0, there=False)  # rows in `order`
    per_choice_NkD = jnp.zeros_like(back_sorted).at[order].set(back_sorted).reshape(n, k, d)
    y_ND = jnp.einsum("nkd,nk->nd", per_choice_NkD.astype(jnp.float32), weights_Nk)
    if replicated_axis:
        y_ND = jax.lax.psum(y_ND, replicated_axis)
    return y_ND.astype(x_ND.dtype)


def experts_gathered(x_ND, weights_Nk, experts_Nk, w_gate_EDI, w_up_EDI, w_down_EID):
    """Each (token, choice) times its own expert's weights, gathered [N, k, ...]: no sort, no loop."""
    def matmul(spec, lhs, w):
        return jnp.einsum(spec, lhs, w[experts_Nk], preferred_element_type=jnp.float32).astype(x_ND.dtype)

    h_NkI = jax.nn.silu(matmul("nd,nkdi->nki", x_ND, w_gate_EDI)) * matmul("nd,nkdi->nki", x_ND, w_up_EDI)
    y_NkD = matmul("nki,nkid->nkd", h_NkI, w_down_EID)
    return jnp.einsum("nkd,nk->nd", y_NkD.astype(jnp.float32), weights_Nk).astype(x_ND.dtype)


def experts_dense(x_ND, weights_Nk, experts_Nk, w_gate_EDI, w_up_EDI, w_down_EID):
    """Reference: every expert on every token, combined with a [N, E] weight matrix."""
    n = x_ND.shape[0]
    combine_NE = jnp.zeros((n, w_gate_EDI.shape[0]), jnp.float32).at[jnp.arange(n)[:, None], experts_Nk].add(weights_Nk)
    h_ENI = jax.nn.silu(jnp.einsum("nd,edi->eni", x_ND, w_gate_EDI)) * jnp.einsum("nd,edi->eni", x_ND, w_up_EDI)
    y_END = jnp.einsum("eni,eid->end", h_ENI, w_down_EID)
    return jnp.einsum("end,ne->nd", y_END.astype(jnp.float32), combine_NE).astype(x_ND.dtype)


class MoE(nnx.Module):
    EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")

    def __init__(self, cfg: ModelConfig, stack=(), *, rngs: nnx.Rngs):
        d, i, e, std, dt = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.initializer_range, cfg.param_dtype
        self.router = make_param(rngs, (d, e), ("embed", None), jnp.float32, stack, std=std)
        self.bias = make_param(rngs, (e,), (None,), jnp.float32, stack, init="zeros", kind=RouterBias)
        self.w_gate = make_param(rngs, (e, d, i), ("experts", "embed", "mlp"), dt, stack, std=std)
        self.w_up = make_param(rngs, (e, d, i), ("experts", "embed", "mlp"), dt, stack, std=std)
        self.w_down = make_param(rngs, (e, i, d), ("experts", "mlp", "embed"), dt, stack, std=std)
        self.cfg = cfg

    @property
    def reads_layers_in_place(self) -> bool:
        """Whether the expert weights may be `LayerView`s of their stacks: the Pallas kernel indexes
        them, where each device holds whole stacks (no `layers` sharding rule splits them)."""
        active = sharding.active()
        split = active is not None and any(active[0].shape[a] > 1 for a in active[1].layers)
        return self.cfg.resolved_moe_impl == "pallas" and not split

    def __call__(self, x_BTD, segment_ids_BT=None):
        """(y [B,T,D], RouterStats over the non-padding tokens) — the stats feed the balance loss and
        the router-bias update."""
        dt = x_BTD.dtype
        b, t, d = x_BTD.shape
        impl = self.cfg.resolved_moe_impl
        # The Pallas grouped matmul dequantises FP8-resident experts per block and reads a layer of
        # stacked weights in place; the others take them dequantised and sliced.
        w = tuple(weight(getattr(self, name), dt, in_kernel=impl == "pallas") for name in self.EXPERT_WEIGHTS)
        weights_BTk, experts_BTk, scores_BTE = route(x_BTD.reshape(b * t, d), self.router[...], self.bias[...], self.cfg)
        weights_BTk, experts_BTk = weights_BTk.reshape(b, t, -1), experts_BTk.reshape(b, t, -1)
        stats = router_stats(scores_BTE.reshape(b, t, -1), experts_BTk, self.cfg.num_experts, segment_ids_BT)
        if impl != "dense" and sharding.active() is not None:
            return self._sharded(x_BTD, weights_BTk, experts_BTk, *w), stats
        x_ND, weights, experts = x_BTD.reshape(b * t, d), weights_BTk.reshape(b * t, -1), experts_BTk.reshape(b * t, -1)
        n, k, e = b * t, weights.shape[1], self.cfg.num_experts
        if impl == "xla" and n * k <= e:
            y_ND = experts_gathered(x_ND, weights, experts, *w)
        elif impl == "dense":
            y_ND = experts_dense(x_ND, weights, experts, *w)
        else:
            y_ND = experts_sorted(x_ND, weights, experts, *w, impl=impl, interpret=self.cfg.pallas_interpret)
        return y_ND.reshape(b, t, d), stats

    def _sharded(self, x_BTD, weights_BTk, experts_BTk, w_gate, w_up, w_down):
        """Under a mesh (shard_map): experts on the mesh axes of the `experts` rule, the FFN width
        on those of `mlp` left over, tokens on their devices. Tokens sharded by `seq` stay so,
        unless the width is split over the same axes: then the width's group needs them all."""
        mesh, rules = sharding.active()
        cfg = self.cfg
        b, t, d = x_BTD.shape
        experts_spec = sharding.logical_spec(("experts", "embed", "mlp"), rules, mesh, w_gate.shape)
        ep, width = sharding.spec_axes(experts_spec, 0), sharding.spec_axes(experts_spec, 2)
        shards = math.prod(mesh.shape[a] for a in ep)
        if cfg.num_experts % shards or not ep and mesh.shape["expert"] > 1:
            raise ValueError(f"{cfg.num_experts} experts do not divide over the expert mesh axes "
                             f"{dict((a, mesh.shape[a]) for a in rules.experts)} (sharding.experts)")
        rows_spec = sharding.logical_spec(("batch", "seq"), rules, mesh, (b, t))
        batch, seq = sharding.spec_axes(rows_spec, 0), sharding.spec_axes(rows_spec, 1)
        if set(seq) & set(width):
            seq = ()
        width_shards = math.prod(mesh.shape[a] for a in width)
        fp8_down = w_down.stack if isinstance(w_down, LayerView) else w_down
        if isinstance(fp8_down, Fp8Weight) and w_down.shape[1] % (FP8_BLOCK * width_shards):
            # Its 128-row scale blocks would straddle the width shards.
            w_down = operand(w_down, x_BTD.dtype)
        tokens_per_device = b * t // math.prod(mesh.shape[a] for a in batch + seq)
        replicated = tuple(a for a in ep if a not in batch + seq and mesh.shape[a] > 1)
        capacity = expert_capacity(tokens_per_device, cfg.num_experts_per_token, shards, cfg.moe_capacity_factor)

        def body(x_btd, weights_btk, experts_btk, w_gate, w_up, w_down):
            k = weights_btk.shape[-1]
            y_ND = experts_expert_parallel(
                x_btd.reshape(-1, d), weights_btk.reshape(-1, k), experts_btk.reshape(-1, k), w_gate, w_up, w_down,
                num_experts=cfg.num_experts, shards=shards, capacity=capacity,
                impl=cfg.resolved_moe_impl, interpret=cfg.pallas_interpret,
                emulate_ragged=mesh.devices.flat[0].platform == "cpu", axis=ep or ("expert",), width_axis=width or None,
                replicated_axis=replicated or None,
            )
            return y_ND.reshape(x_btd.shape)

        rows = P(batch or None, seq or None, None)
        ep_spec, width_spec = ep or None, width or None

        def weight_spec(w, *layer_spec):
            if isinstance(w, LayerView):  # the stack axes whole on every device, the index replicated
                return LayerView(P(*(None,) * w.index.shape[0], *layer_spec), P())
            return P(*layer_spec)

        return jax.shard_map(
            body, mesh=mesh, check_vma=False,
            in_specs=(rows, rows, rows, weight_spec(w_gate, ep_spec, None, width_spec),
                      weight_spec(w_up, ep_spec, None, width_spec), weight_spec(w_down, ep_spec, width_spec, None)),
            out_specs=rows,
        )(x_BTD, weights_BTk, experts_BTk, w_gate, w_up, w_down)
