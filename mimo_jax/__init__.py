"""MiMo-V2-Flash in JAX / Flax NNX.

Public API: `load_hf`, `save_hf`, `generate`, `MiMoV2Flash`, `ModelOutput`, `ModelConfig`, `Config`, `load_config`.
"""

from mimo_jax.config import Config, ConfigError, ModelConfig, load_config
from mimo_jax.hf_io import load_hf, save_hf
from mimo_jax.inference import GenerateResult, SamplingParams, generate
from mimo_jax.model import MiMoV2Flash, ModelOutput
from mimo_jax.safetensors_io import CheckpointError

__all__ = [
    "CheckpointError", "Config", "ConfigError", "GenerateResult", "MiMoV2Flash", "ModelConfig", "ModelOutput",
    "SamplingParams", "generate", "load_config", "load_hf", "save_hf",
]
