"""Sliding-window / causal attention with learned sinks: a block-sparse flash kernel for TPU.

Layout. Queries are regrouped as [B, Hkv, G, T, D] so one grid step loads a K/V block once and uses
it for all G query heads that share it (GQA 8:1 and 16:1 in the released model).

Sparsity. The grid is (batch, kv head, query block, step). For each query block the wrapper
computes, from positions, the first and last key block that can hold a visible key, and the
kernel walks only that range: `kv_steps` grid steps, a static bound (window + block)/block_kv + 2
for sliding windows, so work grows as T*W rather than T^2. Steps past the range repeat the last
block index (Pallas then skips the copy) and do no compute. The backward pass is the mirror image:
for each key block, the range of query blocks that can see it.

Ranges are computed from "order keys": the token index when one segment_ids array describes packed
self-attention (documents are contiguous and positions advance by one inside a document), else
the positions themselves. The static step bound therefore holds when order keys increase along
the sequence, with at most one wrap for a ring-buffer cache no longer than window + block_kv.

Softmax. Online softmax in fp32 whose initial state is the sink: m = sink, l = 1 (exp(sink - m)),
so the sink takes its share of the denominator and contributes no value.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.swa_attention_reference import MASK_VALUE, default_positions, split_segment_ids

_NEVER = 2**30  # position of padding keys: later than every query, so causality hides them
_MIN_ROWS = 16  # bf16 packs 16 rows per sublane tile


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one call; hashable so it can be a custom_vjp nondiff argument."""

    window: int | None
    scale: float
    has_sinks: bool
    has_segments: bool
    groups: int
    block_q: int
    block_kv: int
    num_q_blocks: int
    num_kv_blocks: int
    kv_steps: int
    q_steps: int
    kv_visits: int  # key blocks visited per (batch, kv head), summed over query blocks, default positions
    q_visits: int  # query blocks visited per (batch, kv head) by the dK/dV kernel, default positions
    interpret: Any


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _default_block_q(groups: int) -> int:
    # All G heads' query tiles and accumulators sit in VMEM at once: keep G * block_q near 1024 rows.
    return max(_MIN_ROWS, min(128, 1024 // groups))


def _visit_ranges(xp, order_q_BT, valid_q_BT, order_kv_BS, valid_kv_BS, window, block_q, block_kv):
    """First/last key block per query block and first/last query block per key block (int32).

    `xp` is jnp for the kernel's metadata and numpy for static cost estimates.
    """
    big = np.iinfo(np.int32).max

    def block_min_max(order, valid, block):
        b, n = order.shape
        order, valid = order.reshape(b, n // block, block), valid.reshape(b, n // block, block)
        return xp.where(valid, order, big).min(-1), xp.where(valid, order, -big).max(-1)

    q_min, q_max = block_min_max(order_q_BT, valid_q_BT, block_q)
    kv_min, kv_max = block_min_max(order_kv_BS, valid_kv_BS, block_kv)
    # Block pairs where some key is not after some query and (windowed) not too far before it.
    meets_QK = (kv_min[:, None, :] <= q_max[:, :, None]) & (q_max[:, :, None] > -big) & (kv_max[:, None, :] > -big)
    if window is not None:
        meets_QK &= kv_max[:, None, :] >= q_min[:, :, None] - window

    def first_last(meets, axis):
        n = meets.shape[axis]
        any_ = meets.any(axis)
        first = xp.argmax(meets, axis=axis)
        last = n - 1 - xp.argmax(xp.flip(meets, axis=axis), axis=axis)
        # An empty range is (0, -1): zero steps of compute.
        return xp.where(any_, first, 0).astype(np.int32).reshape(-1), xp.where(any_, last, -1).astype(np.int32).reshape(-1)

    kv_lo, kv_hi = first_last(meets_QK, axis=2)
    q_lo, q_hi = first_last(meets_QK, axis=1)
    return kv_lo, kv_hi, q_lo, q_hi


def _block_at(lo_ref, hi_ref, row, step):
    lo = lo_ref[row]
    return jnp.minimum(lo + step, jnp.maximum(hi_ref[row], lo))


def _visible(plan: _Plan, q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref):
    """[block_q, block_kv] bool mask from [bq, 1] query and [1, bk] key positions / segments."""
    delta = q_pos_ref[...] - kv_pos_ref[...]
    mask = delta >= 0
    if plan.window is not None:
        mask &= delta <= plan.window
    if plan.has_segments:
        mask &= q_seg_ref[...] == kv_seg_ref[...]
    return mask


def _nt(a, b):
    """a @ b.T without materialising the transpose."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _tn(a, b):
    """a.T @ b without materialising the transpose."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _split_refs(plan: _Plan, refs):
    """(q_seg_ref, kv_seg_ref, rest): segment refs are only passed when the call has segments."""
    if plan.has_segments:
        return refs[0], refs[1], refs[2:]
    return None, None, refs


# ----------------------------------------------------------------------------------- forward


def _forward_kernel(kv_lo_ref, kv_hi_ref, sinks_ref, q_ref, k_ref, v_ref, q_pos_ref, kv_pos_ref, *refs, plan: _Plan):
    q_seg_ref, kv_seg_ref, (o_ref, lse_ref, m_scr, l_scr, acc_scr) = _split_refs(plan, refs)
    b, h, qi, step = (pl.program_id(i) for i in range(4))
    row = b * plan.num_q_blocks + qi
    rows = q_ref.shape[1]

    @pl.when(step == 0)
    def _init():
        for g in range(plan.groups):
            if plan.has_sinks:
                m_scr[g] = jnp.full((rows, 1), sinks_ref[h * plan.groups + g], jnp.float32)
                l_scr[g] = jnp.ones((rows, 1), jnp.float32)
            else:
                m_scr[g] = jnp.full((rows, 1), MASK_VALUE, jnp.float32)
                l_scr[g] = jnp.zeros((rows, 1), jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(kv_lo_ref[row] + step <= kv_hi_ref[row])
    def _accumulate():
        mask = _visible(plan, q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref)
        k, v = k_ref[...], v_ref[...]
        for g in range(plan.groups):
            s = jnp.where(mask, _nt(q_ref[g], k) * plan.scale, MASK_VALUE)
            m_prev = m_scr[g]
            m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
            p = jnp.where(mask, jnp.exp(s - m_next), 0.0)
            alpha = jnp.exp(m_prev - m_next)
            l_scr[g] = alpha * l_scr[g] + p.sum(axis=1, keepdims=True)
            acc_scr[g] = alpha * acc_scr[g] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            m_scr[g] = m_next

    @pl.when(step == plan.kv_steps - 1)
    def _finish():
        for g in range(plan.groups):
            # l == 0 only for a row that sees nothing (padding, or no sink and no key): output 0.
            denom = jnp.where(l_scr[g] == 0.0, 1.0, l_scr[g])
            o_ref[g] = (acc_scr[g] / denom).astype(o_ref.dtype)
            lse_ref[g] = (m_scr[g] + jnp.log(denom))[:, 0]


def _common_specs(plan: _Plan, by_q_block: bool):
    """BlockSpecs for (q-side, kv-side) tensors; the outer grid axis walks q blocks or kv blocks."""
    g, bq, bk = plan.groups, plan.block_q, plan.block_kv

    if by_q_block:
        def q_block(b, qi, step, lo, hi):
            return qi

        def kv_block(b, qi, step, lo, hi):
            return _block_at(lo, hi, b * plan.num_q_blocks + qi, step)
    else:
        def q_block(b, ki, step, lo, hi):
            return _block_at(lo, hi, b * plan.num_kv_blocks + ki, step)

        def kv_block(b, ki, step, lo, hi):
            return ki

    def q_side(last_dim):
        return pl.BlockSpec((None, None, g, bq, last_dim), lambda b, h, i, s, lo, hi, *_: (b, h, 0, q_block(b, i, s, lo, hi), 0))

    def kv_side(last_dim):
        return pl.BlockSpec((None, None, bk, last_dim), lambda b, h, i, s, lo, hi, *_: (b, h, kv_block(b, i, s, lo, hi), 0))

    # Per-row statistics (lse, delta) live as [B, Hkv, nQ, G, bq] so rows run along lanes; a
    # [.., T, 1] layout would be padded to 128 lanes in HBM.
    row_stats = pl.BlockSpec((None, None, None, g, bq), lambda b, h, i, s, lo, hi, *_: (b, h, q_block(b, i, s, lo, hi), 0, 0))
    q_pos = pl.BlockSpec((None, bq, 1), lambda b, h, i, s, lo, hi, *_: (b, q_block(b, i, s, lo, hi), 0))
    kv_pos = pl.BlockSpec((None, None, 1, bk), lambda b, h, i, s, lo, hi, *_: (b, kv_block(b, i, s, lo, hi), 0, 0))
    return q_side, kv_side, row_stats, q_pos, kv_pos


def _position_operands(plan: _Plan, q_pos, kv_pos, q_seg, kv_seg, q_pos_spec, kv_pos_spec):
    operands, specs = [q_pos, kv_pos], [q_pos_spec, kv_pos_spec]
    if plan.has_segments:
        operands += [q_seg, kv_seg]
        specs += [q_pos_spec, kv_pos_spec]
    return operands, specs


def _compiler_params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _cost(plan: _Plan, q5, *, visits: int, matmul_dims: int, bytes_per_visit: int, resident_bytes: int):
    """XLA cost estimate for one kernel: `matmul_dims` sums the contraction/output widths of its
    [bq, bk]-tile matmuls, `bytes_per_visit` is what one visited block pair streams in."""
    pairs = q5.shape[0] * q5.shape[1] * visits
    tiles = pairs * plan.groups * plan.block_q * plan.block_kv
    return pl.CostEstimate(flops=2 * tiles * matmul_dims, transcendentals=tiles,
                           bytes_accessed=int(pairs * bytes_per_visit + resident_bytes))


def _nbytes(*arrays):
    return sum(a.size * a.dtype.itemsize for a in arrays)


def _forward(plan: _Plan, q5, k4, v4, sinks, q_pos, kv_pos, q_seg, kv_seg, kv_lo, kv_hi):
    b, kv_heads, g, t_pad, d = q5.shape
    dv = v4.shape[-1]
    q_side, kv_side, row_stats, q_pos_spec, kv_pos_spec = _common_specs(plan, by_q_block=True)
    pos_operands, pos_specs = _position_operands(plan, q_pos, kv_pos, q_seg, kv_seg, q_pos_spec, kv_pos_spec)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(b, kv_heads, plan.num_q_blocks, plan.kv_steps),
        in_specs=[q_side(d), kv_side(d), kv_side(dv), *pos_specs],
        out_specs=[q_side(dv), row_stats],
        scratch_shapes=[
            pltpu.VMEM((g, plan.block_q, 1), jnp.float32),
            pltpu.VMEM((g, plan.block_q, 1), jnp.float32),
            pltpu.VMEM((g, plan.block_q, dv), jnp.float32),
        ],
    )
    return pl.pallas_call(
        functools.partial(_forward_kernel, plan=plan),
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((b, kv_heads, g, t_pad, dv), q5.dtype),
            jax.ShapeDtypeStruct((b, kv_heads, plan.num_q_blocks, g, plan.block_q), jnp.float32),
        ],
        compiler_params=_compiler_params(),
        cost_estimate=_cost(plan, q5, visits=plan.kv_visits, matmul_dims=d + dv,
                            bytes_per_visit=plan.block_kv * (d + dv) * k4.dtype.itemsize,
                            resident_bytes=_nbytes(q5) * (d + dv) // d),
        interpret=plan.interpret,
        name="swa_attention_fwd",
    )(kv_lo, kv_hi, sinks, q5, k4, v4, *pos_operands)


# ---------------------------------------------------------------------------------- backward


def _probs_and_dscores(plan: _Plan, mask, q_g, k, v, do_g, lse_g, delta_g):
    """P and dS = P * (dO V^T - delta) for one head's [bq, bk] tile."""
    s = _nt(q_g, k) * plan.scale
    p = jnp.where(mask, jnp.exp(s - lse_g), 0.0)
    ds = p * (_nt(do_g, v) - delta_g)
    return p, ds


def _dq_kernel(kv_lo_ref, kv_hi_ref, sinks_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_pos_ref, kv_pos_ref,
               *refs, plan: _Plan):
    del sinks_ref
    q_seg_ref, kv_seg_ref, (dq_ref, dq_scr) = _split_refs(plan, refs)
    b, qi, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    row = b * plan.num_q_blocks + qi

    @pl.when(step == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    @pl.when(kv_lo_ref[row] + step <= kv_hi_ref[row])
    def _accumulate():
        mask = _visible(plan, q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref)
        k, v = k_ref[...], v_ref[...]
        for g in range(plan.groups):
            _, ds = _probs_and_dscores(plan, mask, q_ref[g], k, v, do_ref[g], lse_ref[g][:, None], delta_ref[g][:, None])
            dq_scr[g] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32) * plan.scale

    @pl.when(step == plan.kv_steps - 1)
    def _finish():
        dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _dkv_kernel(q_lo_ref, q_hi_ref, sinks_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_pos_ref, kv_pos_ref,
                *refs, plan: _Plan):
    del sinks_ref
    q_seg_ref, kv_seg_ref, (dk_ref, dv_ref, dk_scr, dv_scr) = _split_refs(plan, refs)
    b, ki, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    row = b * plan.num_kv_blocks + ki

    @pl.when(step == 0)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    @pl.when(q_lo_ref[row] + step <= q_hi_ref[row])
    def _accumulate():
        mask = _visible(plan, q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref)
        k, v = k_ref[...], v_ref[...]
        for g in range(plan.groups):
            q_g, do_g = q_ref[g], do_ref[g]
            p, ds = _probs_and_dscores(plan, mask, q_g, k, v, do_g, lse_ref[g][:, None], delta_ref[g][:, None])
            dv_scr[...] += _tn(p.astype(do_g.dtype), do_g)
            dk_scr[...] += _tn(ds.astype(q_g.dtype), q_g) * plan.scale

    @pl.when(step == plan.q_steps - 1)
    def _finish():
        dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _backward_calls(plan: _Plan, q5, k4, v4, sinks, do5, lse, delta, q_pos, kv_pos, q_seg, kv_seg, ranges):
    kv_lo, kv_hi, q_lo, q_hi = ranges
    b, kv_heads, g, t_pad, d = q5.shape
    dv = v4.shape[-1]
    params = _compiler_params()

    q_side, kv_side, row_stats, q_pos_spec, kv_pos_spec = _common_specs(plan, by_q_block=True)
    pos_operands, pos_specs = _position_operands(plan, q_pos, kv_pos, q_seg, kv_seg, q_pos_spec, kv_pos_spec)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(b, kv_heads, plan.num_q_blocks, plan.kv_steps),
            in_specs=[q_side(d), kv_side(d), kv_side(dv), q_side(dv), row_stats, row_stats, *pos_specs],
            out_specs=q_side(d),
            scratch_shapes=[pltpu.VMEM((g, plan.block_q, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q5.shape, q5.dtype),
        compiler_params=params,
        cost_estimate=_cost(plan, q5, visits=plan.kv_visits, matmul_dims=2 * d + dv,
                            bytes_per_visit=plan.block_kv * (d + dv) * k4.dtype.itemsize,
                            resident_bytes=2 * _nbytes(q5) + _nbytes(do5, lse, delta)),
        interpret=plan.interpret,
        name="swa_attention_dq",
    )(kv_lo, kv_hi, sinks, q5, k4, v4, do5, lse, delta, *pos_operands)

    q_side, kv_side, row_stats, q_pos_spec, kv_pos_spec = _common_specs(plan, by_q_block=False)
    pos_operands, pos_specs = _position_operands(plan, q_pos, kv_pos, q_seg, kv_seg, q_pos_spec, kv_pos_spec)
    dk, dv_ = pl.pallas_call(
        functools.partial(_dkv_kernel, plan=plan),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(b, kv_heads, plan.num_kv_blocks, plan.q_steps),
            in_specs=[q_side(d), kv_side(d), kv_side(dv), q_side(dv), row_stats, row_stats, *pos_specs],
            out_specs=[kv_side(d), kv_side(dv)],
            scratch_shapes=[pltpu.VMEM((plan.block_kv, d), jnp.float32), pltpu.VMEM((plan.block_kv, dv), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k4.shape, k4.dtype), jax.ShapeDtypeStruct(v4.shape, v4.dtype)],
        compiler_params=params,
        # Per visit the kernel re-reads a query-side block: q, dO, lse and delta for G heads.
        cost_estimate=_cost(plan, q5, visits=plan.q_visits, matmul_dims=2 * d + 2 * dv,
                            bytes_per_visit=plan.groups * plan.block_q * ((d + dv) * q5.dtype.itemsize + 8),
                            resident_bytes=2 * _nbytes(k4, v4)),
        interpret=plan.interpret,
        name="swa_attention_dkv",
    )(q_lo, q_hi, sinks, q5, k4, v4, do5, lse, delta, *pos_operands)
    return dq, dk, dv_


# ------------------------------------------------------------------------------ custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(plan, q5, k4, v4, sinks, q_pos, kv_pos, q_seg, kv_seg, ranges):
    return _forward(plan, q5, k4, v4, sinks, q_pos, kv_pos, q_seg, kv_seg, *ranges[:2])[0]


def _flash_fwd(plan, q5, k4, v4, sinks, q_pos, kv_pos, q_seg, kv_seg, ranges):
    o5, lse = _forward(plan, q5, k4, v4, sinks, q_pos, kv_pos, q_seg, kv_seg, *ranges[:2])
    return o5, (q5, k4, v4, sinks, o5, lse, q_pos, kv_pos, q_seg, kv_seg, ranges)


def _flash_bwd(plan, residuals, do5):
    q5, k4, v4, sinks, o5, lse, q_pos, kv_pos, q_seg, kv_seg, ranges = residuals
    b, kv_heads, g, t_pad = q5.shape[:4]
    delta = jnp.sum(o5.astype(jnp.float32) * do5.astype(jnp.float32), axis=-1)
    delta = delta.reshape(b, kv_heads, g, plan.num_q_blocks, plan.block_q).transpose(0, 1, 3, 2, 4)
    dq, dk, dv = _backward_calls(plan, q5, k4, v4, sinks, do5, lse, delta, q_pos, kv_pos, q_seg, kv_seg, ranges)
    if plan.has_sinks:
        # d out / d sink = -P(sink) * out, so dsink = -sum over rows of exp(sink - lse) * (dO . O).
        sink_prob = jnp.exp(sinks.reshape(1, kv_heads, 1, g, 1) - lse)
        dsinks = -jnp.sum(sink_prob * delta, axis=(0, 2, 4)).reshape(-1)
    else:
        dsinks = jnp.zeros_like(sinks)
    return dq, dk, dv, dsinks, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------- entry point


def visited_blocks(t: int, s: int, window: int | None, block_q: int, block_kv: int) -> tuple[int, int]:
    """(key blocks the forward/dQ kernels visit, query blocks the dK/dV kernel visits), summed over
    blocks, for one (batch, kv head) with the default positions: the work the kernels really do."""
    t_pad, s_pad = _round_up(t, block_q), _round_up(s, block_kv)
    q_pos = np.arange(s - t, s - t + t_pad)[None]
    kv_pos = np.arange(s_pad)[None]
    kv_lo, kv_hi, q_lo, q_hi = _visit_ranges(np, q_pos, q_pos < s, kv_pos, kv_pos < s, window, block_q, block_kv)
    return int(np.maximum(kv_hi - kv_lo + 1, 0).sum()), int(np.maximum(q_hi - q_lo + 1, 0).sum())


def swa_attention(q, k, v, sinks, *, window: int | None, q_positions=None, kv_positions=None, segment_ids=None,
                  interpret=False, block_q: int | None = None, block_kv: int = 128):
    """Sliding-window (or, with window=None, causal) attention with optional per-head sinks.

    q [B,T,Hq,Dqk], k [B,S,Hkv,Dqk], v [B,S,Hkv,Dv], sinks [Hq] fp32 or None -> [B,T,Hq,Dv].
    `window` counts the previous positions each query sees besides itself (128 in the release).
    Positions default to 0..S-1 for keys and the last T of them for queries. `segment_ids` is one
    [B,T] array for packed self-attention (T == S) or a (q [B,T], kv [B,S]) pair; queries only see
    keys of their own segment. `interpret` is False (compile with Mosaic), True, or a
    `pltpu.InterpretParams()`. Differentiable in q, k, v and sinks.
    """
    b, t, hq, d = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    if k.shape != (b, s, kv_heads, d) or v.shape[:3] != (b, s, kv_heads):
        raise ValueError(f"swa_attention: q {q.shape}, k {k.shape}, v {v.shape} do not share batch/length/heads/dims")
    if hq % kv_heads:
        raise ValueError(f"swa_attention: {hq} query heads are not a multiple of {kv_heads} kv heads")
    if sinks is not None and sinks.shape != (hq,):
        raise ValueError(f"swa_attention: sinks must be [{hq}], got {sinks.shape}")
    if window is not None and window < 0:
        raise ValueError(f"swa_attention: window must be >= 0 or None, got {window}")
    groups, dv = hq // kv_heads, v.shape[-1]

    q_positions, kv_positions = default_positions(q_positions, kv_positions, b, t, s)
    q_seg, kv_seg = split_segment_ids(segment_ids, t, s)
    packed_self_attention = segment_ids is not None and not isinstance(segment_ids, (tuple, list))

    bq = _round_up(min(block_q or _default_block_q(groups), _round_up(t, _MIN_ROWS)), _MIN_ROWS)
    bk = _round_up(min(block_kv, _round_up(s, _MIN_ROWS)), _MIN_ROWS)
    t_pad, s_pad = _round_up(t, bq), _round_up(s, bk)
    num_q_blocks, num_kv_blocks = t_pad // bq, s_pad // bk
    if window is None:
        kv_steps, q_steps = num_kv_blocks, num_q_blocks
    else:
        kv_steps = min(num_kv_blocks, -(-(bq - 1 + window) // bk) + 2)
        q_steps = min(num_q_blocks, -(-(bk - 1 + window) // bq) + 2)
    kv_visits, q_visits = visited_blocks(t, s, window, bq, bk)
    plan = _Plan(window, d**-0.5, sinks is not None, q_seg is not None, groups, bq, bk, num_q_blocks, num_kv_blocks,
                 kv_steps, q_steps, kv_visits, q_visits, interpret)

    valid_q = jnp.broadcast_to(jnp.arange(t_pad) < t, (b, t_pad))
    valid_kv = jnp.broadcast_to(jnp.arange(s_pad) < s, (b, s_pad))

    def pad(x, length, value):
        return jnp.pad(x.astype(jnp.int32), ((0, 0), (0, length - x.shape[1])), constant_values=value)

    q_pos_BT, kv_pos_BS = pad(q_positions, t_pad, -_NEVER), pad(kv_positions, s_pad, _NEVER)
    if packed_self_attention:
        order_q, order_kv = jnp.broadcast_to(jnp.arange(t_pad), (b, t_pad)), jnp.broadcast_to(jnp.arange(s_pad), (b, s_pad))
    else:
        order_q, order_kv = q_pos_BT, kv_pos_BS
    # Positions XLA can compute in place (iota: a cache's slots, the default positions) must not fuse
    # into the per-block min/max below: for v5p at 262,144 keys that fusion aborts libtpu 0.0.42
    # (fusion_emitter.cc "Check failed: new_window.base_bounds[*data_split_dim] == CeilOfRatio(...)";
    # docs/scaling.md has the reproduction).
    order_q, order_kv = jax.lax.optimization_barrier((order_q, order_kv))
    ranges = tuple(jax.lax.stop_gradient(r) for r in _visit_ranges(jnp, order_q, valid_q, order_kv, valid_kv, window, bq, bk))

    q5 = jnp.pad(q, ((0, 0), (0, t_pad - t), (0, 0), (0, 0))).reshape(b, t_pad, kv_heads, groups, d).transpose(0, 2, 3, 1, 4)
    k4 = jnp.pad(k, ((0, 0), (0, s_pad - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    v4 = jnp.pad(v, ((0, 0), (0, s_pad - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    sinks_f32 = jnp.zeros((hq,), jnp.float32) if sinks is None else sinks.astype(jnp.float32)
    q_pos = q_pos_BT[:, :, None]
    kv_pos = kv_pos_BS.reshape(b, num_kv_blocks, 1, bk)
    if q_seg is not None:
        q_seg = pad(q_seg, t_pad, -1)[:, :, None]
        kv_seg = pad(kv_seg, s_pad, -2).reshape(b, num_kv_blocks, 1, bk)

    o5 = _flash(plan, q5, k4, v4, sinks_f32, q_pos, kv_pos, q_seg, kv_seg, ranges)
    return o5.transpose(0, 3, 1, 2, 4).reshape(b, t_pad, hq, dv)[:, :t]
