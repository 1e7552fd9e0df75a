import dataclasses
import json
import os

import pytest

from mimo_jax.config import (GLOBAL, SWA, AttentionKind, Config, ConfigError, ModelConfig, apply_overrides, load_config,
                             model_config_from_hf, model_config_to_hf)
from tests.conftest import GOLDEN_DIR

# The hub config.json of XiaomiMiMo/MiMo-V2-Flash as reconstructed in the spec, section 1.1.
HUB_CONFIG = {
    "architectures": ["MiMoV2FlashForCausalLM"], "model_type": "mimo_v2_flash",
    "auto_map": {"AutoConfig": "configuration_mimo_v2_flash.MiMoV2FlashConfig"},
    "vocab_size": 152576, "hidden_size": 4096, "num_hidden_layers": 48, "num_attention_heads": 64,
    "swa_num_attention_heads": 64, "num_key_value_heads": 4, "swa_num_key_value_heads": 8, "head_dim": 192,
    "swa_head_dim": 192, "v_head_dim": 128, "swa_v_head_dim": 128, "intermediate_size": 16384,
    "moe_intermediate_size": 2048, "n_routed_experts": 256, "num_experts_per_tok": 8, "n_shared_experts": None,
    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
    "routed_scaling_factor": None, "moe_layer_freq": [0] + [1] * 47,
    "hybrid_layer_pattern": [0 if i == 0 or (i + 1) % 6 == 0 else 1 for i in range(48)], "hybrid_block_size": None,
    "sliding_window": 128, "sliding_window_size": 128, "attention_chunk_size": 128, "rope_theta": 5000000,
    "swa_rope_theta": 10000, "partial_rotary_factor": 0.334, "rope_scaling": None, "attention_value_scale": 0.707,
    "add_swa_attention_sink_bias": True, "add_full_attention_sink_bias": False, "attention_bias": False,
    "attention_dropout": 0.0, "hidden_act": "silu", "layernorm_epsilon": 1e-5, "max_position_embeddings": 262144,
    "tie_word_embeddings": False, "initializer_range": 0.02, "torch_dtype": "bfloat16", "eos_token_id": 151645,
    "pad_token_id": 151643,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128], "ignored_layers": ["model.layers.0.self_attn.o_proj"]},
}


def test_release_preset_is_the_released_model():
    cfg = load_config("configs/mimo_v2_flash.yaml").model
    assert cfg == ModelConfig()
    assert [i for i, t in enumerate(cfg.layer_types) if t == GLOBAL] == [0, 5, 11, 17, 23, 29, 35, 41, 47]
    assert cfg.layer_types.count(SWA) == 39 and cfg.moe_layers == tuple(range(1, 48))
    assert (cfg.global_kv_heads, cfg.swa_kv_heads, cfg.qk_head_dim, cfg.v_head_dim, cfg.rotary_dim) == (4, 8, 192, 128, 64)
    assert cfg.sliding_window == 128 and cfg.num_mtp_heads == 3
    assert cfg.attention_kind(GLOBAL) == AttentionKind(GLOBAL, kv_heads=4, rope_theta=5e6, sinks=False, window=None)
    assert cfg.attention_kind(SWA) == AttentionKind(SWA, kv_heads=8, rope_theta=1e4, sinks=True, window=128)


def test_hub_dialect_reads_as_the_release():
    assert model_config_from_hf(HUB_CONFIG) == ModelConfig()


def test_transformers_dialect_window_counts_the_query():
    with open(os.path.join(GOLDEN_DIR, "hybrid_a", "config.json")) as f:
        hf = json.load(f)
    cfg = model_config_from_hf(hf, num_mtp_heads=0)
    assert cfg.sliding_window == hf["sliding_window"] - 1
    assert cfg.layer_types[0] == GLOBAL and cfg.swa_kv_heads == 2 * cfg.global_kv_heads
    assert cfg.swa_rope_theta == hf["rope_parameters"]["sliding_attention"]["rope_theta"]


def test_to_hf_round_trips_and_transformers_reads_it_the_same():
    transformers = pytest.importorskip("transformers")
    cfg = load_config("tiny").model
    hf = model_config_to_hf(cfg)
    # dtypes are a runtime choice (load_hf's `dtype`), not part of config.json.
    runtime = dict(dtype=ModelConfig.dtype, param_dtype=ModelConfig.param_dtype)
    assert model_config_from_hf(hf, num_mtp_heads=cfg.num_mtp_heads) == dataclasses.replace(cfg, **runtime)
    theirs = transformers.MiMoV2FlashConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    assert theirs.sliding_window == cfg.sliding_window + 1
    assert [t == "sliding_attention" for t in theirs.layer_types] == [t == SWA for t in cfg.layer_types]
    assert theirs.rope_parameters["full_attention"]["rope_theta"] == cfg.global_rope_theta


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
    ({"model_type": "mimo_v2"}, "model_type"),
    ({"frobnicate": 1}, "unknown key(s) ['frobnicate']"),
    ({"layer_types": ["full_attention"] * 48}, "contradictory keys: layer_types"),
    ({"rms_norm_eps": 1e-6}, "contradictory keys: rms_norm_eps"),
    ({"sliding_window": 200}, "sliding_window_size=128 but sliding_window=200"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 5e6}}}, "rope_type"),
    ({"num_key_value_heads": 5}, "must divide"),
])
def test_bad_hf_configs_are_one_line_errors(change, message):
    with pytest.raises(ConfigError) as err:
        model_config_from_hf({**HUB_CONFIG, **change}, source="x/config.json")
    assert message in str(err.value) and "x/config.json" in str(err.value) and "\n" not in str(err.value)


def test_overrides_parse_yaml_values_and_reject_unknown_keys():
    cfg = apply_overrides(Config(), ["model.num_layers=2", "model.layer_types=[global, swa]",
                                     "model.mlp_types=[dense, moe]", "model.routed_scaling_factor=2"])
    assert cfg.model.num_layers == 2 and cfg.model.routed_scaling_factor == 2.0
    with pytest.raises(ConfigError, match="no key 'hiden_size'.*valid keys: .*hidden_size"):
        apply_overrides(Config(), ["model.hiden_size=3"])
    with pytest.raises(ConfigError, match="expected an integer"):
        apply_overrides(Config(), ["model.hidden_size=wide"])
    with pytest.raises(ConfigError, match="model.layer_types has 48 entries but model.num_layers is 2"):
        apply_overrides(Config(), ["model.num_layers=2"])


def test_yaml_unknown_key_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hidden_sise: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key\(s\) model.hidden_sise"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="not a preset"):
        load_config("no_such_preset")
