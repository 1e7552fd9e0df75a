import atexit
import os
import shutil
import tempfile

import jax
import orbax.checkpoint as ocp
import pytest
import yaml
from flax import nnx

from mimo_jax.config import to_dict

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")

# One persistent compilation cache for the test run (and the train.py processes tests/test_training.py
# starts): a program that several tests compile anew (each train() call, each model built after the
# per-module jax.clear_caches()) is compiled once. It lives in a temp directory, so runs do not share it.
# (`from tests.conftest import ...` may import this file a second time: it finds the same directory.)
COMPILE_CACHE_DIR = os.environ.get("MIMO_JAX_TESTS_COMPILE_CACHE")
if not COMPILE_CACHE_DIR:
    COMPILE_CACHE_DIR = os.environ["MIMO_JAX_TESTS_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="mimo_jax_tests_jax_cache_")
    atexit.register(shutil.rmtree, COMPILE_CACHE_DIR, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE_DIR)


# A model smaller than tiny.yaml (fast to build) with every layer kind and 3 MTP heads.
SMALL_OVERRIDES = (
    "model.vocab_size=96", "model.hidden_size=32", "model.num_layers=4",
    "model.layer_types=[global, swa, swa, global]", "model.mlp_types=[dense, moe, moe, moe]",
    "model.qk_head_dim=24", "model.v_head_dim=16", "model.intermediate_size=48",
    "model.moe_intermediate_size=16", "model.num_experts=6", "model.num_experts_per_token=2",
    "model.sliding_window=3", "model.initializer_range=0.2",
)


@pytest.fixture
def small_overrides():
    """SMALL_OVERRIDES, as a list a test may extend."""
    return list(SMALL_OVERRIDES)


def write_workdir(path, cfg, model) -> None:
    """A train.py workdir of `model`: config.yaml and one checkpoint laid out as checkpoint.save_state
    writes them, without optimizer and data state, which the loaders do not read (running train.py
    would spend ~25 s compiling a train step)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.yaml"), "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(path), "checkpoints"))
    manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params, "rest": rest}),
                                            config=ocp.args.JsonSave(to_dict(cfg))))
    manager.wait_until_finished()
    manager.close()
