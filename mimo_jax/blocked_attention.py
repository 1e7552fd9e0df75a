"""Block-local self-attention in plain XLA: work and memory grow as T·W for sliding windows.

The sequence is cut into N blocks of `block_size` tokens. Step d of a `lax.scan` pairs every query
block i with key block i - d (a roll of the key blocks by d), so one step is one batched matmul
over all N block pairs and only that step's [T, block] scores per head exist at a time. The
softmax is online (flash style): each step yields per-row partial (max, sum, output), merged in
fp32 into a state that starts from the sink.

- Sliding window: steps d = 0 .. ceil(window / block), the blocks the window reaches.
- Causal (or a window reaching most of the sequence): steps d = 0 .. N // 2, folding the triangle.
  Offset d has N - d useful block pairs (queries d..N-1), offset N - d has d (queries N-d..N-1), so
  one step computes both in N slots: slot s >= d holds (query s, key s - d), slot s < d holds
  (query s - d + N, key s). About N²/2 + N block pairs in all, never a [T, T] array.

The backward pass (`jax.custom_vjp`; autodiff through the scan would save every step's scores)
saves only q, k, v in the blocked layout, the output and the per-row fp32 log-sum-exp, and walks
the same steps again, recomputing each step's scores (dQ lands in the query slots, dK/dV in the key
slots); dsinks is an O(T·H) reduction.

Shapes add N blocks, Q rows of a query block and S rows of a key block to the legend of
`mimo_jax.layers` (in the scan, a key block is a query block seen as keys).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.swa_attention_reference import MASK_VALUE

__all__ = ["blocked_attention", "default_block_size", "pays_off"]

# Measured on CPU at Dqk 192 / Dv 128, fwd+bwd (docs/kernels.md). A sliding window is fastest with
# a block near the window (one block back), between 32 (smaller blocks starve the matmuls) and 128.
# Causal attention wants blocks of a few hundred rows and an odd number of them: with N even the
# fold's last step (offset N/2, which pairs with itself) runs half empty.
SWA_BLOCKS = (32, 128)
CAUSAL_MAX_BLOCK = 512
# Up to this length one dense [T, T] causal pass beats the folded blocks (about 15% at T = 512) and
# compiles to a simpler program.
DENSE_CAUSAL_MAX_T = 512


def _round8(x: int) -> int:
    return -(-x // 8) * 8


def default_block_size(t: int, window) -> int:
    """The block the scan uses when none is given (at most T rounded up to 8)."""
    if window is not None:
        return min(max(_round8(window), SWA_BLOCKS[0]), SWA_BLOCKS[1], _round8(t))
    n = max(3, -(-t // CAUSAL_MAX_BLOCK)) | 1
    block = _round8(-(-t // n))
    while -(-t // block) % 2 == 0 and block > 8:  # rounding the block to 8 rows gave an even count
        n += 2
        block = _round8(-(-t // n))
    return block


def pays_off(t: int, window) -> bool:
    """Whether the blocked scan beats one dense pass for T tokens: not for a sequence that fits in
    one block (the same work as dense, in a larger program), nor for causal up to DENSE_CAUSAL_MAX_T."""
    if window is None and t <= DENSE_CAUSAL_MAX_T:
        return False
    return -(-t // default_block_size(t, window)) > 1


@functools.partial(jax.jit, static_argnames=("window", "block_size"))  # called eagerly: one compile
def blocked_attention(q_BTHD, k_BTKD, v_BTKV, sinks_H, *, window, positions_BT, segment_ids_BT=None, block_size=None):
    """Causal (window=None) or sliding-window self-attention, equal to `swa_attention_reference`.

    Contract (self-attention over one sequence): queries and keys are the same T tokens, and
    positions strictly increase along the sequence inside each segment (the model's
    `positions_from_segments`, or arange without segment ids, advance by one per token). Then a key
    more than `window` indices before a query, or after it, is never visible, so skipping those
    blocks is exact; inside the blocks it reaches, the mask is computed from the real positions and
    segment ids. Cached calls (queries against a longer or ring-buffer cache) do not satisfy it:
    use the dense reference for those (`mimo_jax.attention` does).

    q [B,T,H,Dqk], k [B,T,K,Dqk], v [B,T,K,Dv], sinks [H] or None -> [B,T,H,Dv] in v's dtype.
    `window` is the number of previous positions a query sees besides itself; fp32 softmax with
    scale 1/sqrt(Dqk). T need not be a multiple of `block_size` (the tail block is padded and
    masked). Differentiable in q, k, v and sinks.
    """
    b, t, h, d = q_BTHD.shape
    if k_BTKD.ndim != 4 or k_BTKD.shape[:2] != (b, t) or k_BTKD.shape[3] != d:
        raise ValueError(f"blocked attention is self-attention: k must be [B={b}, T={t}, K, Dqk={d}], "
                         f"got {k_BTKD.shape} (use the dense reference for queries against a cache)")
    kv = k_BTKD.shape[2]
    if v_BTKV.ndim != 4 or v_BTKV.shape[:3] != (b, t, kv):
        raise ValueError(f"v must be [B={b}, T={t}, K={kv}, Dv], got {v_BTKV.shape}")
    if h % kv:
        raise ValueError(f"{h} query heads are not a multiple of {kv} kv heads")
    if sinks_H is not None and sinks_H.shape != (h,):
        raise ValueError(f"sinks must be [H={h}], got {sinks_H.shape}")
    if positions_BT.shape != (b, t):
        raise ValueError(f"positions must be [B={b}, T={t}], got {positions_BT.shape}")
    if segment_ids_BT is not None and segment_ids_BT.shape != (b, t):
        raise ValueError(f"segment_ids must be one [B={b}, T={t}] array, got {getattr(segment_ids_BT, 'shape', None)}")
    if window is not None and window < 0:
        raise ValueError(f"window must be >= 0 or None, got {window}")
    block = default_block_size(t, window) if block_size is None else block_size
    if block < 1:
        raise ValueError(f"block_size must be >= 1, got {block}")

    n = -(-t // block)
    reach = n if window is None else -(-window // block)  # key blocks a query block looks back
    fold = reach > n // 2  # the folded triangle takes fewer steps than the band
    steps = n // 2 + 1 if fold else reach + 1
    g = h // kv
    pad = n * block - t

    def blocks(x_BT):
        """[B, T, ...] -> [B, N, block, ...], the tail padded."""
        x_BT = jnp.pad(x_BT, [(0, 0), (0, pad)] + [(0, 0)] * (x_BT.ndim - 2))
        return x_BT.reshape(b, n, block, *x_BT.shape[2:])

    q_BNKGQD = blocks(q_BTHD).reshape(b, n, block, kv, g, d).transpose(0, 1, 3, 4, 2, 5)
    k_BNKSD = blocks(k_BTKD).transpose(0, 1, 3, 2, 4)
    v_BNKSV = blocks(v_BTKV).transpose(0, 1, 3, 2, 4)
    pos_BNQ = blocks(positions_BT.astype(jnp.int32))
    seg_BNQ = None if segment_ids_BT is None else blocks(segment_ids_BT)
    real_NQ = (jnp.arange(n * block) < t).reshape(n, block)  # padding is never a visible key
    sinks_KG = None if sinks_H is None else sinks_H.reshape(kv, g)

    out_BNKGQV = _attend(q_BNKGQD, k_BNKSD, v_BNKSV, sinks_KG, pos_BNQ, seg_BNQ, real_NQ, window, fold, steps)
    out_BTHV = out_BNKGQV.transpose(0, 1, 4, 2, 3, 5).reshape(b, n * block, h, v_BTKV.shape[-1])
    return out_BTHV[:, :t]


class _Slots:
    """Which (query block, key block) pair each of the N slots of step d holds."""

    def __init__(self, d, n: int, fold: bool):
        self.d = d
        self.fold = fold
        # In the fold, slots s >= d hold (query s, key s - d) and slots s < d (query s - d + N, key s),
        # the latter only when offset N - d is not offset d itself.
        self.direct_N = jnp.arange(n) >= d
        self.valid_N = self.direct_N | ((2 * d != n) if fold else False)

    def queries(self, x_BN):
        """Per-query-block data laid out in slots."""
        if not self.fold:
            return x_BN
        return jnp.where(self._direct(x_BN), x_BN, jnp.roll(x_BN, self.d, axis=1))

    def keys(self, x_BN):
        """Per-key-block data laid out in slots."""
        rolled = jnp.roll(x_BN, self.d, axis=1)
        return jnp.where(self._direct(x_BN), rolled, x_BN) if self.fold else rolled

    def _direct(self, x_BN):
        return self.direct_N.reshape((1, -1) + (1,) * (x_BN.ndim - 2))

    def own(self, x_BN, fill=0.0):
        """Slot results of the direct pairs, indexed by query block (the rest `fill`)."""
        return jnp.where(self._direct(x_BN), x_BN, fill)

    def wrapped(self, x_BN, fill=0.0):
        """Slot results of the folded pairs, indexed by query block (the rest `fill`)."""
        return jnp.roll(jnp.where(self._direct(x_BN), fill, x_BN), -self.d, axis=1)

    def add_to_queries(self, acc_BN, x_BN):
        return acc_BN + self.own(x_BN) + self.wrapped(x_BN) if self.fold else acc_BN + x_BN

    def add_to_keys(self, acc_BN, x_BN):
        if not self.fold:
            return acc_BN + jnp.roll(x_BN, -self.d, axis=1)
        return acc_BN + jnp.roll(self.own(x_BN), -self.d, axis=1) + jnp.where(self._direct(x_BN), 0.0, x_BN)


def _scores(slots, q_BNKGQD, k_BNKSD, pos_BNQ, seg_BNQ, real_NQ, window):
    """Masked fp32 scores [B, N, K, G, Q, S] of the block pairs in the slots, and the slotted q, k."""
    q_slot = slots.queries(q_BNKGQD)
    k_slot = slots.keys(k_BNKSD)
    s_BNKGQS = jnp.einsum("bnkgqd,bnksd->bnkgqs", q_slot, k_slot, preferred_element_type=jnp.float32)
    s_BNKGQS = s_BNKGQS * (q_BNKGQD.shape[-1] ** -0.5)
    delta_BNQS = slots.queries(pos_BNQ)[..., :, None] - slots.keys(pos_BNQ)[..., None, :]
    mask_BNQS = delta_BNQS >= 0
    if window is not None:
        mask_BNQS &= delta_BNQS <= window
    if seg_BNQ is not None:
        mask_BNQS &= slots.queries(seg_BNQ)[..., :, None] == slots.keys(seg_BNQ)[..., None, :]
    real_NS = slots.keys(real_NQ[None])[0] & slots.valid_N[:, None]
    mask_BNQS &= real_NS[None, :, None, :]
    return jnp.where(mask_BNQS[:, :, None, None], s_BNKGQS, MASK_VALUE), q_slot, k_slot


def _forward(q_BNKGQD, k_BNKSD, v_BNKSV, sinks_KG, pos_BNQ, seg_BNQ, real_NQ, window, fold, steps):
    """(output [B, N, K, G, Q, V] in v's dtype, log-sum-exp [B, N, K, G, Q] fp32, sink included)."""
    b, n, kv, g, bq, _ = q_BNKGQD.shape
    dv = v_BNKSV.shape[-1]
    stat_shape = (b, n, kv, g, bq)
    if sinks_KG is None:
        m0, l0 = jnp.full(stat_shape, MASK_VALUE, jnp.float32), jnp.zeros(stat_shape, jnp.float32)
    else:  # the sink is the state's first logit: it takes its share of the denominator, no value
        m0 = jnp.broadcast_to(sinks_KG.astype(jnp.float32)[None, None, :, :, None], stat_shape)
        l0 = jnp.ones(stat_shape, jnp.float32)
    acc0 = jnp.zeros(stat_shape + (dv,), jnp.float32)

    def step(state, d):
        m, l, acc = state  # running max, denominator and unnormalised output per query row
        slots = _Slots(d, n, fold)
        s_BNKGQS, _, _ = _scores(slots, q_BNKGQD, k_BNKSD, pos_BNQ, seg_BNQ, real_NQ, window)
        mp = jnp.max(s_BNKGQS, axis=-1)  # this step's partial (max, sum, output) per slot row
        p_BNKGQS = jnp.exp(s_BNKGQS - mp[..., None])
        lp = jnp.sum(p_BNKGQS, axis=-1)
        accp = jnp.einsum("bnkgqs,bnksv->bnkgqv", p_BNKGQS.astype(v_BNKSV.dtype), slots.keys(v_BNKSV),
                          preferred_element_type=jnp.float32)
        # Partials of other query blocks get max -inf, hence weight exactly 0.
        parts = [(slots.own(mp, -jnp.inf), lp, accp)]
        if fold:
            parts.append((slots.wrapped(mp, -jnp.inf), slots.wrapped(lp), slots.wrapped(accp)))
        m_new = functools.reduce(jnp.maximum, [m] + [pm for pm, _, _ in parts])
        scale = jnp.exp(m - m_new)
        l, acc = l * scale, acc * scale[..., None]
        for pm, pl, pacc in parts:
            w = jnp.exp(pm - m_new)
            l, acc = l + w * pl, acc + w[..., None] * pacc
        return (m_new, l, acc), None

    (m, l, acc), _ = jax.lax.scan(step, (m0, l0, acc0), jnp.arange(steps))
    return (acc / l[..., None]).astype(v_BNKSV.dtype), m + jnp.log(l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _attend(q_BNKGQD, k_BNKSD, v_BNKSV, sinks_KG, pos_BNQ, seg_BNQ, real_NQ, window, fold, steps):
    return _forward(q_BNKGQD, k_BNKSD, v_BNKSV, sinks_KG, pos_BNQ, seg_BNQ, real_NQ, window, fold, steps)[0]


def _attend_fwd(q_BNKGQD, k_BNKSD, v_BNKSV, sinks_KG, pos_BNQ, seg_BNQ, real_NQ, window, fold, steps):
    out, lse = _forward(q_BNKGQD, k_BNKSD, v_BNKSV, sinks_KG, pos_BNQ, seg_BNQ, real_NQ, window, fold, steps)
    return out, (q_BNKGQD, k_BNKSD, v_BNKSV, sinks_KG, pos_BNQ, seg_BNQ, real_NQ, out, lse)


def _attend_bwd(window, fold, steps, res, dout_BNKGQV):
    q_BNKGQD, k_BNKSD, v_BNKSV, sinks_KG, pos_BNQ, seg_BNQ, real_NQ, out_BNKGQV, lse_BNKGQ = res
    n = q_BNKGQD.shape[1]
    scale = q_BNKGQD.shape[-1] ** -0.5
    # Padded query rows have zero dout, hence zero delta and no gradient however their row looks.
    delta_BNKGQ = jnp.sum(dout_BNKGQV.astype(jnp.float32) * out_BNKGQV.astype(jnp.float32), axis=-1)
    dout_BNKGQV = dout_BNKGQV.astype(v_BNKSV.dtype)

    def step(grads, d):
        dq, dk, dv = grads
        slots = _Slots(d, n, fold)
        s_BNKGQS, q_slot, k_slot = _scores(slots, q_BNKGQD, k_BNKSD, pos_BNQ, seg_BNQ, real_NQ, window)
        p_BNKGQS = jnp.exp(s_BNKGQS - slots.queries(lse_BNKGQ)[..., None])
        do_slot = slots.queries(dout_BNKGQV)
        dv_slot = jnp.einsum("bnkgqs,bnkgqv->bnksv", p_BNKGQS.astype(do_slot.dtype), do_slot,
                             preferred_element_type=jnp.float32)
        dp_BNKGQS = jnp.einsum("bnkgqv,bnksv->bnkgqs", do_slot, slots.keys(v_BNKSV),
                               preferred_element_type=jnp.float32)
        ds_BNKGQS = (p_BNKGQS * (dp_BNKGQS - slots.queries(delta_BNKGQ)[..., None])).astype(q_BNKGQD.dtype)
        dq_slot = jnp.einsum("bnkgqs,bnksd->bnkgqd", ds_BNKGQS, k_slot, preferred_element_type=jnp.float32)
        dk_slot = jnp.einsum("bnkgqs,bnkgqd->bnksd", ds_BNKGQS, q_slot, preferred_element_type=jnp.float32)
        return (slots.add_to_queries(dq, dq_slot), slots.add_to_keys(dk, dk_slot), slots.add_to_keys(dv, dv_slot)), None

    zeros = tuple(jnp.zeros(x.shape, jnp.float32) for x in (q_BNKGQD, k_BNKSD, v_BNKSV))
    (dq, dk, dv), _ = jax.lax.scan(step, zeros, jnp.arange(steps))
    dsinks = None
    if sinks_KG is not None:
        # d out / d sink = -p_sink · out, so dsink = -sum over rows of p_sink · (dout · out).
        p_sink = jnp.exp(sinks_KG.astype(jnp.float32)[None, None, :, :, None] - lse_BNKGQ)
        dsinks = (-jnp.sum(p_sink * delta_BNKGQ, axis=(0, 1, 4))).astype(sinks_KG.dtype)
    return ((dq * scale).astype(q_BNKGQD.dtype), (dk * scale).astype(k_BNKSD.dtype), dv.astype(v_BNKSV.dtype),
            dsinks, None, None, None)


_attend.defvjp(_attend_fwd, _attend_bwd)
