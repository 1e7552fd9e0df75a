"""Training objective: next-token cross-entropy plus the mean MTP-head cross-entropy.

Targets never cross a packed-document boundary: position j of a row predicts token j + 1 (main
head) or j + k + 2 (MTP head k) only if that token is in the same segment.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from mimo_jax.model import ModelOutput


def _shifted_cross_entropy(logits_BTV, input_ids_BT, segment_ids_BT, shift: int):
    """Mean CE of logits at j against token j + shift, over pairs in the same segment."""
    targets = input_ids_BT[:, shift:]
    valid = jnp.ones(targets.shape, bool)
    if segment_ids_BT is not None:
        valid = segment_ids_BT[:, shift:] == segment_ids_BT[:, :-shift]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_BTV[:, :-shift].astype(jnp.float32), targets)
    return jnp.sum(jnp.where(valid, ce, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def lm_loss(output: ModelOutput, input_ids_BT, segment_ids_BT=None, mtp_weight: float = 0.3):
    """(total, {"lm": main-head CE, "mtp": [per-head CE]}); total = lm + mtp_weight * mean(mtp)."""
    lm = _shifted_cross_entropy(output.logits, input_ids_BT, segment_ids_BT, 1)
    metrics = {"lm": lm}
    total = lm
    if output.mtp_logits is not None:
        mtp = jnp.stack([_shifted_cross_entropy(head_logits, input_ids_BT, segment_ids_BT, k + 2)
                         for k, head_logits in enumerate(output.mtp_logits)])
        metrics["mtp"] = mtp
        total = total + mtp_weight * mtp.mean()
    return total, metrics
