"""KV caches for decoding: a full-length cache per global layer, a ring buffer per SWA layer.

Global layers write the new keys at slot = position and attend over the whole cache (slot i holds
position i, so empty or stale slots lie after every query and causality hides them).

SWA layers keep `window + 1 + num_draft` slots, slot = position % size, so their memory does not
grow with context. A step attends over the ring as it was (entries at or after the step's first
position are hidden: they are stale drafts) plus the step's own new keys, then writes the new keys.
Rejected drafts therefore need no explicit rollback: the next step hides them and overwrites them.

A scan over a run of layers carries the run's stacked cache and hands each layer a `StackedLayerKV`
(the stack plus the layer's index): the layer writes its new keys into the stack in place and reads
its own slice. Slicing each layer's cache out and stacking the results again would copy every cache
in full on every decode step, which costs more than the step's attention at decode sizes.

Shapes: B batch, S cache slots, K kv heads, D head dim; a run of stacked layers carries leading
[repeats, length] dims, the MTP cache a leading [heads] dim.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from mimo_jax import sharding
from mimo_jax.config import GLOBAL, ModelConfig
from mimo_jax.layer_plan import plan_layers

EMPTY = 2**30  # the position of a slot that holds nothing: later than any query, so never visible
CACHE_AXES = ("cache_batch", "cache_seq", "cache_heads", None)


@flax.struct.dataclass
class LayerKV:
    k: jax.Array  # [..., B, S, K, Dqk]
    v: jax.Array  # [..., B, S, K, Dv]


@flax.struct.dataclass
class StackedLayerKV:
    """One layer of a stacked cache: `kv` is the whole stack, `index` the layer's leading indices."""

    kv: LayerKV  # [*stack, B, S, K, D]
    index: tuple  # int32 scalars, one per stack dim

    def read(self) -> LayerKV:
        n = len(self.index)

        def one(x):
            start = (*self.index, *(0,) * (x.ndim - n))
            return jax.lax.dynamic_slice(x, start, (1,) * n + x.shape[n:]).reshape(x.shape[n:])

        return jax.tree.map(one, self.kv)

    def write(self, slots_BT, k_BTKD, v_BTKV) -> StackedLayerKV:
        rows = jnp.arange(slots_BT.shape[0])[:, None]

        def put(buffer, values):
            written = buffer.at[(*self.index, rows, slots_BT)].set(values.astype(buffer.dtype), mode="drop")
            return sharding.constrain(written, (None,) * len(self.index) + CACHE_AXES)

        return self.replace(kv=LayerKV(put(self.kv.k, k_BTKD), put(self.kv.v, v_BTKV)))


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
        kv = cfg.kv_heads(layer_type)
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
        cache = cache.replace(mtp=zeros((cfg.num_mtp_heads,), "swa", size),
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


def _write(cache: LayerKV | StackedLayerKV, slots_BT, k_BTKD, v_BTKV):
    if isinstance(cache, StackedLayerKV):
        return cache.write(slots_BT, k_BTKD, v_BTKV)
    return LayerKV(sharding.constrain(write_rows(cache.k, slots_BT, k_BTKD), CACHE_AXES),
                   sharding.constrain(write_rows(cache.v, slots_BT, v_BTKV), CACHE_AXES))


def _read(cache: LayerKV | StackedLayerKV) -> LayerKV:
    return cache.read() if isinstance(cache, StackedLayerKV) else cache


def global_attend(cache: LayerKV | StackedLayerKV, step: CacheStep, k_BTKD, v_BTKV):
    """Write, then return (cache, keys, values, key positions) covering every slot."""
    cache = _write(cache, step.global_slots, k_BTKD, v_BTKV)
    layer = _read(cache)
    b, s = layer.k.shape[:2]
    positions_BS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    return cache, layer.k, layer.v, positions_BS


def ring_attend(cache: LayerKV | StackedLayerKV, step: CacheStep, positions_BT, k_BTKD, v_BTKV):
    """Return (written cache, keys, values, key positions): the ring before the write plus the new keys."""
    layer = _read(cache)
    keys = jnp.concatenate([layer.k, k_BTKD.astype(layer.k.dtype)], axis=1)
    values = jnp.concatenate([layer.v, v_BTKV.astype(layer.v.dtype)], axis=1)
    positions = jnp.concatenate([step.ring_positions, positions_BT.astype(jnp.int32)], axis=1)
    return _write(cache, step.ring_slots, k_BTKD, v_BTKV), keys, values, positions
