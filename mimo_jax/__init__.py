"""MiMo-V2-Flash in JAX / Flax NNX.

Public API: `load_hf`, `save_hf`, `generate`, `MiMoV2Flash`, `ModelOutput`, `ModelConfig`, `Config`, `load_config`.
"""

# First, before anything starts a JAX backend: on a machine without a TPU, keep the installed libtpu
# (there for ahead-of-time TPU compiles) from starting at backend discovery and printing its
# start-up errors. Nothing changes on a TPU machine. See mimo_jax/libtpu_setup.py.
from mimo_jax.libtpu_setup import quiet_libtpu as _quiet_libtpu

_quiet_libtpu()

from mimo_jax.config import Config, ConfigError, ModelConfig, load_config
from mimo_jax.hf_io import load_hf, save_hf
from mimo_jax.inference import GenerateResult, SamplingParams, generate
from mimo_jax.model import MiMoV2Flash, ModelOutput
from mimo_jax.safetensors_io import CheckpointError

__all__ = [
    "CheckpointError", "Config", "ConfigError", "GenerateResult", "MiMoV2Flash", "ModelConfig", "ModelOutput",
    "SamplingParams", "generate", "load_config", "load_hf", "save_hf",
]
