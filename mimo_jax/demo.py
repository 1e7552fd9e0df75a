"""End-to-end check of the foundation on CPU, until `train.py` lands:

    python -m mimo_jax.demo [--config tiny] [--out DIR] [dotted.key=value ...]

Builds a randomly initialised model from the config, runs a forward pass (main and MTP logits),
exports it with `save_hf` (bf16 and FP8), reloads each with `load_hf`, and reports how closely the
reloaded models reproduce the logits (the bf16 export of a bf16 model is exact).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimo_jax.config import ConfigError, load_config
from mimo_jax.hf_io import load_hf, save_hf
from mimo_jax.model import MiMoV2Flash
from mimo_jax.params import count_params

PROMPT = "MiMo-V2-Flash interleaves five sliding-window layers with one global layer."


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny", help="YAML preset name or path (default: tiny)")
    parser.add_argument("--out", default=None, help="directory for the exported checkpoints (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, ["model.param_dtype=bfloat16", "model.dtype=bfloat16", *args.overrides]).model
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = count_params(cfg)
    print(f"model: {cfg.num_layers} layers ({cfg.layer_types.count('global')} global, {cfg.layer_types.count('swa')} "
          f"sliding-window), {cfg.num_experts} experts top-{cfg.num_experts_per_token}, {cfg.num_mtp_heads} MTP heads; "
          f"{counts['main']:,} params + {counts['mtp']:,} MTP")
    model = MiMoV2Flash(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray([[b % cfg.vocab_size for b in PROMPT.encode()]], jnp.int32)

    graphdef = nnx.graphdef(model)

    @jax.jit
    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids)

    start = time.time()
    out = forward(nnx.state(model), ids)
    print(f"forward: {ids.shape[1]} tokens -> logits {out.logits.shape}, MTP logits "
          f"{None if out.mtp_logits is None else out.mtp_logits.shape} in {time.time() - start:.1f}s (incl. compile)")

    out_dir = args.out or tempfile.mkdtemp(prefix="mimo_demo_")
    for name, dtype in (("bf16", None), ("fp8", "fp8")):
        path = os.path.join(out_dir, name)
        save_hf(model, path, dtype=dtype)
        reloaded = load_hf(path, jnp.bfloat16)
        again = forward(nnx.state(reloaded), ids)
        diff = float(jnp.max(jnp.abs(again.logits - out.logits)))
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        print(f"{name} export: {path} ({size / 1e6:.1f} MB: {', '.join(sorted(os.listdir(path)))}); "
              f"reloaded logits max |diff| = {diff:.3g}")
        if dtype is None and diff != 0.0:
            print("error: the bf16 round trip is not exact", file=sys.stderr)
            return 1
    agree = np.mean(np.argmax(np.asarray(out.logits), -1) == np.argmax(np.asarray(again.logits), -1))
    print(f"fp8 export keeps {agree:.0%} of the greedy next-token choices")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
