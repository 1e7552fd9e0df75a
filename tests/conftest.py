import os

import pytest

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")


@pytest.fixture
def small_overrides():
    """A model smaller than tiny.yaml (fast to build) with every layer kind and 3 MTP heads."""
    return [
        "model.vocab_size=96", "model.hidden_size=32", "model.num_layers=4",
        "model.layer_types=[global, swa, swa, global]", "model.mlp_types=[dense, moe, moe, moe]",
        "model.qk_head_dim=24", "model.v_head_dim=16", "model.intermediate_size=48",
        "model.moe_intermediate_size=16", "model.num_experts=6", "model.num_experts_per_token=2",
        "model.sliding_window=3", "model.initializer_range=0.2",
    ]
