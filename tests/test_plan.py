"""The pod planner: topology names, errors, and ahead-of-time compiles of a tiny model for a 4-chip
v5e slice: a training step, a decode / verify step and a prefill chunk with KV caches (needs libtpu;
nothing runs on a TPU)."""

import io
import math
import re

import jax
import numpy as np
import pytest
from flax import nnx

from mimo_jax import plan, sharding
from mimo_jax.config import load_config
from mimo_jax.fp8_resident import Fp8Weight
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
    ("v7x-8", 4, "tpu7x:2x2x1"),  # Ironwood: libtpu spells it tpu7x
    ("tpu7x-16", 8, "tpu7x:2x2x2"),
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

    for name in ("v5p-256", "v5e-128", "v6e-256", "v4-8", "v7x-8"):
        topology = parse_topology(name)
        devices = tpu_topology(topology.name).devices
        # libtpu lists each v4 and v7x TensorCore as a device; v5p's megacore is one device per chip.
        assert len(devices) == topology.chips * (2 if name[:2] in ("v4", "v7") else 1)


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


def test_train_py_compiles_its_own_step_for_a_v5e_slice_and_reports_memory_and_flops(capsys):
    from mimo_jax.training import main as train_main

    assert plan.main(["--config", "tiny", "--topology", "v9-8"]) == 2  # the CLI paths up to the compile
    assert train_main(["--config", "tiny", "--aot", "v9-8"]) == 2
    assert "unknown" in capsys.readouterr().err
    # train.py --aot's step: the run's batch, optimizer and loss, Mosaic kernels (kernel_mode auto).
    cfg = load_config("configs/tiny.yaml", TINY + ["train.batch_size=4", "train.seq_len=256"])
    topology = parse_topology("v5e:2x2")
    result = plan.compile_training_run(cfg, topology)  # one compile, shared with the report
    out = io.StringIO()
    plan.report(result, topology, out)
    text = out.getvalue()
    for field in ("memory/chip", "parameters", "optimizer state", "temporaries (XLA)", "peak total", "FITS",
                  "flops/step", "XLA cost_analysis", "XLA estimate", "step time", "model flops/token (hand)",
                  "traced flops/token", "MFU", "compile time", "largest buffers"):
        assert field in text, field
    assert "fsdp=4" in text and "batch 4 x 256" in text

    assert result.fits and result.error is None
    assert result.params_bytes == _independent_param_bytes(cfg.model, 4)
    # train.py's optimizer (make_optimizer(cfg.train)): AdamW's two moments in the params' dtype, plus
    # two int32 step counts (Adam's and the learning-rate schedule's).
    assert result.opt_bytes == 2 * result.params_bytes + 8
    for value in (result.argument_bytes, result.temp_bytes, result.peak_bytes, result.flops_per_device,
                  result.traced_flops["total"], result.step_seconds):
        assert value > 0
    assert result.argument_bytes >= result.params_bytes + result.opt_bytes  # XLA holds the state too
    # The largest buffers of XLA's assignment, each with the shapes that share it, none above the peak.
    sizes = [size for size, _ in result.largest_buffers]
    assert len(sizes) == 5 and sizes == sorted(sizes, reverse=True) and 0 < sizes[0] <= result.peak_bytes
    assert all(re.search(r"\b(f32|bf16|s32|u32|pred)\[[\d,]*\]", shapes) for _, shapes in result.largest_buffers)
    # XLA counts per device and each scanned layer once; the traced count multiplies the scans out.
    assert result.loop_factor > 1
    assert result.traced_flops["total"] / result.tokens > 0.5 * result.hand["total"]
    assert 0 < plan.mfu(result, topology) < 1


def _independent_cache_bytes(cfg, batch: int, seq_len: int, num_draft: int, batch_split: int, head_split: int) -> int:
    """Per-device KV cache bytes counted from the config alone: global layers hold seq_len slots,
    SWA layers window + 1 + num_draft, the MTP heads window + 2 * num_draft; batch rows split
    `batch_split` ways, kv heads `head_split` ways where that divides them."""
    itemsize = np.dtype(cfg.dtype).itemsize
    rows = batch // batch_split

    def kv(slots, heads):
        return rows * slots * (heads // head_split if heads % head_split == 0 else heads) * \
            (cfg.qk_head_dim + cfg.v_head_dim) * itemsize

    ring = cfg.sliding_window + 1 + num_draft
    total = sum(kv(seq_len, cfg.global_kv_heads) if kind == "global" else kv(ring, cfg.swa_kv_heads)
                for kind in cfg.layer_types)
    total += rows * ring * 4  # int32 slot positions of the SWA rings
    if num_draft:
        mtp_ring = cfg.sliding_window + 2 * num_draft
        total += cfg.num_mtp_heads * kv(mtp_ring, cfg.swa_kv_heads) + rows * mtp_ring * 4
    return total


def test_decode_and_verify_plans_compile_with_a_sharded_kv_cache(capsys):
    # fsdp=2 x tensor=2: 2 sequences split over fsdp; the 2 SWA kv heads over tensor, the 1 global kv head not.
    overrides = TINY + ["mesh.tensor=2"]
    args = ["--config", "configs/tiny.yaml", "--topology", "v5e:2x2", "--mode", "decode", "--seq-len", "2048",
            "--global-batch", "2", *overrides]
    out = io.StringIO()
    assert plan.main(args, out=out) == 0
    text = out.getvalue()
    for field in ("decode step; batch 2 x 1 token", "KV cache", "donated", "throughput:", "tokens/s", "ms per step",
                  "model flops/token (hand)", "traced flops/token", "XLA estimate", "FITS"):
        assert field in text, field
    assert "optimizer state" not in text

    cfg = load_config("configs/tiny.yaml", plan.DEFAULT_OVERRIDES + overrides)
    topology = parse_topology("v5e:2x2")
    result = plan.compile_plan(cfg, topology, "decode", 2048, 2, num_draft=3)
    assert result.fits and result.error is None and result.mesh["tensor"] == 2
    assert result.query_len == 4 and result.tokens == 8
    assert result.cache_bytes == _independent_cache_bytes(cfg.model, 2, 2048, 3, batch_split=2, head_split=2)
    assert result.params_bytes > 0 and result.opt_bytes == 0
    # The cache is an argument, donated: its output aliases it (updated in place, not copied).
    assert result.argument_bytes >= result.params_bytes + result.cache_bytes
    assert result.alias_bytes >= result.cache_bytes
    assert result.traced_flops["total"] > 0 and result.step_seconds > 0
    low, high = result.tokens_per_second
    assert high == pytest.approx(4 * low) and low == pytest.approx(2 / result.step_seconds)
    assert any("drafting passes are not compiled" in note for note in result.notes)
    text = io.StringIO()
    plan.report(result, topology, text)
    assert "verify step (3 drafts + 1)" in text.getvalue() and "1 to 4 tokens per verify step" in text.getvalue()


def test_decode_program_slices_each_layer_from_the_stacked_weights():
    """A cached call reads layer [p, j] of each stacked parameter where it runs: the compiled decode
    step (FP8-resident: e4m3 values and their scales) holds no copy of a period's stacked expert
    weights, nor of one layer's: the Pallas grouped matmul reads layer [p, j] of the stacks in place.
    Scanning over the stacks made XLA copy every period's [layers, experts, ...] block (here 28 such
    arrays; 10 with bf16 weights; for the release on v5p, 7.5 GiB per chip per step), and slicing a
    layer before the kernel copied that layer's experts (1/run length of that)."""
    cfg = load_config("configs/tiny.yaml", plan.DEFAULT_OVERRIDES + [
        "model.num_layers=7", "model.layer_types=[global, swa, swa, global, swa, swa, global]",
        "model.mlp_types=[dense, moe, moe, moe, moe, moe, moe]", "mesh.fsdp=1", "mesh.expert=2", "mesh.tensor=2",
        "model.param_dtype=bfloat16", "model.dtype=bfloat16",
        "model.moe_intermediate_size=512"])  # whole 128-row FP8 blocks of w_down on each tensor shard, as in the release
    mesh = plan.build_mesh(cfg, parse_topology("v5e:2x2"))
    step, args, _ = plan.build_step(cfg, mesh, "decode", 2, 1024, 1, weights="fp8")
    hlo_type = {"float8_e4m3fn": "f8e4m3fn", "float32": "f32", "bfloat16": "bf16"}
    period_blocks, layer_blocks = set(), set()  # (type, per-device [run length, experts, ...] / [experts, ...])
    for path, var in nnx.to_flat_state(args[0]):
        if path[-1] in ("w_gate", "w_up", "w_down"):
            for leaf in jax.tree.leaves(var.get_value()):
                shard = leaf.sharding.shard_shape(leaf.shape)
                if shard[1] > 1:
                    period_blocks.add((hlo_type[leaf.dtype.name], shard[1:]))
                layer_blocks.add((hlo_type[leaf.dtype.name], shard[2:]))
    assert len(period_blocks) == len(layer_blocks) == 4  # gate/up vs down layouts, values and scales
    text = step.lower(*args).compile().as_text()
    arrays = [(kind, tuple(int(d) for d in dims.split(",") if d))
              for kind, dims in re.findall(r"= (\w+)\[([\d,]*)\]", text)]
    copies = [a for a in arrays if a in period_blocks]
    assert not copies, f"{len(copies)} arrays of a period's stacked expert weights: {copies[:4]}"
    slices = [a for a in arrays if a in layer_blocks]
    assert not slices, f"{len(slices)} arrays of one layer's expert weights sliced from their stacks: {slices[:4]}"


def test_drafting_passes_plan_with_fp8_resident_weights():
    """--mode draft compiles inference.draft (the MTP heads' passes of a speculative round) with
    FP8-resident weights; FP8 holds the quantised weights in about half their bf16 bytes per chip."""
    overrides = ["model.num_layers=2", "model.layer_types=[global, swa]", "model.mlp_types=[dense, moe]",
                 "model.param_dtype=bfloat16"]
    out = io.StringIO()
    assert plan.main(["--config", "configs/tiny.yaml", "--topology", "v5e:2x2", "--mode", "draft", "--num-draft", "3",
                      "--seq-len", "1024", "--global-batch", "4", "--weights", "fp8", *overrides], out=out) == 0
    text = out.getvalue()
    assert "drafting passes; batch 4, 3 MTP heads x 6 positions each" in text and "FP8-resident" in text
    assert re.search(r"drafting: +[\d.]+ ms for the 3 drafts", text)

    cfg = load_config("configs/tiny.yaml", plan.DEFAULT_OVERRIDES + TINY + ["model.param_dtype=bfloat16"])
    mesh = plan.build_mesh(cfg, parse_topology("v5e:2x2"))
    states = {w: dict(nnx.to_flat_state(plan.abstract_state(cfg.model, "decode", w)[1])) for w in (None, "fp8")}
    quantised = [path for path, var in states["fp8"].items() if isinstance(var.get_value(), Fp8Weight)]
    assert {path[-1] for path in quantised} == {"q", "k", "v", "gate", "up", "down", "w_gate", "w_up", "w_down"}
    held = {}
    for w, state in states.items():
        part = nnx.from_flat_state([(path, state[path]) for path in quantised])
        held[w] = plan.bytes_per_device(part, sharding.state_shardings(part, mesh, cfg.sharding))
    # 1 byte + a 4-byte scale per 128 inputs, against 2 bytes. The tiny model's 64-wide expert inputs
    # and its one-block scale rows, which fsdp cannot split, cost the scales more than the release's 1/64.
    assert 0.5 < held["fp8"] / held[None] < 0.6, held


def test_chunked_prefill_plan_compiles_the_last_chunk_into_the_cache():
    cfg = load_config("configs/tiny.yaml", plan.DEFAULT_OVERRIDES + TINY)
    topology = parse_topology("v5e:2x2")
    result = plan.compile_plan(cfg, topology, "prefill", 512, 1, prefill_chunk=128)
    assert result.fits and result.opt_bytes == 0
    assert result.query_len == 128 and result.tokens == 128
    assert any("replicated" in note for note in result.notes)  # one sequence over 4 batch shards
    # One sequence does not split over the batch shards: every device holds its whole cache.
    assert result.cache_bytes == _independent_cache_bytes(cfg.model, 1, 512, 0, batch_split=1, head_split=1)
    assert result.alias_bytes >= result.cache_bytes
    assert result.hand == plan.hand_flops_per_token(cfg.model, 512, "prefill", 128)
    out = io.StringIO()
    plan.report(result, topology, out)
    text = out.getvalue()
    assert "prefill chunk; batch 1 x 128 tokens (positions 384..511" in text
    assert "512-token prompt takes <= 4 chunks" in text


def test_inference_cli_errors(capsys):
    base = ["--config", "tiny", "--topology", "v5e:2x2", "--seq-len", "256"]
    assert plan.main(base + ["--num-draft", "2"]) == 2
    assert "verify step (--mode decode) or its drafts (--mode draft)" in capsys.readouterr().err
    assert plan.main(base + ["--mode", "draft"]) == 2
    assert "--mode draft needs --num-draft in 1..3" in capsys.readouterr().err
    assert plan.main(base + ["--mode", "train", "--weights", "fp8"]) == 2
    assert "FP8-resident weights (--weights fp8) are for inference" in capsys.readouterr().err
    assert plan.main(base + ["--mode", "decode", "--num-draft", "4"]) == 2
    assert "--num-draft must be in 0..3" in capsys.readouterr().err
    assert plan.main(base + ["--mode", "prefill", "--prefill-chunk", "512"]) == 2
    assert "--prefill-chunk 512 must be in 1..--seq-len (256)" in capsys.readouterr().err
    assert plan.main(base + ["--mode", "decode", "--prefill-chunk", "64"]) == 2
    assert "--prefill-chunk needs --mode prefill" in capsys.readouterr().err


def test_search_finds_a_fitting_plan_within_its_compile_budget():
    out = io.StringIO()
    # Two layers, one of each kind, and one expert: the search logic depends on neither the depth nor
    # expert parallelism (whose dropless ragged all-to-all took 2.5x as long to compile for v5e).
    rc = plan.main(["--config", "configs/tiny.yaml", "--topology", "v5e:2x2", "--seq-len", "256", "--search",
                    "--max-compiles", "1", "model.num_layers=2", "model.layer_types=[global, swa]",
                    "model.mlp_types=[dense, moe]", "mesh.fsdp=-1", "model.num_experts=1",
                    "model.num_experts_per_token=1"], out=out)
    text = out.getvalue()
    assert rc == 0, text
    assert "| mesh (data,fsdp,expert,tensor) |" in text and "best found:" in text
    rows = [line for line in text.splitlines() if re.match(r"\| \d+,\d+,\d+,\d+ \|", line)]
    assert len(rows) == 1 and "| yes |" in rows[-1]


def test_search_plans_decoding_a_single_sequence():
    # One sequence on 4 devices: replicated over the batch shards, which inference accepts.
    out = io.StringIO()
    rc = plan.main(["--config", "configs/tiny.yaml", "--topology", "v5e:2x2", "--mode", "decode", "--seq-len", "1024",
                    "--global-batch", "1", "--search", "--max-compiles", "1", *TINY], out=out)
    text = out.getvalue()
    assert rc == 0, text
    rows = [line for line in text.splitlines() if re.match(r"\| \d+,\d+,\d+,\d+ \|", line)]
    assert len(rows) == 1 and "| yes |" in rows[0]
    assert "best found:" in text and "decode step; batch 1 x 1 token" in text and "tokens/s" in text


def test_candidate_meshes_cover_the_chips_and_respect_the_expert_and_tensor_limits():
    meshes = plan.candidate_meshes(128, 256)
    assert all(math.prod(m.values()) == 128 for m in meshes)
    assert all(256 % m["expert"] == 0 and m["tensor"] in (1, 2, 4, 8) for m in meshes)
    assert meshes[0]["data"] == 1 and meshes[0]["tensor"] == 1
    assert len({tuple(m.values()) for m in meshes}) == len(meshes)
    # Inference: no fsdp (it would gather every weight each step), the widest tensor axis first.
    inference = plan.candidate_meshes(64, 256, "decode")
    assert sorted(map(str, inference)) == sorted(map(str, plan.candidate_meshes(64, 256)))
    assert inference[0] == {"data": 1, "fsdp": 1, "expert": 8, "tensor": 8}
    assert [m["fsdp"] for m in inference[:4]] == [1, 1, 1, 1]


def test_cache_shardings_follow_the_cache_rules():
    from jax.sharding import PartitionSpec as P

    cfg = load_config("configs/tiny.yaml", plan.DEFAULT_OVERRIDES + TINY + ["mesh.tensor=2", "sharding.cache_seq=[fsdp]"])
    mesh = plan.build_mesh(cfg, parse_topology("v5e:2x2"))  # fsdp=2 x tensor=2
    cache = plan.abstract_cache(cfg.model, 1, 1024, num_draft=2)
    shardings = plan.cache_shardings(cache, mesh, cfg.sharding)
    # [repeats, length, B, S, K, D]: one row cannot split over fsdp, so the sequence does; 1 global kv head stays whole.
    assert shardings.layers["0/0"].k.spec == P(None, None, None, "fsdp")
    swa = [key for key, kv in cache.layers.items() if kv.k.shape[3] != 1024]
    assert swa and shardings.layers[swa[0]].k.spec == P(None, None, None, None, "tensor")  # a 35-slot ring
    # The MTP heads' [heads, B, 36 slots, K, D] rings split their slots too (36 divides over fsdp); positions by batch.
    assert shardings.mtp.k.spec == P(None, None, "fsdp", "tensor") and shardings.ring_positions.spec == P()
    assert plan.bytes_per_device(cache, shardings) < plan.bytes_per_device(cache, jax.tree.map(
        lambda s: jax.sharding.NamedSharding(mesh, P()), shardings))


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
    # The last 8192-token chunk of a 256k prompt: its queries see 262144 - 8191/2 global keys on average.
    chunk = plan.hand_flops_per_token(cfg, 262144, "prefill", 8192)
    assert chunk["attention_flops"] == 2 * 64 * 320 * (9 * 262144 + 39 * 129)
    assert chunk["attention_flops_causal"] == 2 * 64 * 320 * (9 * (262144 - 8191 / 2) + 39 * 129)


def _tiny_active_params(cfg) -> int:
    """Active parameters of a token, counted by hand from the config: every main-model weight but
    the input embedding and the experts a token skips (routers and their biases count)."""
    d, h, dqk, dv = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
    total = d * cfg.vocab_size + d  # lm_head, final norm
    for kind, mlp in zip(cfg.layer_types, cfg.mlp_types):
        kv = cfg.global_kv_heads if kind == "global" else cfg.swa_kv_heads
        total += 2 * d + d * h * dqk + d * kv * (dqk + dv) + h * dv * d  # norms, q, k, v, o
        total += h if kind == "swa" else 0  # attention sinks (SWA layers only in tiny.yaml)
        if mlp == "dense":
            total += 3 * d * cfg.intermediate_size
        else:
            total += d * cfg.num_experts + cfg.num_experts  # router, bias
            total += cfg.num_experts_per_token * 3 * d * cfg.moe_intermediate_size
    return total


def test_hand_flops_for_decoding_by_hand_on_the_tiny_config():
    cfg = load_config("configs/tiny.yaml").model
    # tiny.yaml: 8 layers, 3 global (kv 1) and 5 SWA (window 32); 4 heads of q/k 96, v 64; 16 experts, 4 active.
    assert cfg.layer_types.count("global") == 3 and cfg.sliding_window == 32
    active = _tiny_active_params(cfg)
    from mimo_jax.params import count_params

    assert active == count_params(cfg)["active"]
    decode = plan.hand_flops_per_token(cfg, 1000, "decode", 1)
    # Every decoded token needs its logits: 2 x all active params, lm_head included.
    assert decode["weight_flops"] == 2 * active
    # One query: 1000 keys in each global layer, 33 (window + itself) in each SWA layer; 2 * 4 * (96 + 64) per key.
    assert decode["attention_flops"] == 2 * 4 * 160 * (3 * 1000 + 5 * 33)
    assert decode["attention_flops_causal"] == decode["attention_flops"]
    assert decode["total"] == 2 * active + 2 * 4 * 160 * (3 * 1000 + 5 * 33)
    # A verify step of 4 tokens at positions 996..999 sees 997..1000 keys: 998.5 on average.
    verify = plan.hand_flops_per_token(cfg, 1000, "decode", 4)
    assert verify["attention_flops"] == decode["attention_flops"]
    assert verify["attention_flops_causal"] == 2 * 4 * 160 * (3 * 998.5 + 5 * 33)
    # A prefill skips the lm_head (logits at the last position only).
    assert plan.hand_flops_per_token(cfg, 1000, "prefill", 100)["weight_flops"] == 2 * (active - 128 * 512)
