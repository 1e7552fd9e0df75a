"""Sampling: per-row temperature, top-k and top-p over the vocabulary, greedy rows as a one-hot
argmax, and the lossless acceptance rule of speculative decoding. Pure functions of logits and
keys; `inference` (generate, SlotEngine) calls them inside its jitted steps.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")



def processed_probs(logits_BV, temperature_B, top_k_B, top_p_B):
    """The distribution rows sample from: softmax(logits / T) cut to top-k then top-p;
    a one-hot argmax for greedy rows (T = 0)."""
    logits_BV = logits_BV.astype(jnp.float32)
    vocab = logits_BV.shape[-1]
    greedy = temperature_B <= 0
    one_hot_BV = jax.nn.one_hot(jnp.argmax(logits_BV, axis=-1), vocab, dtype=jnp.float32)
    # An all-greedy batch (the common decode) skips the vocabulary sort.
    return jax.lax.cond(jnp.all(greedy), lambda: one_hot_BV, lambda: jnp.where(
        greedy[:, None], one_hot_BV, _sampling_probs(logits_BV, greedy, temperature_B, top_k_B, top_p_B)))


def reported_logprobs(logits_BV, temperature_B, top_k_B, top_p_B):
    """The log-probabilities reported for tokens sampled from `logits_BV`: those of the distribution
    they were drawn from (`processed_probs`; -inf for the tokens it cuts), or the raw log-softmax
    for greedy rows, whose distribution is one-hot."""
    logits_BV = logits_BV.astype(jnp.float32)
    greedy = temperature_B <= 0
    raw_BV = jax.nn.log_softmax(logits_BV, axis=-1)
    return jax.lax.cond(jnp.all(greedy), lambda: raw_BV, lambda: jnp.where(
        greedy[:, None], raw_BV, jnp.log(_sampling_probs(logits_BV, greedy, temperature_B, top_k_B, top_p_B))))


def _sampling_probs(logits_BV, greedy, temperature_B, top_k_B, top_p_B):
    vocab = logits_BV.shape[-1]
    x_BV = logits_BV / jnp.where(greedy, 1.0, temperature_B)[:, None]
    sorted_BV = -jnp.sort(-x_BV, axis=-1)
    k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, vocab), vocab)
    kth_B1 = jnp.take_along_axis(sorted_BV, (k_B - 1)[:, None], axis=-1)
    sorted_BV = jnp.where(sorted_BV >= kth_B1, sorted_BV, -jnp.inf)
    p_sorted_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Keep the smallest prefix of the sorted tokens whose mass reaches top_p.
    kept_B = jnp.sum((jnp.cumsum(p_sorted_BV, axis=-1) - p_sorted_BV) < top_p_B[:, None], axis=-1)
    cut_B1 = jnp.take_along_axis(sorted_BV, jnp.maximum(kept_B - 1, 0)[:, None], axis=-1)
    return jax.nn.softmax(jnp.where(x_BV >= jnp.maximum(cut_B1, kth_B1), x_BV, -jnp.inf), axis=-1)


def sample_tokens(keys_B, probs_BV):
    """One token per row from its distribution."""
    return jax.vmap(lambda key, p: jax.random.categorical(key, jnp.log(p)))(keys_B, probs_BV).astype(jnp.int32)


def split_keys(rng_B):
    """(this step's key, the next state's key) per row."""
    keys = jax.vmap(jax.random.split)(rng_B)
    return keys[:, 0], keys[:, 1]


def speculative_accept(probs_BNV, drafts_BD, keys_B):
    """(tokens [B, D + 1], count [B]): drafts accepted left to right, then one token from the main
    model: where every draft was accepted, a sample of the last distribution; else a sample of the
    first rejecting position's distribution with the draft's token removed.

    `probs_BNV` are the main model's processed distributions at the D + 1 verified positions. For a
    one-hot (greedy) row this is exact-match acceptance plus the argmax.
    """
    b, n, vocab = probs_BNV.shape
    d = n - 1
    accept_key, sample_key = jax.vmap(jax.random.split, out_axes=1)(keys_B)
    u_BD = jax.vmap(lambda key: jax.random.uniform(key, (d,)))(accept_key)
    p_draft_BD = jnp.take_along_axis(probs_BNV[:, :d], drafts_BD[..., None], axis=-1)[..., 0]
    accepted_B = jnp.sum(jnp.cumprod(u_BD < p_draft_BD, axis=1), axis=1)
    residual_BV = jnp.take_along_axis(probs_BNV, accepted_B[:, None, None], axis=1)[:, 0]
    rejected_B = jnp.take_along_axis(jnp.pad(drafts_BD, ((0, 0), (0, 1)), constant_values=-1),
                                     accepted_B[:, None], axis=1)[:, 0]
    residual_BV = jnp.where(jnp.arange(vocab) == rejected_B[:, None], 0.0, residual_BV)
    residual_BV = residual_BV / jnp.sum(residual_BV, axis=-1, keepdims=True)
    last_B = sample_tokens(sample_key, residual_BV)
    tokens_BN = jnp.concatenate([drafts_BD, jnp.zeros((b, 1), jnp.int32)], axis=1)
    tokens_BN = jnp.where(jnp.arange(n) == accepted_B[:, None], last_B[:, None], tokens_BN)
    return tokens_BN, accepted_B + 1
