"""Configuration: one frozen dataclass tree (`mimo_jax.config.schema`), loadable from YAML presets
and files, from a Hugging Face `config.json` (`mimo_jax.config.hf`), with `dotted.key=value`
overrides. Every name of the submodules is importable from here."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import yaml

from mimo_jax.config.hf import (
    HF_ARCHITECTURE,
    HF_MODEL_TYPE,
    model_config_from_hf,
    model_config_to_hf,
)
from mimo_jax.config.schema import (
    ATTENTION_IMPLS,
    DENSE,
    GLOBAL,
    KERNEL_MODES,
    MESH_AXES,
    MOE,
    MOE_IMPLS,
    REMAT_MODES,
    SOURCES,
    SWA,
    AttentionKind,
    Config,
    ConfigError,
    DataConfig,
    DistributedConfig,
    MeshConfig,
    ModelConfig,
    MOPDConfig,
    ShardingRules,
    TrainConfig,
    apply_overrides,
    check_choices,
    coerce,
    from_dict,
    release_layer_types,
    release_mlp_types,
    to_dict,
)

__all__ = [
    "ATTENTION_IMPLS", "CONFIG_DIR", "DENSE", "GLOBAL", "HF_ARCHITECTURE", "HF_MODEL_TYPE", "KERNEL_MODES",
    "MESH_AXES", "MOE", "MOE_IMPLS", "REMAT_MODES", "SOURCES", "SWA", "AttentionKind", "Config", "ConfigError",
    "DataConfig", "DistributedConfig", "MOPDConfig", "MeshConfig", "ModelConfig", "ShardingRules", "TrainConfig",
    "apply_overrides", "check_choices", "coerce", "from_dict", "load_config", "model_config_from_hf",
    "model_config_to_hf", "release_layer_types", "release_mlp_types", "resolve_config_path", "to_dict",
]

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def resolve_config_path(name_or_path: str) -> str:
    """A YAML file path, or a preset name from `configs/` (`tiny`, `mimo_v2_flash`)."""
    if os.path.exists(name_or_path):
        return name_or_path
    preset = os.path.join(CONFIG_DIR, name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
    if os.path.exists(preset):
        return preset
    presets = sorted(p[:-5] for p in os.listdir(CONFIG_DIR) if p.endswith(".yaml")) if os.path.isdir(CONFIG_DIR) else []
    raise ConfigError(f"config {name_or_path!r}: no such file, and not a preset ({', '.join(presets)})")


def load_config(name_or_path: str, overrides: Sequence[str] = ()) -> Config:
    """Loads a YAML preset/file or a HF `config.json` (file or directory), then applies overrides."""
    path = name_or_path
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise ConfigError(f"{name_or_path}: directory has no config.json")
    if path.endswith(".json"):
        with open(path) as f:
            try:
                hf = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
        cfg = Config(model=model_config_from_hf(hf, source=path))
    else:
        path = resolve_config_path(path)
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        try:
            cfg = from_dict(Config, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    return apply_overrides(cfg, overrides)
