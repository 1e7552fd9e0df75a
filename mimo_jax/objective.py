"""Training objective: next-token cross-entropy, the mean MTP-head cross-entropy, and optional
sequence-level balance and z-loss terms.

Targets never cross a packed-document boundary: position j of a row predicts token j + 1 (main
head) or j + k + 2 (MTP head k) only if that token is in the same segment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mimo_jax.model import ModelOutput


def _shifted_cross_entropy(logits_BTV, input_ids_BT, segment_ids_BT, shift: int):
    """Mean CE of logits at j against token j + shift, over pairs in the same segment."""
    targets = input_ids_BT[:, shift:]
    valid = _shifted_mask(input_ids_BT, segment_ids_BT, shift)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_BTV[:, :-shift].astype(jnp.float32), targets)
    return jnp.sum(jnp.where(valid, ce, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def _shifted_mask(input_ids_BT, segment_ids_BT, shift: int):
    """Pairs (j, j + shift) inside one document; segment 0 is padding and never a target."""
    if segment_ids_BT is None:
        return jnp.ones(input_ids_BT[:, shift:].shape, bool)
    return (segment_ids_BT[:, shift:] == segment_ids_BT[:, :-shift]) & (segment_ids_BT[:, shift:] > 0)


def lm_loss(output: ModelOutput, input_ids_BT, segment_ids_BT=None, mtp_weight: float = 0.3,
            balance_weight: float = 0.0, z_loss_weight: float = 0.0):
    """(total, metrics); total = lm + mtp_weight * mean(mtp) + balance_weight * balance + z-loss.

    metrics: "lm", "mtp" [K] per-head CE, "mtp_top1" [K] how often head k's argmax is the true
    token, "mtp_agree" [K] how often it equals the main head's argmax for that token (what
    speculative decoding accepts), "balance" (sum over MoE layers), "z_loss".
    """
    lm = _shifted_cross_entropy(output.logits, input_ids_BT, segment_ids_BT, 1)
    metrics = {"lm": lm}
    total = lm
    if output.mtp_logits is not None:
        main_top1 = jnp.argmax(output.logits, -1)
        ce, top1, agree = [], [], []
        for k, head_logits in enumerate(output.mtp_logits):
            shift = k + 2
            valid = _shifted_mask(input_ids_BT, segment_ids_BT, shift)
            guess = jnp.argmax(head_logits[:, :-shift], -1)
            n = jnp.maximum(valid.sum(), 1)
            ce.append(_shifted_cross_entropy(head_logits, input_ids_BT, segment_ids_BT, shift))
            top1.append(jnp.sum(valid & (guess == input_ids_BT[:, shift:])) / n)
            agree.append(jnp.sum(valid & (guess == main_top1[:, shift - 1:-1])) / n)
        metrics.update(mtp=jnp.stack(ce), mtp_top1=jnp.stack(top1), mtp_agree=jnp.stack(agree))
        total = total + mtp_weight * metrics["mtp"].mean()
    if output.router:
        metrics["balance"] = sum(stats.balance.sum() for stats in output.router.values())
        total = total + balance_weight * metrics["balance"]
    if z_loss_weight:
        metrics["z_loss"] = jnp.mean(jax.nn.logsumexp(output.logits.astype(jnp.float32), -1) ** 2)
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
