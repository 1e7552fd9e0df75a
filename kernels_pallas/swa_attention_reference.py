"""Pure-JAX reference for `swa_attention`: the whole [T, S] score matrix, then one softmax.

It defines the semantics the Pallas kernel must reproduce (and is the model's XLA attention path):
a query at position p sees keys at positions p - window .. p of its own segment, plus one learned
sink logit per query head that takes probability mass but carries no value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = -1e30  # finite, so a row with every key masked gives a uniform softmax instead of NaN


def attention_mask(q_positions_BT, kv_positions_BS, window, q_segment_ids_BT=None, kv_segment_ids_BS=None):
    """[B, T, S] bool: causal in positions, within `window` previous positions, same segment."""
    delta_BTS = q_positions_BT[:, :, None] - kv_positions_BS[:, None, :]
    mask = delta_BTS >= 0
    if window is not None:
        mask &= delta_BTS <= window
    if q_segment_ids_BT is not None:
        mask &= q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :]
    return mask


def split_segment_ids(segment_ids, t: int, s: int):
    """(q [B,T], kv [B,S]) segment ids from None, one array (self-attention) or a pair."""
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        return tuple(segment_ids)
    if t != s:
        raise ValueError(f"one segment_ids array needs equal query and key lengths, got {t} and {s}; pass (q, kv)")
    return segment_ids, segment_ids


def default_positions(q_positions, kv_positions, b: int, t: int, s: int):
    """Keys default to positions 0..S-1 and queries to the last T of them (prefill, decode, verify)."""
    if kv_positions is None:
        kv_positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(s - t, s, dtype=jnp.int32), (b, t))
    return q_positions, kv_positions


def swa_attention_reference(q_BTHD, k_BSKD, v_BSKV, sinks_H, *, window, q_positions=None, kv_positions=None,
                            segment_ids=None):
    """Same contract as `kernels_pallas.swa_attention`; fp32 scores scaled by 1/sqrt(Dqk)."""
    b, t, h, d = q_BTHD.shape
    s, kv = k_BSKD.shape[1], k_BSKD.shape[2]
    q_positions, kv_positions = default_positions(q_positions, kv_positions, b, t, s)
    q_BTKGD = q_BTHD.reshape(b, t, kv, h // kv, d)
    scores_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BSKD, preferred_element_type=jnp.float32)
    scores_BKGTS = scores_BKGTS * (d**-0.5)
    q_seg, kv_seg = split_segment_ids(segment_ids, t, s)
    mask_BTS = attention_mask(q_positions, kv_positions, window, q_seg, kv_seg)
    scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, MASK_VALUE)
    if sinks_H is None:
        probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1)
    else:
        # The sink is one more logit in the denominator with no value vector.
        sink_BKGT1 = jnp.broadcast_to(
            sinks_H.astype(jnp.float32).reshape(1, kv, h // kv, 1, 1), (b, kv, h // kv, t, 1)
        )
        probs_BKGTS = jax.nn.softmax(jnp.concatenate([scores_BKGTS, sink_BKGT1], axis=-1), axis=-1)[..., :-1]
    out_BTKGV = jnp.einsum("bkgts,bskv->btkgv", probs_BKGTS.astype(v_BSKV.dtype), v_BSKV)
    return out_BTKGV.reshape(b, t, h, v_BSKV.shape[-1])
