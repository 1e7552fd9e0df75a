#!/usr/bin/env python
"""Generate the golden parity fixtures for mimo-jax from HF transformers' MiMo-V2-Flash port.

Run from the repository root with the reference venv (torch CPU + transformers >= 5.24):

    /work/venv/bin/python tests/golden/generate.py

It deletes and rewrites these folders under tests/golden/ (and nothing else):

    hybrid_a/  7-layer hybrid GA/SWA + dense/MoE model, saved with save_pretrained (hub naming, one file)
    pattern_b/ other layer pattern, group-limited routing, scaling knobs, sharded save_pretrained
    fused_c/   the hybrid_a weights in transformers' native (fused-expert) state_dict layout
    fp8_d/     block-FP8 (e4m3, 128x128) hub-style checkpoint incl. the GA K/V fused-scale layout (spec 2.3);
               unquantised tensors BF16 (router, correction bias, sinks F32)

Every folder holds only a loadable checkpoint (config.json + *.safetensors [+ index]; generation_config.json
is deleted) and golden.npz with
`input_ids` int32 [2, 24] and `logits` float32 [2, 24, vocab] from transformers' eager fp32 forward
(no attention_mask, i.e. plain causal). Never hand-edit the fixtures; rerun this script.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import sys
import tempfile

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH, SEQ = 2, 24
FP8_BLOCK = 128
MAX_TOTAL_BYTES = 4 * 2**20  # all four folders together (asserted at the end)
FP8_MAX = 448.0  # largest finite float8_e4m3fn

COMMON = dict(attn_implementation="eager", experts_implementation="eager")

HYBRID_A = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=7,  # default layer_types rule -> full at 0 and 5
    num_attention_heads=4,
    num_key_value_heads=1,  # SWA layers get 2 (hard-coded 2x in HF-TF)
    head_dim=48,  # rotary dim = int(48 * 0.334) = 16
    v_head_dim=32,
    intermediate_size=64,
    moe_intermediate_size=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    sliding_window=5,  # HF semantics: key j visible iff i-5 < j <= i (4 previous keys + the query)
    n_group=1,
    topk_group=1,
)

PATTERN_B = dict(
    HYBRID_A,
    num_hidden_layers=5,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"],
    mlp_layer_types=["sparse", "dense", "sparse", "sparse", "sparse"],
    n_routed_experts=8,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=3,
    routed_scaling_factor=2.5,
    attention_value_scale=0.5,
    sliding_window=7,
)
PATTERN_B_SHARD = "200KB"  # ~0.55 MB of fp32 weights -> 2-5 shards (asserted)

FP8_D = dict(
    vocab_size=128,
    hidden_size=192,  # 2 column blocks, the second one partial (64)
    num_hidden_layers=2,  # one GA + one SWA layer: a 3rd layer does not fit the fixtures' 4 MiB size budget
    layer_types=["full_attention", "sliding_attention"],
    mlp_layer_types=["dense", "sparse"],
    num_attention_heads=4,
    num_key_value_heads=2,  # SWA: 4
    head_dim=192,
    v_head_dim=128,
    intermediate_size=128,  # dense down_proj [192, 128]: partial row block
    moe_intermediate_size=64,  # expert gate/up [64, 192], down [192, 64]: a dim smaller than one block
    n_routed_experts=4,
    num_experts_per_tok=2,
    sliding_window=5,
    n_group=1,
    topk_group=1,
)
FP8_K_MULT = 8.0  # GA k_proj is multiplied by this before quantisation (K and V blocks get very different scales)
# Unquantised tensors are stored like the real release: BF16, except these (kept F32)
FP8_F32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias", "self_attn.attention_sink_bias")


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(kwargs: dict) -> MiMoV2FlashForCausalLM:
    cfg = MiMoV2FlashConfig(**kwargs, **COMMON)
    model = MiMoV2FlashForCausalLM(cfg).to(torch.float32).eval()
    assert model.config._attn_implementation == "eager", model.config._attn_implementation
    return model


@torch.no_grad()
def reinit_(model: MiMoV2FlashForCausalLM) -> None:
    """Give every persistent parameter/buffer a non-trivial value (HF's own init leaves sinks ~0,
    e_score_correction_bias == 0 and norms == 1, which would hide bugs).

    Linear-type weights use N(0, 1/fan_in) so activations stay O(1): with std 0.02 the attention
    scores are ~0.03, softmax is almost uniform and RoPE / window / sink bugs barely move the logits.
    """
    for name, t in model.state_dict(keep_vars=True).items():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            t.copy_(1.0 + 0.1 * torch.randn_like(t))
        elif name == "model.embed_tokens.weight":
            t.normal_(0.0, 1.0)
        elif name.endswith("mlp.gate.weight"):  # router [E, H], fp32
            t.normal_(0.0, 0.5)
        elif name.endswith("mlp.gate.e_score_correction_bias"):
            t.normal_(0.0, 0.1)
        elif name.endswith("self_attn.sinks"):
            t.normal_(0.0, 1.0)
        elif name.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H]
            t.normal_(0.0, 1.0 / math.sqrt(t.shape[-1]))
        elif name.endswith("mlp.experts.down_proj"):  # [E, H, I]
            t.normal_(0.0, 1.0 / math.sqrt(t.shape[-1]))
        elif name.endswith(".weight") and t.ndim == 2:  # nn.Linear [out, in] (q/k/v/o, dense mlp, lm_head)
            t.normal_(0.0, 1.0 / math.sqrt(t.shape[1]))
        else:
            raise RuntimeError(f"reinit_: no rule for {name} {tuple(t.shape)}")


def make_input_ids(vocab: int, seed: int) -> np.ndarray:
    rng = np.random.RandomState(seed)
    return rng.randint(0, vocab, size=(BATCH, SEQ)).astype(np.int32)


@torch.no_grad()
def forward_logits(model: MiMoV2FlashForCausalLM, input_ids: np.ndarray) -> np.ndarray:
    ids = torch.from_numpy(input_ids.astype(np.int64))
    out = model(input_ids=ids, use_cache=False)  # no attention_mask -> plain causal (+ window on SWA layers)
    return out.logits.detach().to(torch.float32).numpy()


def load_and_check(path: str, input_ids: np.ndarray, logits: np.ndarray, what: str, atol: float = 0.0) -> None:
    """Load `path` back through transformers and check the logits."""
    model, info = MiMoV2FlashForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True, **COMMON
    )
    model.eval()
    # safetensors hands back (mmap-backed) tensors at arbitrary byte offsets; the CPU matmul kernels pick
    # alignment-dependent code paths, which can change the last bit of the logits (seen on fused_c: 2.4e-7).
    # Re-home every tensor in freshly allocated (aligned) memory so the bit-exact comparison tests the values.
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.data = t.data.clone()
    bad = {k: v for k, v in info.items() if v}  # missing / unexpected / mismatched keys, error messages
    if bad:
        raise RuntimeError(f"{what}: loading info not clean: {bad}")
    got = forward_logits(model, input_ids)
    err = float(np.abs(got - logits).max())
    if err > atol:
        raise RuntimeError(f"{what}: reloaded logits differ by {err}")
    print(f"  reload check {what}: max|dlogits| = {err:.3g}")


def save_golden(folder: str, input_ids: np.ndarray, logits: np.ndarray, **extra: np.ndarray) -> None:
    np.savez(os.path.join(folder, "golden.npz"), input_ids=input_ids, logits=logits, **extra)


def save_hf(model: MiMoV2FlashForCausalLM, folder: str, **kwargs) -> None:
    """save_pretrained without the generation_config.json it writes (the fixtures hold only the checkpoint)."""
    model.save_pretrained(folder, **kwargs)
    gen_cfg = os.path.join(folder, "generation_config.json")
    if os.path.exists(gen_cfg):
        os.remove(gen_cfg)


def check_folder_files(folder: str, sharded: bool = False) -> None:
    """Only config.json, the safetensors file(s) (+ index when sharded) and golden.npz."""
    files = set(os.listdir(folder))
    st = {f for f in files if f.endswith(".safetensors")}
    expected = {"config.json", "golden.npz"} | st
    if sharded:
        expected.add("model.safetensors.index.json")
    else:
        assert st == {"model.safetensors"}, sorted(files)
    assert files == expected, sorted(files)


def fresh_dir(name: str) -> str:
    folder = os.path.join(HERE, name)
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    return folder


def safetensors_names(folder: str) -> dict:
    out = {}
    for fn in sorted(os.listdir(folder)):
        if fn.endswith(".safetensors"):
            with safe_open(os.path.join(folder, fn), "pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    out[k] = (fn, tuple(sl.get_shape()), sl.get_dtype())
    return out


# ----------------------------------------------------------------------------------------------------------------
# sensitivity: every feature must move the logits (guards against a fixture that cannot catch a bug)
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sensitivity(model: MiMoV2FlashForCausalLM, input_ids: np.ndarray, logits: np.ndarray, label: str) -> None:
    cfg = model.config
    has = lambda t: t in cfg.layer_types  # noqa: E731
    sparse = "sparse" in cfg.mlp_layer_types

    def layers(m):
        return m.model.layers

    probes = {}

    def probe(desc):
        def deco(fn):
            probes[desc] = fn
            return fn

        return deco

    if has("sliding_attention"):

        @probe("sinks -> 0")
        def _(m):
            for lyr in layers(m):
                if lyr.self_attn.sinks is not None:
                    lyr.self_attn.sinks.zero_()

        @probe("sliding_window + 1")
        def _(m):
            m.config.sliding_window = cfg.sliding_window + 1

        @probe("sliding_window - 1")
        def _(m):
            m.config.sliding_window = cfg.sliding_window - 1

        @probe("no sliding window (SWA layers attend fully)")
        def _(m):
            m.config.sliding_window = 10**6

    if has("sliding_attention") and has("full_attention"):

        @probe("GA layers use SWA rope theta")
        def _(m):
            re = m.model.rotary_emb
            re.full_attention_inv_freq.copy_(re.sliding_attention_inv_freq)

    @probe("no rope at all")
    def _(m):
        re = m.model.rotary_emb
        for lt in re.layer_types:
            getattr(re, f"{lt}_inv_freq").zero_()

    @probe("attention_value_scale -> 1.0")
    def _(m):
        for lyr in layers(m):
            lyr.self_attn.v_scale = 1.0

    if sparse:

        @probe("e_score_correction_bias -> 0")
        def _(m):
            for lyr in layers(m):
                if hasattr(lyr.mlp, "gate"):
                    lyr.mlp.gate.e_score_correction_bias.zero_()

        @probe("routed_scaling_factor -> 1.0" if cfg.routed_scaling_factor != 1.0 else "routed_scaling_factor -> 2.0")
        def _(m):
            for lyr in layers(m):
                if hasattr(lyr.mlp, "gate"):
                    lyr.mlp.gate.routed_scaling_factor = 1.0 if cfg.routed_scaling_factor != 1.0 else 2.0

        @probe("norm_topk_prob -> False")
        def _(m):
            for lyr in layers(m):
                if hasattr(lyr.mlp, "gate"):
                    lyr.mlp.gate.norm_topk_prob = False

        if cfg.n_group > 1:

            @probe("no group limiting (n_group=topk_group=1)")
            def _(m):
                for lyr in layers(m):
                    if hasattr(lyr.mlp, "gate"):
                        lyr.mlp.gate.num_group = 1
                        lyr.mlp.gate.topk_group = 1

    print(f"  sensitivity ({label}): max|dlogits| vs golden (golden max|logit| = {np.abs(logits).max():.3g})")
    for desc, fn in probes.items():
        m = copy.deepcopy(model)
        fn(m)
        d = float(np.abs(forward_logits(m, input_ids) - logits).max())
        print(f"    {desc:48s} {d:10.4g}")
        if d < 1e-2:
            raise RuntimeError(f"{label}: feature '{desc}' barely changes the logits ({d})")


# ----------------------------------------------------------------------------------------------------------------
# FP8 block quantisation (spec section 2 / 2.3)
# ----------------------------------------------------------------------------------------------------------------


def quant_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform 128x128 block quantisation. Returns (fp8 [out, in], scale_inv f32 [ceil(out/128), ceil(in/128)])."""
    w = w.to(torch.float32)
    rows, cols = w.shape
    nr, nc = math.ceil(rows / FP8_BLOCK), math.ceil(cols / FP8_BLOCK)
    padded = torch.zeros(nr * FP8_BLOCK, nc * FP8_BLOCK, dtype=torch.float32)
    padded[:rows, :cols] = w
    blocks = padded.view(nr, FP8_BLOCK, nc, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))  # [nr, nc]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(torch.float32)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    q = q.view(nr * FP8_BLOCK, nc * FP8_BLOCK)[:rows, :cols].contiguous()
    return q, scale


def dequant_blocks(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Uniform block dequantisation W = fp8 * scale_inv[r // 128, c // 128]."""
    rows, cols = q.shape
    s = scale.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:rows, :cols]
    return q.to(torch.float32) * s


def quant_ga_kv(k: torch.Tensor, v: torch.Tensor, n_kv: int, head_dim: int, v_head_dim: int):
    """Spec 2.3: per kv head h, F_h = [K_h (head_dim rows); V_h (v_head_dim rows)] padded to a multiple of 128,
    uniform 128x128 blocks over F_h. The row blocks that start inside K_h go to k scale rows, the others to v.
    """
    fused_rows = head_dim + v_head_dim
    nblk = math.ceil(fused_rows / FP8_BLOCK)
    nk = math.ceil(head_dim / FP8_BLOCK)  # blocks starting inside K_h
    nv = nblk - nk
    assert (nk, nv) == (2, 1), (nk, nv)  # the layout the brief/spec describe for 192 + 128
    kq, vq, ks, vs = [], [], [], []
    for h in range(n_kv):
        f = torch.cat([k[h * head_dim : (h + 1) * head_dim], v[h * v_head_dim : (h + 1) * v_head_dim]], 0)
        fq, fs = quant_blocks(f)
        kq.append(fq[:head_dim])
        vq.append(fq[head_dim:])
        ks.append(fs[:nk])
        vs.append(fs[nk:])
    return torch.cat(kq), torch.cat(ks), torch.cat(vq), torch.cat(vs)


def dequant_ga_kv(kq, ks, vq, vs, n_kv: int, head_dim: int, v_head_dim: int):
    nk = ks.shape[0] // n_kv
    nv = vs.shape[0] // n_kv
    kd, vd = [], []
    for h in range(n_kv):
        f = torch.cat([kq[h * head_dim : (h + 1) * head_dim], vq[h * v_head_dim : (h + 1) * v_head_dim]], 0)
        s = torch.cat([ks[h * nk : (h + 1) * nk], vs[h * nv : (h + 1) * nv]], 0)
        fd = dequant_blocks(f, s)
        kd.append(fd[:head_dim])
        vd.append(fd[head_dim:])
    return torch.cat(kd), torch.cat(vd)


def unquantised_dtype(name: str) -> torch.dtype:
    """Storage dtype of a tensor fp8_d keeps unquantised (o_proj, embed_tokens, lm_head, norms -> BF16)."""
    return torch.float32 if name.endswith(FP8_F32_SUFFIXES) else torch.bfloat16


def is_quantised(name: str) -> bool:
    if not name.endswith(".weight"):
        return False
    if ".self_attn." in name:
        return any(p in name for p in ("q_proj.", "k_proj.", "v_proj."))  # o_proj stays unquantised
    if ".mlp." in name:
        return any(p in name for p in ("gate_proj.", "up_proj.", "down_proj."))  # not the router mlp.gate.weight
    return False


# ----------------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------------


def gen_hybrid_a_and_fused_c() -> None:
    print("hybrid_a / fused_c")
    seed_everything(1001)
    model = build_model(HYBRID_A)
    assert model.config.layer_types == [
        "full_attention", "sliding_attention", "sliding_attention", "sliding_attention",
        "sliding_attention", "full_attention", "sliding_attention",
    ], model.config.layer_types  # fmt: skip
    assert model.config.mlp_layer_types == ["dense"] + ["sparse"] * 6
    reinit_(model)
    input_ids = make_input_ids(model.config.vocab_size, 2001)
    logits = forward_logits(model, input_ids)

    # hybrid_a: save_pretrained -> single model.safetensors in hub naming
    a = fresh_dir("hybrid_a")
    save_hf(model, a)
    save_golden(a, input_ids, logits)
    names = safetensors_names(a)
    check_folder_files(a)
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in names, "expected per-expert hub naming"
    assert "model.layers.1.self_attn.attention_sink_bias" in names, "expected hub sink naming"
    assert not any(k.endswith("gate_up_proj") or k.endswith(".sinks") for k in names)
    load_and_check(a, input_ids, logits, "hybrid_a")

    # fused_c: same weights, transformers-native in-memory layout, written by hand
    c = fresh_dir("fused_c")
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(c, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(a, "config.json"), os.path.join(c, "config.json"))
    save_golden(c, input_ids, logits)
    check_folder_files(c)
    names = safetensors_names(c)
    E, I, H = HYBRID_A["n_routed_experts"], HYBRID_A["moe_intermediate_size"], HYBRID_A["hidden_size"]
    assert names["model.layers.1.mlp.experts.gate_up_proj"][1] == (E, 2 * I, H)
    assert names["model.layers.1.mlp.experts.down_proj"][1] == (E, H, I)
    assert "model.layers.1.self_attn.sinks" in names
    assert not any(".experts.0." in k or "attention_sink_bias" in k for k in names)
    load_and_check(c, input_ids, logits, "fused_c")

    sensitivity(model, input_ids, logits, "hybrid_a")


def gen_pattern_b() -> None:
    print("pattern_b")
    seed_everything(1002)
    model = build_model(PATTERN_B)
    reinit_(model)
    input_ids = make_input_ids(model.config.vocab_size, 2002)
    logits = forward_logits(model, input_ids)

    b = fresh_dir("pattern_b")
    save_hf(model, b, max_shard_size=PATTERN_B_SHARD)
    save_golden(b, input_ids, logits)
    check_folder_files(b, sharded=True)
    shards = sorted(f for f in os.listdir(b) if f.endswith(".safetensors"))
    assert os.path.exists(os.path.join(b, "model.safetensors.index.json")), os.listdir(b)
    assert 2 <= len(shards) <= 5 and all(s.startswith("model-0000") for s in shards), shards
    with open(os.path.join(b, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert sorted(set(index["weight_map"].values())) == shards
    print(f"  shards: {shards}")
    load_and_check(b, input_ids, logits, "pattern_b")
    sensitivity(model, input_ids, logits, "pattern_b")


def gen_fp8_d() -> None:
    print("fp8_d")
    seed_everything(1003)
    model = build_model(FP8_D)
    reinit_(model)
    cfg = model.config
    n_kv, hd, vhd = cfg.num_key_value_heads, cfg.head_dim, cfg.v_head_dim
    ga_layers = [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"]
    with torch.no_grad():
        for i in ga_layers:
            model.model.layers[i].self_attn.k_proj.weight.mul_(FP8_K_MULT)

    with tempfile.TemporaryDirectory() as tmp:
        # hub naming of the fp32 weights, as transformers writes it
        model.save_pretrained(tmp)
        hub = load_file(os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "config.json")) as f:
            config_dict = json.load(f)

        fp8_sd: dict[str, torch.Tensor] = {}
        deq_sd: dict[str, torch.Tensor] = {}
        for name in sorted(hub):
            w = hub[name]
            if not is_quantised(name):
                # stored as BF16 (or F32 for router / correction bias / sinks); the golden uses the stored values
                fp8_sd[name] = w.to(unquantised_dtype(name)).contiguous()
                deq_sd[name] = fp8_sd[name].to(torch.float32)
                continue
            layer = int(name.split(".")[2])
            if layer in ga_layers and ".self_attn.k_proj." in name:
                vname = name.replace("k_proj", "v_proj")
                kq, ks, vq, vs = quant_ga_kv(w, hub[vname], n_kv, hd, vhd)
                kd, vd = dequant_ga_kv(kq, ks, vq, vs, n_kv, hd, vhd)
                fp8_sd[name], fp8_sd[name + "_scale_inv"] = kq, ks
                fp8_sd[vname], fp8_sd[vname + "_scale_inv"] = vq, vs
                deq_sd[name], deq_sd[vname] = kd, vd
                continue
            if layer in ga_layers and ".self_attn.v_proj." in name:
                continue  # done together with k_proj
            q, s = quant_blocks(w)
            fp8_sd[name], fp8_sd[name + "_scale_inv"] = q, s
            deq_sd[name] = dequant_blocks(q, s)

        # golden = transformers forward on the (correctly) dequantised weights
        save_file(deq_sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        deq_model, info = MiMoV2FlashForCausalLM.from_pretrained(
            tmp, dtype=torch.float32, output_loading_info=True, **COMMON
        )
        deq_model.eval()
        assert not any(info.values()), info
        for k, v in deq_model.state_dict().items():  # make sure what was loaded is what we dequantised
            if k.endswith("mlp.experts.gate_up_proj"):
                p = k[: -len("gate_up_proj")]
                ref = torch.stack(
                    [torch.cat([deq_sd[f"{p}{e}.gate_proj.weight"], deq_sd[f"{p}{e}.up_proj.weight"]]) for e in range(v.shape[0])]
                )
            elif k.endswith("mlp.experts.down_proj"):
                p = k[: -len("down_proj")]
                ref = torch.stack([deq_sd[f"{p}{e}.down_proj.weight"] for e in range(v.shape[0])])
            else:
                ref = deq_sd[k.replace("self_attn.sinks", "self_attn.attention_sink_bias")]
            assert torch.equal(v, ref), k
        input_ids = make_input_ids(cfg.vocab_size, 2003)
        logits = forward_logits(deq_model, input_ids)

        # the same with a naive uniform dequantisation of the GA K/V (must differ noticeably)
        naive_sd = dict(deq_sd)
        for i in ga_layers:
            for p in ("k_proj", "v_proj"):
                n = f"model.layers.{i}.self_attn.{p}.weight"
                q, s = fp8_sd[n], fp8_sd[n + "_scale_inv"]
                s_uniform = s[: math.ceil(q.shape[0] / FP8_BLOCK)]  # "first ceil(rows/128) scale rows"
                naive_sd[n] = dequant_blocks(q, s_uniform)
        naive_model = copy.deepcopy(deq_model)
        with torch.no_grad():
            for i in ga_layers:
                at = naive_model.model.layers[i].self_attn
                at.k_proj.weight.copy_(naive_sd[f"model.layers.{i}.self_attn.k_proj.weight"])
                at.v_proj.weight.copy_(naive_sd[f"model.layers.{i}.self_attn.v_proj.weight"])
        naive_err = float(np.abs(forward_logits(naive_model, input_ids) - logits).max())
        fp32_err = float(np.abs(forward_logits(model, input_ids) - logits).max())

    d = fresh_dir("fp8_d")
    save_file(fp8_sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    config_dict["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
        "ignored_layers": [f"model.layers.{i}.self_attn.o_proj" for i in range(cfg.num_hidden_layers)],
    }
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True)
        f.write("\n")

    k0, v0 = "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"
    save_golden(
        d,
        input_ids,
        logits,
        orig_layer0_k_proj=hub[k0].numpy().astype(np.float32),
        orig_layer0_v_proj=hub[v0].numpy().astype(np.float32),
    )
    check_folder_files(d)

    # checks on what was written
    names = safetensors_names(d)
    in_blocks = math.ceil(cfg.hidden_size / FP8_BLOCK)
    for i in ga_layers:
        p = f"model.layers.{i}.self_attn."
        assert names[p + "k_proj.weight"][1:] == ((n_kv * hd, cfg.hidden_size), "F8_E4M3")
        assert names[p + "k_proj.weight_scale_inv"][1:] == ((2 * n_kv, in_blocks), "F32")
        assert names[p + "v_proj.weight_scale_inv"][1:] == ((n_kv, in_blocks), "F32")
        assert p + "o_proj.weight_scale_inv" not in names and names[p + "o_proj.weight"][2] == "BF16"
    for n, (_, shape, dt) in names.items():
        if n.endswith("_scale_inv"):
            assert dt == "F32" and names[n[: -len("_scale_inv")]][2] == "F8_E4M3", n
        elif is_quantised(n):
            assert dt == "F8_E4M3" and n + "_scale_inv" in names, n
            if not (int(n.split(".")[2]) in ga_layers and ("k_proj" in n or "v_proj" in n)):
                exp = (math.ceil(shape[0] / FP8_BLOCK), math.ceil(shape[1] / FP8_BLOCK))
                assert names[n + "_scale_inv"][1] == exp, (n, names[n + "_scale_inv"][1], exp)
        else:
            assert dt == ("F32" if n.endswith(FP8_F32_SUFFIXES) else "BF16"), (n, dt)
    stored = load_file(os.path.join(d, "model.safetensors"))  # golden was computed from exactly these values
    assert sorted(n for n in stored if not n.endswith("_scale_inv")) == sorted(deq_sd)
    for n, t in stored.items():
        if n.endswith("_scale_inv"):
            continue
        if not is_quantised(n):
            assert torch.equal(t.to(torch.float32), deq_sd[n]), n
        elif not (int(n.split(".")[2]) in ga_layers and ("k_proj" in n or "v_proj" in n)):  # GA K/V: below
            assert torch.equal(dequant_blocks(t, stored[n + "_scale_inv"]), deq_sd[n]), n
    for i in ga_layers:
        p = f"model.layers.{i}.self_attn."
        kd, vd = dequant_ga_kv(stored[p + "k_proj.weight"], stored[p + "k_proj.weight_scale_inv"],
                               stored[p + "v_proj.weight"], stored[p + "v_proj.weight_scale_inv"], n_kv, hd, vhd)
        assert torch.equal(kd, deq_sd[p + "k_proj.weight"]) and torch.equal(vd, deq_sd[p + "v_proj.weight"]), i
    for n in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert n in stored, n  # untied lm_head, stored BF16 like the rest

    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    vd_rows = deq_sd[v0].norm(dim=1)
    vo_rows = hub[v0].norm(dim=1)
    print(f"  quantisation rel err layer0 k {rel(deq_sd[k0], hub[k0]):.3g}, v {rel(deq_sd[v0], hub[v0]):.3g}")
    print(f"  naive uniform dequant of layer0 v: rel err {rel(naive_sd[v0], hub[v0]):.3g}")
    print(f"  row-norm ratio deq/orig for v rows 0..63 of head 0: {float((vd_rows[:64] / vo_rows[:64]).mean()):.4f}")
    print(f"  logits: fp32 (pre-quant) vs golden max diff {fp32_err:.3g}; naive-dequant vs golden {naive_err:.3g}")
    if naive_err < 1e-1:
        raise RuntimeError(f"naive GA K/V dequantisation is not detectable in the logits ({naive_err})")
    sensitivity(deq_model, input_ids, logits, "fp8_d")


DECODE_PROMPT_LENS = (9, 4)
DECODE_NEW_TOKENS = 40  # several sliding windows past the prompt, so the SWA ring wraps


@torch.no_grad()
def gen_decode(name: str) -> None:
    """`decode.npz`: transformers' greedy `generate` (KV cache on) for two prompts of different lengths.

    `tokens` int32 [2, max prompt + DECODE_NEW_TOKENS] holds prompt + generated ids, -1 after a row's end.
    """
    folder = os.path.join(HERE, name)
    model = MiMoV2FlashForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    input_ids = np.load(os.path.join(folder, "golden.npz"))["input_ids"]
    width = max(DECODE_PROMPT_LENS) + DECODE_NEW_TOKENS
    tokens = np.full((len(DECODE_PROMPT_LENS), width), -1, np.int32)
    for row, n in enumerate(DECODE_PROMPT_LENS):
        prompt = torch.from_numpy(input_ids[row : row + 1, :n].astype(np.int64))
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=DECODE_NEW_TOKENS,
                             min_new_tokens=DECODE_NEW_TOKENS, do_sample=False, use_cache=True,
                             pad_token_id=0, eos_token_id=None)
        tokens[row, : out.shape[1]] = out[0].numpy()
        # the cached generation must equal the argmax of full forwards (else the fixture is wrong)
        full = forward_logits(model, tokens[row : row + 1, : out.shape[1]])
        assert (full[0, n - 1 : -1].argmax(-1) == tokens[row, n : out.shape[1]]).all(), name
    np.savez(os.path.join(folder, "decode.npz"), tokens=tokens, prompt_lens=np.asarray(DECODE_PROMPT_LENS, np.int32))
    print(f"  {name}/decode.npz: greedy generate, prompts {DECODE_PROMPT_LENS}, {DECODE_NEW_TOKENS} new tokens")


def main() -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    if sys.argv[1:] != ["--decode-only"]:  # --decode-only: add decode.npz to the existing folders
        gen_hybrid_a_and_fused_c()
        gen_pattern_b()
        gen_fp8_d()
    for name in ("hybrid_a", "pattern_b"):
        gen_decode(name)
    total = 0
    for name in ("hybrid_a", "pattern_b", "fused_c", "fp8_d"):
        folder = os.path.join(HERE, name)
        for fn in sorted(os.listdir(folder)):
            size = os.path.getsize(os.path.join(folder, fn))
            total += size
            print(f"  {name}/{fn}: {size} bytes")
    print(f"total: {total} bytes ({total / 2**20:.2f} MiB)")
    if total >= MAX_TOTAL_BYTES:
        raise RuntimeError(f"fixtures total {total} bytes, over the {MAX_TOTAL_BYTES} byte budget")


if __name__ == "__main__":
    sys.exit(main())
