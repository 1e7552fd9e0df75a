"""Training objective: next-token cross-entropy, the mean MTP-head cross-entropy, and optional
sequence-level balance and z-loss terms.

Targets never cross a packed-document boundary: position j of a row predicts token j + 1 (main
head) or j + k + 2 (MTP head k) only if that token is in the same segment.

With `vocab_chunk` > 0 the loss reads the hidden states and the LM head instead of logits
(`model(..., logits=False)`) and computes the logits `vocab_chunk` columns at a time
(`vocab_chunked_stats`): no [B, T, V] fp32 array exists, forward or backward, and the result is
the unchunked loss up to float rounding. The released model's 4 heads at 32k tokens would
otherwise hold 4 x 32768 x 152576 fp32 logits (80 GB) per sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mimo_jax.model import ModelOutput, shift_tokens


def _shifted_mask(input_ids_BT, segment_ids_BT, shift: int):
    """Pairs (j, j + shift) inside one document; segment 0 is padding and never a target."""
    if segment_ids_BT is None:
        return jnp.ones(input_ids_BT[:, shift:].shape, bool)
    return (segment_ids_BT[:, shift:] == segment_ids_BT[:, :-shift]) & (segment_ids_BT[:, shift:] > 0)


def _logit_stats(logits_BTC, targets_BT, start: int = 0):
    """(logsumexp, target logit, max, argmax) of fp32 logits for vocabulary columns start..start+C;
    the target logit is 0 where the target lies outside them."""
    local = targets_BT - start
    inside = (local >= 0) & (local < logits_BTC.shape[-1])
    target = jnp.take_along_axis(logits_BTC, jnp.clip(local, 0, logits_BTC.shape[-1] - 1)[..., None], -1)[..., 0]
    return (jax.nn.logsumexp(logits_BTC, -1), jnp.where(inside, target, 0.0),
            jax.lax.stop_gradient(logits_BTC.max(-1)), jnp.argmax(logits_BTC, -1).astype(jnp.int32) + start)


def vocab_chunked_stats(hidden_BTD, head_DV, targets_BT, chunk: int):
    """(logsumexp, target logit, argmax), each [B, T], of the fp32 logits `hidden @ head`, computed
    `chunk` vocabulary columns at a time (a last, narrower chunk takes the rest).

    A scan over the chunks keeps a running logsumexp, the target's logit and the running argmax
    (first maximum, as jnp.argmax); its body is rematerialised, so the backward pass also holds
    one [B, T, chunk] block of logits at a time, not [B, T, V].
    """
    vocab = head_DV.shape[1]
    full, tail = divmod(vocab, chunk)

    def block(w_DC, start):
        logits_BTC = jnp.einsum("btd,dc->btc", hidden_BTD, w_DC.astype(hidden_BTD.dtype),
                                preferred_element_type=jnp.float32)
        return _logit_stats(logits_BTC, targets_BT, start)

    def merge(acc, new):
        lse, target, best, arg = acc
        lse_n, target_n, best_n, arg_n = new
        better = best_n > best
        return jnp.logaddexp(lse, lse_n), target + target_n, jnp.maximum(best, best_n), jnp.where(better, arg_n, arg)

    @jax.checkpoint
    def step(acc, i):
        start = i * chunk
        return merge(acc, block(jax.lax.dynamic_slice_in_dim(head_DV, start, chunk, axis=1), start)), None

    shape = targets_BT.shape
    acc = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
           jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.int32))
    acc, _ = jax.lax.scan(step, acc, jnp.arange(full))
    if tail:
        acc = merge(acc, block(head_DV[:, full * chunk:], full * chunk))
    lse, target, _, arg = acc
    return lse, target, arg


def _head_stats(output: ModelOutput, input_ids_BT, vocab_chunk: int):
    """Per head (main first, then MTP head k): (logsumexp, target logit, argmax) at every position,
    against the head's own target (token j + 1, resp. j + k + 2; past the end, token 0)."""
    chunked = output.logits is None
    main, mtp = (output.hidden, output.mtp_hidden) if chunked else (output.logits, output.mtp_logits)
    stats = []
    for k, x in enumerate([main] + (list(mtp) if mtp is not None else [])):
        targets_BT = shift_tokens(input_ids_BT, k + 1)
        if chunked:
            stats.append(vocab_chunked_stats(x, output.lm_head_DV, targets_BT, vocab_chunk))
        else:
            lse, target, _, arg = _logit_stats(x.astype(jnp.float32), targets_BT)
            stats.append((lse, target, arg))
    return stats


def lm_loss(output: ModelOutput, input_ids_BT, segment_ids_BT=None, mtp_weight: float = 0.3,
            balance_weight: float = 0.0, z_loss_weight: float = 0.0, vocab_chunk: int = 0):
    """(total, metrics); total = lm + mtp_weight * mean(mtp) + balance_weight * balance + z-loss.

    metrics: "lm", "mtp" [K] per-head CE, "mtp_top1" [K] how often head k's argmax is the true
    token, "mtp_agree" [K] how often it equals the main head's argmax for that token (what
    speculative decoding accepts), "balance" (sum over MoE layers), "z_loss".

    `output` holds logits, or (`model(..., logits=False)`) the hidden states and the LM head, whose
    logits are then computed `vocab_chunk` columns at a time (`vocab_chunked_stats`).
    """
    if output.logits is None and vocab_chunk <= 0:
        raise ValueError("an output without logits (model(..., logits=False)) needs vocab_chunk > 0")
    stats = _head_stats(output, input_ids_BT, vocab_chunk)

    def cross_entropy(k, valid):
        lse, target, _ = stats[k]
        ce = (lse - target)[:, :-(k + 1)]
        return jnp.sum(jnp.where(valid, ce, 0.0)) / jnp.maximum(jnp.sum(valid), 1)

    lm = cross_entropy(0, _shifted_mask(input_ids_BT, segment_ids_BT, 1))
    metrics = {"lm": lm}
    total = lm
    if len(stats) > 1:
        main_top1 = stats[0][2]
        ce, top1, agree = [], [], []
        for k in range(1, len(stats)):
            shift = k + 1
            valid = _shifted_mask(input_ids_BT, segment_ids_BT, shift)
            guess = stats[k][2][:, :-shift]
            n = jnp.maximum(valid.sum(), 1)
            ce.append(cross_entropy(k, valid))
            top1.append(jnp.sum(valid & (guess == input_ids_BT[:, shift:])) / n)
            agree.append(jnp.sum(valid & (guess == main_top1[:, shift - 1:-1])) / n)
        metrics.update(mtp=jnp.stack(ce), mtp_top1=jnp.stack(top1), mtp_agree=jnp.stack(agree))
        total = total + mtp_weight * metrics["mtp"].mean()
    if output.router:
        metrics["balance"] = sum(stats.balance.sum() for stats in output.router.values())
        total = total + balance_weight * metrics["balance"]
    if z_loss_weight:
        metrics["z_loss"] = jnp.mean(stats[0][0] ** 2)
        total = total + z_loss_weight * metrics["z_loss"]
    return total, metrics


def mtp_distill_loss(output: ModelOutput, input_ids_BT, segment_ids_BT=None):
    """Mean over heads of KL(main head || MTP head k) for the same target token.

    Head k at position j predicts token j + k + 2, which the main head predicts at position
    j + k + 1; matching that distribution (not the data) is what speculative decoding rewards.
    The main head is a fixed teacher here (stop_gradient).
    """
    if output.mtp_logits is None:
        raise ValueError("train.mode=mtp_distill needs a model with MTP heads (model.num_mtp_heads > 0)")
    teacher_logp = jax.nn.log_softmax(jax.lax.stop_gradient(output.logits).astype(jnp.float32), -1)
    kls = []
    for k, head_logits in enumerate(output.mtp_logits):
        shift = k + 2
        valid = _shifted_mask(input_ids_BT, segment_ids_BT, shift)
        p_logp = teacher_logp[:, shift - 1:-1]
        q_logp = jax.nn.log_softmax(head_logits[:, :-shift].astype(jnp.float32), -1)
        kl = jnp.sum(jnp.exp(p_logp) * (p_logp - q_logp), -1)
        kls.append(jnp.sum(jnp.where(valid, kl, 0.0)) / jnp.maximum(valid.sum(), 1))
    kl_K = jnp.stack(kls)
    _, metrics = lm_loss(jax.lax.stop_gradient(output), input_ids_BT, segment_ids_BT)
    return kl_K.mean(), {**metrics, "mtp_kl": kl_K}
