"""The pod planner: topology names, errors, and ahead-of-time compiles of a tiny model for a 4-chip
v5e slice (needs libtpu; nothing runs on a TPU)."""

import io
import math
import re

import numpy as np
import pytest
from flax import nnx

from mimo_jax import plan
from mimo_jax.config import load_config
from mimo_jax.plan import PlanError, parse_topology

pytest.importorskip("libtpu", reason="ahead-of-time TPU compiles need libtpu")

# tiny.yaml at half its depth: the same layer kinds (global + SWA, dense + MoE, MTP), faster to compile.
TINY = ["model.num_layers=4", "model.layer_types=[global, swa, swa, global]", "model.mlp_types=[dense, moe, moe, moe]",
        "mesh.fsdp=-1"]


@pytest.mark.parametrize("name, chips, libtpu_name", [
    ("v5p-256", 128, "v5p:4x4x8"),
    ("v5p-8", 4, "v5p:2x2x1"),
    ("v5p-1024", 512, "v5p:8x8x8"),
    ("v5e-256", 256, "v5e:16x16"),
    ("v5e-128", 128, "v5e:8x16"),
    ("v5litepod-16", 16, "v5e:4x4"),
    ("v6e-64", 64, "v6e:8x8"),
    ("v4-8", 4, "v4:2x2x1"),
    ("v5p:4x4x8", 128, "v5p:4x4x8"),
    ("V5E:2x2", 4, "v5e:2x2"),
])
def test_topology_names(name, chips, libtpu_name):
    topology = parse_topology(name)
    assert topology.chips == chips
    assert topology.name == libtpu_name


@pytest.mark.parametrize("name, message", [
    ("v9z-8", "unknown TPU generation 'v9z'"),
    ("v5p-6", "count TensorCores"),
    ("v5e-512", "no slice of 512"),
    ("v5e:4x4x4", "2 dimensions"),
    ("tpu", "not of the form"),
])
def test_topology_errors_name_the_problem_and_list_known_slices(name, message):
    with pytest.raises(PlanError, match=re.escape(message)) as info:
        parse_topology(name)
    if "generation" in message or "form" in message:
        assert "v5p-256" in str(info.value) and "v5e-256" in str(info.value)


def test_known_slice_names_parse_to_libtpu_topologies():
    from kernels_pallas.tpu_aot import tpu_topology

    for name in ("v5p-256", "v5e-128", "v6e-256", "v4-8"):
        topology = parse_topology(name)
        devices = tpu_topology(topology.name).devices
        # libtpu lists each v4 TensorCore as a device; v5p's megacore is one device per chip.
        assert len(devices) == topology.chips * (2 if name.startswith("v4") else 1)


def test_cli_errors(capsys):
    assert plan.main(["--config", "tiny", "--topology", "v7q-8"]) == 2
    assert "unknown TPU generation" in capsys.readouterr().err
    assert plan.main(["--config", "tiny", "--topology", "v5e:2x2", "mesh.fsdp=3"]) == 2
    err = capsys.readouterr().err
    assert "mesh" in err and "4 devices" in err
    assert plan.main(["--config", "tiny", "--topology", "v5e:2x2", "mesh.fsdp=1", "mesh.expert=-1",
                      "model.num_experts=6", "model.num_experts_per_token=2"]) == 2
    assert "does not divide 6 experts" in capsys.readouterr().err


def _independent_param_bytes(cfg, fsdp: int) -> int:
    """Parameter bytes per chip with the default rules on a pure fsdp mesh, counted without the
    sharding module: a dimension tagged "embed" splits fsdp ways when it divides, nothing else does."""
    model = nnx.eval_shape(lambda: plan_model(cfg))
    total = 0
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape, axes = var.get_value().shape, var.get_metadata()["logical_axes"]
        size = math.prod(shape) * np.dtype(var.get_value().dtype).itemsize
        if "embed" in axes and shape[axes.index("embed")] % fsdp == 0:
            size //= fsdp
        total += size
    return total


def plan_model(cfg):
    from mimo_jax.model import MiMoV2Flash

    return MiMoV2Flash(cfg, rngs=nnx.Rngs(0))


def test_plan_compiles_a_tiny_model_for_a_v5e_slice_and_reports_memory_and_flops(capsys):
    assert plan.main(["--config", "tiny", "--topology", "v9-8"]) == 2  # the CLI path up to the compile
    capsys.readouterr()
    cfg = load_config("configs/tiny.yaml", plan.DEFAULT_OVERRIDES + TINY)
    topology = parse_topology("v5e:2x2")
    result = plan.compile_plan(cfg, topology, "train", 256, None)  # one compile, shared with the report
    out = io.StringIO()
    plan.report(result, topology, out)
    text = out.getvalue()
    for field in ("memory/chip", "parameters", "optimizer state", "temporaries (XLA)", "peak total", "FITS",
                  "flops/step", "XLA cost_analysis", "XLA estimate", "step time", "model flops/token (hand)",
                  "traced flops/token", "MFU", "compile time"):
        assert field in text, field
    assert "fsdp=4" in text and "batch 4 x 256" in text

    assert result.fits and result.error is None
    assert result.params_bytes == _independent_param_bytes(cfg.model, 4)
    # AdamW's two moments in the params' dtype, plus its int32 step count.
    assert result.opt_bytes == 2 * result.params_bytes + 4
    for value in (result.argument_bytes, result.temp_bytes, result.peak_bytes, result.flops_per_device,
                  result.traced_flops["total"], result.step_seconds):
        assert value > 0
    assert result.argument_bytes >= result.params_bytes + result.opt_bytes  # XLA holds the state too
    # XLA counts per device and each scanned layer once; the traced count multiplies the scans out.
    assert result.loop_factor > 1
    assert result.traced_flops["total"] / result.tokens > 0.5 * result.hand["total"]
    assert 0 < plan.mfu(result, topology) < 1


def test_prefill_plan_says_decode_is_not_planned():
    cfg = load_config("configs/tiny.yaml", plan.DEFAULT_OVERRIDES + TINY)
    result = plan.compile_plan(cfg, parse_topology("v5e:2x2"), "prefill", 512, 1)
    assert result.fits and result.opt_bytes == 0
    assert any("decode" in note for note in result.notes)
    assert any("replicated" in note for note in result.notes)  # one sequence over 4 batch shards


def test_search_finds_a_fitting_plan_within_a_few_compiles():
    out = io.StringIO()
    rc = plan.main(["--config", "configs/tiny.yaml", "--topology", "v5e:2x2", "--seq-len", "256", "--search",
                    "--max-compiles", "2", *TINY], out=out)
    text = out.getvalue()
    assert rc == 0, text
    assert "| mesh (data,fsdp,expert,tensor) |" in text and "best found:" in text
    rows = [line for line in text.splitlines() if re.match(r"\| \d+,\d+,\d+,\d+ \|", line)]
    assert 1 <= len(rows) <= 2 and "| yes |" in rows[-1]


def test_candidate_meshes_cover_the_chips_and_respect_the_expert_and_tensor_limits():
    meshes = plan.candidate_meshes(128, 256)
    assert all(math.prod(m.values()) == 128 for m in meshes)
    assert all(256 % m["expert"] == 0 and m["tensor"] in (1, 2, 4, 8) for m in meshes)
    assert meshes[0]["data"] == 1 and meshes[0]["tensor"] == 1
    assert len({tuple(m.values()) for m in meshes}) == len(meshes)


def test_hand_flops_formula():
    cfg = load_config("mimo_v2_flash").model
    hand = plan.hand_flops_per_token(cfg, 32768, "train")
    from mimo_jax.params import count_params

    counts = count_params(cfg)
    lm_head = cfg.hidden_size * cfg.vocab_size
    assert hand["weight_flops"] == 6 * (counts["active"] + counts["mtp"] + 3 * lm_head)
    # 9 global layers see 32768 keys, 39 SWA layers and 3 MTP heads 129; 6 * 64 heads * (192 + 128) per key.
    assert hand["attention_flops"] == 6 * 64 * 320 * (9 * 32768 + 42 * 129)
    prefill = plan.hand_flops_per_token(cfg, 32768, "prefill")
    assert prefill["weight_flops"] == 2 * (counts["active"] - lm_head)
