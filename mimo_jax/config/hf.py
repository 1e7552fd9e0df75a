"""Hugging Face `config.json` <-> `ModelConfig`, in both dialects: the hub's (the released
checkpoint's, read by SGLang and vLLM) and transformers' (`MiMoV2FlashConfig`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mimo_jax.config.schema import (
    DENSE,
    GLOBAL,
    MOE,
    SWA,
    ConfigError,
    ModelConfig,
    coerce,
    release_layer_types,
    release_mlp_types,
)

HF_ARCHITECTURE = "MiMoV2FlashForCausalLM"
HF_MODEL_TYPE = "mimo_v2_flash"
_HF_LAYER_TYPE = {"full_attention": GLOBAL, "sliding_attention": SWA}
_HF_MLP_TYPE = {"dense": DENSE, "sparse": MOE}

# Keys that carry no information for this model (or are checked elsewhere, like quantization).
_HF_IGNORED_KEYS = frozenset(
    {
        "architectures", "model_type", "auto_map", "transformers_version", "torch_dtype", "dtype", "use_cache",
        "attention_dropout", "output_router_logits", "attention_chunk_size", "hybrid_block_size",
        "quantization_config", "_name_or_path", "return_dict", "output_hidden_states", "output_attentions",
        "router_aux_loss_coef", "aux_loss_alpha", "seq_aux", "moe_router_dtype", "_attn_implementation_autoset",
        "chunk_size_feed_forward", "is_encoder_decoder", "tokenizer_class", "problem_type", "id2label", "label2id",
        "scoring_func", "topk_method", "n_shared_experts", "hidden_act", "attention_bias", "rope_scaling",
        "swa_num_attention_heads", "swa_head_dim", "swa_v_head_dim", "tie_word_embeddings", "num_nextn_predict_layers",
    }
)


def model_config_from_hf(hf: Mapping[str, Any], source: str = "config.json", num_mtp_heads: int | None = None) -> ModelConfig:
    """Reads a HF config in the hub dialect, transformers' dialect, or a consistent mix of both.

    The hub config does not state the MTP head count; `num_mtp_heads` (e.g. counted from the
    checkpoint's tensors) overrides `num_nextn_predict_layers`, which defaults to the release's 3.
    """

    def fail(msg: str):
        raise ConfigError(f"{source}: {msg}")

    arch = hf.get("architectures")
    if arch is not None and list(arch) != [HF_ARCHITECTURE]:
        fail(f"architectures {arch} is not supported (expected [{HF_ARCHITECTURE!r}])")
    if hf.get("model_type", HF_MODEL_TYPE) != HF_MODEL_TYPE:
        fail(f"model_type {hf['model_type']!r} is not supported (expected {HF_MODEL_TYPE!r})")
    _check_hf_constants(hf, fail)

    known = _HF_IGNORED_KEYS | set(_HF_DIRECT) | {
        "num_hidden_layers", "layer_types", "hybrid_layer_pattern", "mlp_layer_types", "moe_layer_freq",
        "sliding_window", "sliding_window_size", "rms_norm_eps", "layernorm_epsilon", "rope_parameters",
        "rope_theta", "swa_rope_theta", "partial_rotary_factor", "num_key_value_heads", "swa_num_key_value_heads",
        "routed_scaling_factor", "add_swa_attention_sink_bias", "add_full_attention_sink_bias",
        "attention_value_scale", "bos_token_id", "eos_token_id", "pad_token_id",
    }
    unknown = sorted(set(hf) - known)
    if unknown:
        fail(f"unknown key(s) {unknown}")

    kw: dict[str, Any] = {}
    for hf_key, field in _HF_DIRECT.items():
        if hf_key in hf:
            kw[field] = hf[hf_key]
    num_layers = hf.get("num_hidden_layers", 48)
    kw["num_layers"] = num_layers

    def agree(name_a: str, a: Any, name_b: str, b: Any) -> Any:
        if a is not None and b is not None and a != b:
            fail(f"contradictory keys: {name_a}={a!r} but {name_b}={b!r}")
        return a if a is not None else b

    layer_types = None
    if "layer_types" in hf:
        bad = [t for t in hf["layer_types"] if t not in _HF_LAYER_TYPE]
        if bad:
            fail(f"layer_types has unknown entries {sorted(set(bad))}")
        layer_types = tuple(_HF_LAYER_TYPE[t] for t in hf["layer_types"])
    pattern = None
    if "hybrid_layer_pattern" in hf:
        if any(p not in (0, 1) for p in hf["hybrid_layer_pattern"]):
            fail("hybrid_layer_pattern entries must be 0 (global) or 1 (sliding window)")
        pattern = tuple(SWA if p else GLOBAL for p in hf["hybrid_layer_pattern"])
    kw["layer_types"] = agree("layer_types", layer_types, "hybrid_layer_pattern", pattern) or release_layer_types(num_layers)

    mlp_types = tuple(_HF_MLP_TYPE.get(t, t) for t in hf["mlp_layer_types"]) if "mlp_layer_types" in hf else None
    freq = hf.get("moe_layer_freq")
    if isinstance(freq, int):
        fail("moe_layer_freq as an integer is not supported; give a per-layer list")
    freq_types = tuple(MOE if f else DENSE for f in freq) if freq is not None else None
    kw["mlp_types"] = agree("mlp_layer_types", mlp_types, "moe_layer_freq", freq_types) or release_mlp_types(num_layers)

    eps = agree("rms_norm_eps", hf.get("rms_norm_eps"), "layernorm_epsilon", hf.get("layernorm_epsilon"))
    if eps is not None:
        kw["rms_norm_eps"] = eps

    # transformers' `sliding_window` counts the query; the hub's `sliding_window_size` does not. The hub
    # config also carries a dead `sliding_window` equal to the size, which SGLang and transformers ignore.
    size, hf_window = hf.get("sliding_window_size"), hf.get("sliding_window")
    if size is not None:
        if hf_window is not None and hf_window not in (size, size + 1):
            fail(f"contradictory keys: sliding_window_size={size} but sliding_window={hf_window}")
        kw["sliding_window"] = size
    elif hf_window is not None:
        kw["sliding_window"] = hf_window - 1

    rope = hf.get("rope_parameters")
    if rope is not None:
        for hf_type in rope:
            if hf_type not in _HF_LAYER_TYPE:
                fail(f"rope_parameters has unknown layer type {hf_type!r}")
            if rope[hf_type].get("rope_type", "default") != "default":
                fail(f"rope_parameters[{hf_type!r}].rope_type={rope[hf_type]['rope_type']!r} is not supported")
    rope = rope or {}
    g_theta = agree("rope_theta", hf.get("rope_theta"), "rope_parameters.full_attention.rope_theta",
                    rope.get("full_attention", {}).get("rope_theta"))
    s_theta = agree("swa_rope_theta", hf.get("swa_rope_theta"), "rope_parameters.sliding_attention.rope_theta",
                    rope.get("sliding_attention", {}).get("rope_theta"))
    factors = {p["partial_rotary_factor"] for p in rope.values() if "partial_rotary_factor" in p}
    if len(factors) > 1:
        fail(f"different partial_rotary_factor per layer type {sorted(factors)} is not supported")
    prf = agree("partial_rotary_factor", hf.get("partial_rotary_factor"), "rope_parameters.*.partial_rotary_factor",
                factors.pop() if factors else None)
    for field, value in (("global_rope_theta", g_theta), ("swa_rope_theta", s_theta), ("partial_rotary_factor", prf)):
        if value is not None:
            kw[field] = float(value)

    if "num_key_value_heads" in hf:
        kw["global_kv_heads"] = hf["num_key_value_heads"]
        # transformers derives the SWA kv heads as twice the global ones; the hub states them.
        kw["swa_kv_heads"] = hf.get("swa_num_key_value_heads", 2 * hf["num_key_value_heads"])
    elif "swa_num_key_value_heads" in hf:
        kw["swa_kv_heads"] = hf["swa_num_key_value_heads"]
    if hf.get("routed_scaling_factor") is not None:
        kw["routed_scaling_factor"] = float(hf["routed_scaling_factor"])
    if hf.get("attention_value_scale") is not None:
        kw["attention_value_scale"] = float(hf["attention_value_scale"])
    kw["swa_attention_sinks"] = hf.get("add_swa_attention_sink_bias", True)
    kw["global_attention_sinks"] = hf.get("add_full_attention_sink_bias", False)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in hf:
            value = hf[key]
            kw[key] = value[0] if isinstance(value, list) and value else value
    if num_mtp_heads is None:
        num_mtp_heads = hf.get("num_nextn_predict_layers", 3)
    kw["num_mtp_heads"] = num_mtp_heads
    try:
        return ModelConfig(**{k: coerce(k, v, getattr(ModelConfig, k)) for k, v in kw.items()})
    except ConfigError as e:
        fail(str(e))


_HF_DIRECT = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "head_dim": "qk_head_dim",
    "v_head_dim": "v_head_dim",
    "intermediate_size": "intermediate_size",
    "moe_intermediate_size": "moe_intermediate_size",
    "n_routed_experts": "num_experts",
    "num_experts_per_tok": "num_experts_per_token",
    "n_group": "n_group",
    "topk_group": "topk_group",
    "norm_topk_prob": "norm_topk_prob",
    "max_position_embeddings": "max_position_embeddings",
    "initializer_range": "initializer_range",
}

# Keys whose only supported value is fixed by the architecture.
_HF_CONSTANTS = {
    "hidden_act": "silu",
    "attention_bias": False,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "tie_word_embeddings": False,
    "rope_scaling": None,
    "n_shared_experts": None,
}


def _check_hf_constants(hf: Mapping[str, Any], fail) -> None:
    for key, expected in _HF_CONSTANTS.items():
        if key in hf and hf[key] != expected and not (key == "n_shared_experts" and hf[key] == 0):
            fail(f"{key}={hf[key]!r} is not supported (MiMo-V2-Flash uses {expected!r})")
    heads = hf.get("num_attention_heads")
    for key, same_as in (("swa_num_attention_heads", heads), ("swa_head_dim", hf.get("head_dim")),
                         ("swa_v_head_dim", hf.get("v_head_dim"))):
        if key in hf and same_as is not None and hf[key] != same_as:
            fail(f"{key}={hf[key]} differs from the global layers' value {same_as}; this port needs them equal")


def model_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A config.json that the hub tools (SGLang, vLLM) and transformers all read the same way.

    transformers derives SWA kv heads as twice the global ones and always puts sinks on SWA layers
    only; a model outside that (allowed here through the hub keys) loads in the hub tools alone.
    """
    inv_layer = {v: k for k, v in _HF_LAYER_TYPE.items()}
    inv_mlp = {v: k for k, v in _HF_MLP_TYPE.items()}
    rope = {
        "full_attention": {"rope_type": "default", "rope_theta": cfg.global_rope_theta,
                           "partial_rotary_factor": cfg.partial_rotary_factor},
        "sliding_attention": {"rope_type": "default", "rope_theta": cfg.swa_rope_theta,
                              "partial_rotary_factor": cfg.partial_rotary_factor},
    }
    out = {"architectures": [HF_ARCHITECTURE], "model_type": HF_MODEL_TYPE}
    out.update({hf_key: getattr(cfg, field) for hf_key, field in _HF_DIRECT.items()})
    out.update(
        num_hidden_layers=cfg.num_layers,
        num_key_value_heads=cfg.global_kv_heads,
        swa_num_key_value_heads=cfg.swa_kv_heads,
        layer_types=[inv_layer[t] for t in cfg.layer_types],
        hybrid_layer_pattern=[int(t == SWA) for t in cfg.layer_types],
        mlp_layer_types=[inv_mlp[t] for t in cfg.mlp_types],
        moe_layer_freq=[int(t == MOE) for t in cfg.mlp_types],
        sliding_window=cfg.sliding_window + 1,
        sliding_window_size=cfg.sliding_window,
        rope_parameters=rope,
        rope_theta=cfg.global_rope_theta,
        swa_rope_theta=cfg.swa_rope_theta,
        partial_rotary_factor=cfg.partial_rotary_factor,
        rms_norm_eps=cfg.rms_norm_eps,
        layernorm_epsilon=cfg.rms_norm_eps,
        attention_value_scale=cfg.attention_value_scale,
        add_swa_attention_sink_bias=cfg.swa_attention_sinks,
        add_full_attention_sink_bias=cfg.global_attention_sinks,
        routed_scaling_factor=cfg.routed_scaling_factor,
        num_nextn_predict_layers=cfg.num_mtp_heads,
        hidden_act="silu",
        attention_bias=False,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        tie_word_embeddings=False,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    )
    return out
