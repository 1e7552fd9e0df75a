"""Parameter counts from abstract shapes (nothing is allocated).

    python -m mimo_jax.params configs/mimo_v2_flash.yaml [dotted.key=value ...]

Prints total (main model), MTP and per-token active parameters; the last line is JSON
{"main": ..., "mtp": ..., "active": ...}. Active counts every main-model parameter a token uses:
all but the input embedding and the (num_experts - num_experts_per_token) experts it skips per MoE
layer. Like the checkpoint's tensor count, it includes the routers' correction biases.
"""

from __future__ import annotations

import json
import math
import sys

import jax
from flax import nnx

from mimo_jax.config import ConfigError, ModelConfig, load_config
from mimo_jax.layers import RouterBias
from mimo_jax.model import abstract_model


def count_params(cfg: ModelConfig) -> dict[str, int]:
    model = abstract_model(cfg)
    params = nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, RouterBias)))
    sizes = {path: math.prod(var.get_value().shape) for path, var in params}
    mtp = sum(n for path, n in sizes.items() if path[0] == "mtp")
    main = sum(sizes.values()) - mtp
    expert_size = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    skipped = len(cfg.moe_layers) * (cfg.num_experts - cfg.num_experts_per_token) * expert_size
    active = main - sizes[("embed",)] - skipped
    return {"main": main, "mtp": mtp, "active": active}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    try:
        cfg = load_config(argv[0], argv[1:]).model
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = count_params(cfg)
    print(f"config:            {argv[0]}")
    print(f"main model params: {counts['main']:,} ({counts['main'] / 1e9:.2f}B)")
    print(f"MTP params:        {counts['mtp']:,} ({cfg.num_mtp_heads} heads)")
    print(f"active per token:  {counts['active']:,} (excluding the input embedding)")
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    jax.config.update("jax_platforms", "cpu")
    sys.exit(main(sys.argv[1:]))
