"""KV caches for decoding: a full-length cache per global layer, a ring buffer per SWA layer.

Global layers write the new keys at slot = position and attend over the whole cache (slot i holds
position i, so empty or stale slots lie after every query and causality hides them).

SWA layers keep `window + 1 + num_draft` slots, slot = position % size, so their memory does not
grow with context. A step attends over the ring as it was (entries at or after the step's first
position are hidden: they are stale drafts) plus the step's own new keys, then writes the new keys.
Rejected drafts therefore need no explicit rollback: the next step hides them and overwrites them.

Shapes: B batch, S cache slots, K kv heads, D head dim; a run of stacked layers carries leading
[repeats, length] dims, the MTP cache a leading [heads] dim.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from mimo_jax import sharding
from mimo_jax.config import GLOBAL, SWA, ModelConfig
from mimo_jax.layer_plan import plan_layers

EMPTY = 2**30  # the position of a slot that holds nothing: later than any query, so never visible
CACHE_AXES = ("cache_batch", "cache_seq", "cache_heads", None)
# Prompts are written into the caches in chunks of at most this many tokens (generate, the serving
# engine and the pod plan's prefill step): it bounds a step's attention scores and activations.
DEFAULT_PREFILL_CHUNK = 512


@flax.struct.dataclass
class LayerKV:
    k: jax.Array  # [..., B, S, K, Dqk]
    v: jax.Array  # [..., B, S, K, Dv]


@flax.struct.dataclass
class CacheStep:
    """Where one step's new tokens go, shared by every layer of a cache (computed once per step)."""

    ring_positions: jax.Array  # [B, R] position each ring slot holds for this step's attention
    ring_slots: jax.Array  # [B, T] ring slot of each new token; R means "do not write"
    global_slots: jax.Array  # [B, T] = positions; S means "do not write"


@flax.struct.dataclass
class KVCache:
    layers: dict  # "segment/run" (as in ModelOutput.router) -> LayerKV [repeats, length, B, S or R, K, D]
    ring_positions: jax.Array  # [B, R] position held by each SWA ring slot (EMPTY if none)
    mtp: LayerKV | None = None  # [heads, B, R_mtp, K, D]
    mtp_positions: jax.Array | None = None  # [B, R_mtp]
    max_seq_len: int = flax.struct.field(pytree_node=False, default=0)  # global cache slots

    def step(self, positions_BT, valid_BT=None) -> CacheStep:
        return make_step(self.ring_positions, positions_BT, valid_BT, self.max_seq_len)

    def mtp_step(self, positions_BT, valid_BT=None) -> CacheStep:
        return make_step(self.mtp_positions, positions_BT, valid_BT, self.max_seq_len)

    def advance(self, step: CacheStep, positions_BT, *, mtp: bool = False) -> KVCache:
        """The slot positions after `step` wrote `positions_BT` (the layers wrote their own K/V)."""
        field = "mtp_positions" if mtp else "ring_positions"
        updated = write_rows(getattr(self, field), step.ring_slots, positions_BT)
        return self.replace(**{field: updated})


def ring_size(cfg: ModelConfig, num_draft: int) -> int:
    """window + 1 + drafts: the window before the earliest verified query, plus the step's tokens."""
    return cfg.sliding_window + 1 + num_draft


def mtp_ring_size(cfg: ModelConfig, num_draft: int) -> int:
    """The MTP heads rewrite the last 2 * num_draft positions each round (see inference.py)."""
    return cfg.sliding_window + 2 * num_draft


def init_cache(cfg: ModelConfig, batch: int, max_seq_len: int, *, num_draft: int = 0, mtp: bool = False,
               dtype=None) -> KVCache:
    """Zeroed caches for `batch` rows of up to `max_seq_len` tokens; `mtp` adds the heads' rings."""
    dtype = dtype or cfg.dtype
    plan = plan_layers(tuple(zip(cfg.layer_types, cfg.mlp_types)))
    ring = ring_size(cfg, num_draft)

    def zeros(lead, layer_type, slots):
        kv = cfg.attention_kind(layer_type).kv_heads
        return LayerKV(k=jnp.zeros((*lead, batch, slots, kv, cfg.qk_head_dim), dtype),
                       v=jnp.zeros((*lead, batch, slots, kv, cfg.v_head_dim), dtype))

    layers = {}
    for i, segment in enumerate(plan):
        for j, run in enumerate(segment.runs):
            layer_type = run.kind[0]
            slots = max_seq_len if layer_type == GLOBAL else ring
            layers[f"{i}/{j}"] = zeros((segment.repeats, run.length), layer_type, slots)
    cache = KVCache(layers=layers, ring_positions=jnp.full((batch, ring), EMPTY, jnp.int32), max_seq_len=max_seq_len)
    if mtp and cfg.num_mtp_heads:
        size = mtp_ring_size(cfg, num_draft)
        cache = cache.replace(mtp=zeros((cfg.num_mtp_heads,), SWA, size),
                              mtp_positions=jnp.full((batch, size), EMPTY, jnp.int32))
    return cache


def ring_slots(positions_BT, valid_BT, size: int):
    """Slot position % size for each valid token; `size` ("drop") for padding and for tokens a
    longer chunk would overwrite itself (only its last `size` positions are written)."""
    last_B = jnp.max(jnp.where(valid_BT, positions_BT, -1), axis=1)
    keep = valid_BT & (positions_BT > last_B[:, None] - size)
    return jnp.where(keep, positions_BT % size, size)


def make_step(ring_positions_BR, positions_BT, valid_BT, max_seq_len: int) -> CacheStep:
    if valid_BT is None:
        valid_BT = jnp.ones(positions_BT.shape, bool)
    first_B = jnp.min(jnp.where(valid_BT, positions_BT, EMPTY), axis=1)
    return CacheStep(
        ring_positions=jnp.where(ring_positions_BR >= first_B[:, None], EMPTY, ring_positions_BR),
        ring_slots=ring_slots(positions_BT, valid_BT, ring_positions_BR.shape[1]),
        global_slots=jnp.where(valid_BT & (positions_BT < max_seq_len), positions_BT, max_seq_len),
    )


def write_rows(buffer_BS, slots_BT, values_BT):
    """buffer[b, slots[b, t]] = values[b, t]; out-of-range slots are dropped."""
    rows = jnp.arange(buffer_BS.shape[0])[:, None]
    return buffer_BS.at[rows, slots_BT].set(values_BT.astype(buffer_BS.dtype), mode="drop")


def global_attend(cache: LayerKV, step: CacheStep, k_BTKD, v_BTKV):
    """Write, then return (cache, keys, values, key positions) covering every slot."""
    k = sharding.constrain(write_rows(cache.k, step.global_slots, k_BTKD), CACHE_AXES)
    v = sharding.constrain(write_rows(cache.v, step.global_slots, v_BTKV), CACHE_AXES)
    b, s = k.shape[:2]
    positions_BS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    return LayerKV(k, v), k, v, positions_BS


def ring_attend(cache: LayerKV, step: CacheStep, positions_BT, k_BTKD, v_BTKV):
    """Return (written cache, keys, values, key positions): the ring before the write plus the new keys."""
    keys = jnp.concatenate([cache.k, k_BTKD.astype(cache.k.dtype)], axis=1)
    values = jnp.concatenate([cache.v, v_BTKV.astype(cache.v.dtype)], axis=1)
    positions = jnp.concatenate([step.ring_positions, positions_BT.astype(jnp.int32)], axis=1)
    written = LayerKV(sharding.constrain(write_rows(cache.k, step.ring_slots, k_BTKD), CACHE_AXES),
                      sharding.constrain(write_rows(cache.v, step.ring_slots, v_BTKV), CACHE_AXES))
    return written, keys, values, positions
