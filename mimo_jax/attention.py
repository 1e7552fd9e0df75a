"""The attention seam: every attention call in the model goes through `attention()`.

`impl="xla"` is plain XLA: block-local attention (`mimo_jax.blocked_attention`, work T·W) for
self-attention where blocking pays off (`blocked_attention.pays_off`: more than one block, and for
causal layers more than 512 tokens), the dense reference (`kernels_pallas.swa_attention_reference`)
for anything else.
`impl="dense"` is always the dense reference; `impl="pallas"` is the block-sparse flash kernel
(`kernels_pallas.swa_attention`). All take the same arguments, so switching is a config change
(`model.attention_impl`). Under a mesh (`sharding.activate`) XLA partitions the XLA paths itself;
the kernel runs per device with shard_map: batch over the batch axes, heads over the tensor axis.
"""

from __future__ import annotations

import functools
import math

import jax
from jax.sharding import PartitionSpec as P

from kernels_pallas.swa_attention import swa_attention
from kernels_pallas.swa_attention_reference import attention_mask, default_positions, swa_attention_reference
from mimo_jax import sharding
from mimo_jax.blocked_attention import blocked_attention, pays_off

__all__ = ["attention", "attention_mask"]


def attention(q_BTHD, k_BSKD, v_BSKV, sinks_H, *, window, q_positions, kv_positions, segment_ids=None, impl="xla",
              interpret=False):
    """Causal (window=None) or sliding-window attention.

    `window` is the number of previous positions each query sees besides itself. `segment_ids`
    is one [B, T] array when queries and keys are the same tokens, else a (q [B,T], kv [B,S]) pair.
    `interpret` only matters for the Pallas kernel (True on CPU, False when compiling for TPU).

    With `impl="xla"`, a caller asserts self-attention (the blocked path's contract: the same T
    tokens as queries and keys, positions increasing inside each segment) by passing the same
    object as `q_positions` and `kv_positions` (or None for both) and one `segment_ids` array or
    None; cached calls pass the cache's own key positions and get the dense reference.
    """
    kwargs = dict(window=window, q_positions=q_positions, kv_positions=kv_positions, segment_ids=segment_ids)
    if impl == "xla":
        b, t = q_BTHD.shape[:2]
        self_attention = q_positions is kv_positions and k_BSKD.shape[1] == t and not isinstance(segment_ids, (tuple, list))
        if self_attention and pays_off(t, window):
            positions_BT, _ = default_positions(q_positions, kv_positions, b, t, t)
            return blocked_attention(q_BTHD, k_BSKD, v_BSKV, sinks_H, window=window, positions_BT=positions_BT,
                                     segment_ids_BT=segment_ids)
        return swa_attention_reference(q_BTHD, k_BSKD, v_BSKV, sinks_H, **kwargs)
    if impl == "dense":
        return swa_attention_reference(q_BTHD, k_BSKD, v_BSKV, sinks_H, **kwargs)
    if impl == "pallas":
        kernel = functools.partial(swa_attention, interpret=interpret)
        if sharding.active() is not None:
            return _per_device(kernel, q_BTHD, k_BSKD, v_BSKV, sinks_H, **kwargs)
        return kernel(q_BTHD, k_BSKD, v_BSKV, sinks_H, **kwargs)
    raise ValueError(f"unknown attention impl {impl!r}")


def _per_device(kernel, q_BTHD, k_BSKD, v_BSKV, sinks_H, *, window, q_positions, kv_positions, segment_ids):
    """The kernel under shard_map: XLA cannot partition a custom call, so each device gets its own
    batch rows and query heads (and the kv heads those use)."""
    mesh, rules = sharding.active()
    b, _, h, _ = q_BTHD.shape
    kv = k_BSKD.shape[2]
    batch = tuple(sharding.logical_spec(("batch",), rules, mesh, (b,))) or (None,)
    heads = tuple(sharding.logical_spec(("act_heads",), rules, mesh, (h,))) or (None,)
    head_axes = () if heads[0] is None else (heads[0],) if isinstance(heads[0], str) else heads[0]
    head_shards = math.prod(mesh.shape[a] for a in head_axes)
    kv_split = kv % head_shards == 0
    kv_heads = heads[0] if kv_split else None
    groups = h // kv

    def body(q, k, v, sinks, q_pos, kv_pos, seg):
        if not kv_split:  # kv heads replicated: keep the ones this device's query heads use
            local_h = h // head_shards
            start = jax.lax.axis_index(head_axes) * local_h // groups
            k = jax.lax.dynamic_slice_in_dim(k, start, max(1, local_h // groups), axis=2)
            v = jax.lax.dynamic_slice_in_dim(v, start, max(1, local_h // groups), axis=2)
        return kernel(q, k, v, sinks, window=window, q_positions=q_pos, kv_positions=kv_pos, segment_ids=seg)

    rows = P(batch[0], None)
    seg_spec = None if segment_ids is None else (rows, rows) if isinstance(segment_ids, (tuple, list)) else rows
    return jax.shard_map(
        body, mesh=mesh, check_vma=False,
        in_specs=(P(batch[0], None, heads[0], None), P(batch[0], None, kv_heads, None),
                  P(batch[0], None, kv_heads, None), None if sinks_H is None else P(heads[0]), rows, rows, seg_spec),
        out_specs=P(batch[0], None, heads[0], None),
    )(q_BTHD, k_BSKD, v_BSKV, sinks_H, q_positions, kv_positions,
      tuple(segment_ids) if isinstance(segment_ids, (tuple, list)) else segment_ids)
