"""Small building blocks: parameters with logical axes, RMSNorm, partial RoPE, SwiGLU, attention.

Shapes are in names: B batch, T query length, S key length, D model width, H query heads,
K kv heads, G query heads per kv head, E experts, I FFN width, V vocabulary.
Layers stacked for `jax.lax.scan` carry leading `stack` dims with logical axis "layers".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mimo_jax import attention as attention_ops
from mimo_jax import kv_cache
from mimo_jax.config import ModelConfig
from mimo_jax.fp8_resident import weight

LAYERS = "layers"


class RouterBias(nnx.Variable):
    """The aux-loss-free balancing bias: updated by a rule after each step, never by the optimizer."""


def make_param(rngs: nnx.Rngs, shape, axes, dtype, stack=(), init="normal", std=0.02, kind=nnx.Param):
    """A parameter of `stack + shape`, tagged with logical axis names for the sharding rules."""
    if len(shape) != len(axes):
        raise ValueError(f"shape {shape} and logical axes {axes} differ in rank")
    full = tuple(stack) + tuple(shape)
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), full, jnp.float32)
    elif init == "ones":
        value = jnp.ones(full, jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(full, jnp.float32)
    else:
        raise ValueError(f"unknown init {init!r}")
    return kind(value.astype(dtype), logical_axes=(LAYERS,) * len(stack) + tuple(axes))


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig, stack=(), *, rngs: nnx.Rngs):
        self.weight = make_param(rngs, (cfg.hidden_size,), (None,), cfg.param_dtype, stack, init="ones")
        self.eps = cfg.rms_norm_eps

    def __call__(self, x_BTD):
        x32 = x_BTD.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # Like the reference, round to the activation dtype before the weight multiply.
        return normed.astype(x_BTD.dtype) * self.weight[...].astype(x_BTD.dtype)


def apply_rope(x_BTHD, positions_BT, theta: float, rotary_dim: int):
    """Rotate-half RoPE on the first `rotary_dim` dims only; pairs are (i, i + rotary_dim/2)."""
    half = rotary_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    angles_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    cos = jnp.cos(angles_BTF)[:, :, None, :]
    sin = jnp.sin(angles_BTF)[:, :, None, :]
    x1 = x_BTHD[..., :half].astype(jnp.float32)
    x2 = x_BTHD[..., half:rotary_dim].astype(jnp.float32)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BTHD.dtype)
    return jnp.concatenate([rotated, x_BTHD[..., rotary_dim:]], axis=-1)


class DenseMLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, stack=(), *, rngs: nnx.Rngs):
        d, i, std, dt = cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range, cfg.param_dtype
        self.gate = make_param(rngs, (d, i), ("embed", "mlp"), dt, stack, std=std)
        self.up = make_param(rngs, (d, i), ("embed", "mlp"), dt, stack, std=std)
        self.down = make_param(rngs, (i, d), ("mlp", "embed"), dt, stack, std=std)

    def __call__(self, x_BTD):
        dt = x_BTD.dtype
        h = jax.nn.silu(x_BTD @ weight(self.gate, dt)) * (x_BTD @ weight(self.up, dt))
        return h @ weight(self.down, dt)


class Attention(nnx.Module):
    """GQA attention with q/k dim != v dim, partial RoPE, value scale and optional per-head sinks."""

    def __init__(self, cfg: ModelConfig, layer_type: str, stack=(), *, rngs: nnx.Rngs):
        kind = cfg.attention_kind(layer_type)
        d, h, kv = cfg.hidden_size, cfg.num_attention_heads, kind.kv_heads
        dqk, dv, std, dt = cfg.qk_head_dim, cfg.v_head_dim, cfg.initializer_range, cfg.param_dtype
        self.q = make_param(rngs, (d, h, dqk), ("embed", "heads", None), dt, stack, std=std)
        self.k = make_param(rngs, (d, kv, dqk), ("embed", "kv_heads", None), dt, stack, std=std)
        self.v = make_param(rngs, (d, kv, dv), ("embed", "kv_heads", None), dt, stack, std=std)
        self.o = make_param(rngs, (h, dv, d), ("heads", None, "embed"), dt, stack, std=std)
        # Sinks are logits compared against fp32 scores: keep them fp32 whatever the param dtype.
        self.sinks = make_param(rngs, (h,), ("heads",), jnp.float32, stack, std=std) if kind.sinks else None
        self.theta = kind.rope_theta
        self.window = kind.window
        self.rotary_dim = cfg.rotary_dim
        self.value_scale = cfg.attention_value_scale
        self.impl = cfg.resolved_attention_impl
        self.interpret = cfg.pallas_interpret

    def __call__(self, x_BTD, positions_BT, segment_ids_BT=None, cache=None, step=None):
        """Output [B, T, D]; with a `kv_cache.LayerKV` cache (and its `CacheStep`), (output, cache)."""
        dt = x_BTD.dtype
        q_BTHD = jnp.einsum("btd,dhk->bthk", x_BTD, weight(self.q, dt))
        k_BTKD = jnp.einsum("btd,dhk->bthk", x_BTD, weight(self.k, dt))
        v_BTKV = jnp.einsum("btd,dhk->bthk", x_BTD, weight(self.v, dt)) * jnp.asarray(self.value_scale, dt)
        q_BTHD = apply_rope(q_BTHD, positions_BT, self.theta, self.rotary_dim)
        k_BTKD = apply_rope(k_BTKD, positions_BT, self.theta, self.rotary_dim)
        impl, kv_positions = self.impl, positions_BT
        if cache is not None:
            if self.window is None:
                cache, k_BTKD, v_BTKV, kv_positions = kv_cache.global_attend(cache, step, k_BTKD, v_BTKV)
            else:
                # The ring's order keys wrap and hold hidden slots: outside the kernel's static bound
                # and the blocked XLA path's contract, so the dense reference.
                cache, k_BTKD, v_BTKV, kv_positions = kv_cache.ring_attend(cache, step, positions_BT, k_BTKD, v_BTKV)
                impl = "dense"
        out_BTHV = attention_ops.attention(
            q_BTHD, k_BTKD, v_BTKV, None if self.sinks is None else self.sinks[...],
            window=self.window, q_positions=positions_BT, kv_positions=kv_positions,
            segment_ids=segment_ids_BT, impl=impl, interpret=self.interpret,
        )
        out_BTD = jnp.einsum("bthv,hvd->btd", out_BTHV, weight(self.o, dt))
        return out_BTD if cache is None else (out_BTD, cache)
