import json
import os
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from mimo_jax import CheckpointError, ConfigError, MiMoV2Flash, load_config, load_hf, save_hf
from mimo_jax.safetensors_io import CheckpointReader, SafetensorsFile, write_safetensors
from tests.conftest import GOLDEN_DIR

FIXTURES = ["hybrid_a", "pattern_b", "fused_c", "fp8_d"]


def _flat(model):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("moe_impl", ["auto", "dense"])
@pytest.mark.parametrize("fixture", FIXTURES)
def test_logits_match_transformers_golden(fixture, moe_impl):
    path = os.path.join(GOLDEN_DIR, fixture)
    golden = np.load(os.path.join(path, "golden.npz"))
    model = load_hf(path, jnp.float32, moe_impl=moe_impl)
    logits = np.asarray(model(jnp.asarray(golden["input_ids"])).logits)
    ref = golden["logits"]
    assert np.max(np.abs(logits - ref)) <= 1e-4 * np.max(np.abs(ref))


def _ga_kv_scales(path):
    st = SafetensorsFile(os.path.join(path, "model.safetensors"))
    get = lambda n: np.asarray(st.read("model.layers.0.self_attn." + n))  # noqa: E731
    return get("k_proj.weight"), get("k_proj.weight_scale_inv"), get("v_proj.weight"), get("v_proj.weight_scale_inv")


def test_fp8_global_kv_follow_the_per_head_fused_blocks():
    path = os.path.join(GOLDEN_DIR, "fp8_d")
    golden = np.load(os.path.join(path, "golden.npz"))
    kq, ks, vq, vs = _ga_kv_scales(path)
    kq, vq = kq.astype(np.float32), vq.astype(np.float32)
    col_scale = lambda s: np.repeat(s, 128, axis=1)[:, : kq.shape[1]]  # noqa: E731
    num_kv = ks.shape[0] // 2
    # The spec's rule, row by row: K_h rows 0-127 -> Sk[2h], 128-191 -> Sk[2h+1];
    # V_h rows 0-63 -> Sk[2h+1] (the block crossing the K/V boundary), 64-127 -> Sv[h].
    k_rows = [col_scale(ks)[2 * h + (r >= 128)] for h in range(num_kv) for r in range(192)]
    v_rows = [col_scale(ks)[2 * h + 1] if r < 64 else col_scale(vs)[h] for h in range(num_kv) for r in range(128)]
    k_ref, v_ref = kq * np.stack(k_rows), vq * np.stack(v_rows)

    model = load_hf(path, jnp.float32)
    attn = model.segments[0].runs[0].attn
    assert model.config.layer_types[0] == "global"
    np.testing.assert_array_equal(np.asarray(attn.k[0, 0]).reshape(kq.shape[1], -1).T, k_ref)
    np.testing.assert_array_equal(np.asarray(attn.v[0, 0]).reshape(kq.shape[1], -1).T, v_ref)

    def rel_err(w, ref):
        return np.linalg.norm(w - ref) / np.linalg.norm(ref)

    assert rel_err(k_ref, golden["orig_layer0_k_proj"]) < 0.05
    assert rel_err(v_ref, golden["orig_layer0_v_proj"]) < 0.05
    # Naive uniform dequantisation: v on its own 128-row grid. It is detectably wrong.
    v_naive = vq * np.repeat(col_scale(vs), 128, axis=0)[: vq.shape[0]]
    assert rel_err(v_naive, golden["orig_layer0_v_proj"]) > 0.3


def _small_model(small_overrides, param_dtype="float32"):
    cfg = load_config("tiny", small_overrides + [f"model.param_dtype={param_dtype}", f"model.dtype={param_dtype}"]).model
    return MiMoV2Flash(cfg, rngs=nnx.Rngs(3))


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_save_load_round_trip_is_bit_exact(tmp_path, small_overrides, param_dtype):
    model = _small_model(small_overrides, param_dtype)
    save_hf(model, str(tmp_path), max_shard_bytes=20_000)
    files = sorted(os.listdir(tmp_path))
    assert "model_mtp.safetensors" in files and "model.safetensors.index.json" in files
    assert sum(f.startswith("model-0") for f in files) > 1
    mtp_names = SafetensorsFile(str(tmp_path / "model_mtp.safetensors")).keys()
    assert "model.mtp.layers.2.pre_mlp_layernorm.weight" in mtp_names
    assert all(n.startswith("model.mtp.layers.") for n in mtp_names)
    loaded = load_hf(str(tmp_path), jnp.dtype(param_dtype))
    assert loaded.config == model.config
    a, b = _flat(model), _flat(loaded)
    assert a.keys() == b.keys()
    for path in a:
        assert a[path].dtype == b[path].dtype, path
        np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))


def test_fp8_export_reloads_close_and_requantises_identically(tmp_path, small_overrides):
    model = _small_model(small_overrides)
    save_hf(model, str(tmp_path / "a"), dtype="fp8")
    with open(tmp_path / "a" / "config.json") as f:
        assert json.load(f)["quantization_config"]["weight_block_size"] == [128, 128]
    reloaded = load_hf(str(tmp_path / "a"), jnp.float32)
    # e4m3 keeps 3 mantissa bits: a few percent of error per weight, bf16 far less; fp32 stays exact.
    before, after = _flat(model), _flat(reloaded)
    for path, w in before.items():
        err = np.linalg.norm(after[path] - w) / np.linalg.norm(w) if np.any(w) else np.abs(after[path]).max()
        assert err == 0 if path[-1] in ("router", "bias", "sinks") else err < 0.05, path
    save_hf(reloaded, str(tmp_path / "b"), dtype="fp8")
    name = [f for f in os.listdir(tmp_path / "a") if f.startswith("model-")][0]
    first, second = SafetensorsFile(str(tmp_path / "a" / name)), SafetensorsFile(str(tmp_path / "b" / name))
    for key in first.keys():
        np.testing.assert_array_equal(np.asarray(first.read(key)).view(np.uint8),
                                      np.asarray(second.read(key)).view(np.uint8), err_msg=key)


def test_fp8_resident_weights_give_the_dequantised_model(tmp_path, small_overrides):
    """load_hf(weights="fp8") keeps the checkpoint's e4m3 bytes as the weights: the logits of the
    main model (fp8_d, with the global layer's fused K/V blocks) and of the MTP heads (an export
    with global-layer K/V in 2 fused shards) equal those of the model dequantised on loading, greedy
    speculative decoding gives its greedy tokens, and the quantised weights take about half their
    bf16 bytes in the live arrays. With moe_impl=pallas the experts stay FP8 into the kernel."""
    from mimo_jax import generate
    from mimo_jax.fp8_resident import Fp8Weight

    cfg = load_config("tiny", small_overrides + [
        "model.qk_head_dim=192", "model.v_head_dim=128", "model.global_kv_heads=2", "model.num_mtp_heads=1",
        "model.num_layers=2", "model.layer_types=[global, swa]", "model.mlp_types=[dense, moe]"]).model
    model = nnx.jit(lambda: MiMoV2Flash(cfg, rngs=nnx.Rngs(3)))()  # one compile, not one per parameter
    save_hf(model, str(tmp_path / "mtp"), dtype="fp8")
    golden_dir = os.path.join(GOLDEN_DIR, "fp8_d")
    golden_ids = np.load(os.path.join(golden_dir, "golden.npz"))["input_ids"]
    for path, ids in ((golden_dir, golden_ids),
                      (str(tmp_path / "mtp"), np.random.default_rng(0).integers(1, 96, (2, 24)))):
        dequantised, resident = load_hf(path, jnp.bfloat16), load_hf(path, jnp.bfloat16, weights="fp8")
        want, got = dequantised(jnp.asarray(ids)), resident(jnp.asarray(ids))
        for name in ("logits", "mtp_logits") if resident.config.num_mtp_heads else ("logits",):
            a, b = (np.asarray(getattr(out, name), np.float32) for out in (want, got))
            np.testing.assert_allclose(b, a, rtol=0, atol=2**-8 * np.abs(a).max(), err_msg=f"{path} {name}")
        if path == golden_dir:  # the Pallas grouped matmul (interpreted here) dequantises the experts block by block
            kernel = load_hf(path, jnp.bfloat16, weights="fp8", moe_impl="pallas")(jnp.asarray(ids)).logits
            a = np.asarray(want.logits, np.float32)
            np.testing.assert_allclose(np.asarray(kernel, np.float32), a, rtol=0, atol=2**-8 * np.abs(a).max())

        quantised = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(resident))
                     if isinstance(v.get_value(), Fp8Weight)}
        names = {p[-1] for p in quantised}
        assert names == {"q", "k", "v", "gate", "up", "down", "w_gate", "w_up", "w_down"}, names
        stored = CheckpointReader(path).read("model.layers.0.self_attn.k_proj.weight")
        np.testing.assert_array_equal(  # the checkpoint's own bytes, transposed into our [in, heads, dim] layout
            np.asarray(quantised[("segments", 0, "runs", 0, "attn", "k")].values[0, 0]).reshape(stored.shape[1], -1).T
            .view(np.uint8), np.asarray(stored).view(np.uint8))
        bf16 = dict(nnx.to_flat_state(nnx.state(dequantised)))
        held = sum(w.nbytes for w in quantised.values())
        assert held < 0.6 * sum(bf16[p].get_value().nbytes for p in quantised), held

        if resident.config.num_mtp_heads:
            prompts = [[5, 6, 7, 8, 9], [3, 4]]
            plain = generate(dequantised, prompts, 8)
            speculative = generate(resident, prompts, 8, speculative=True, num_draft=1)
            np.testing.assert_array_equal(speculative.tokens, plain.tokens)
    with pytest.raises(CheckpointError, match=r"self_attn.k_proj.weight in .* is float32, not FP8 with a .*_scale_inv"):
        save_hf(model, str(tmp_path / "fp32"), dtype=jnp.float32)
        load_hf(str(tmp_path / "fp32"), jnp.bfloat16, weights="fp8")


def test_save_hf_output_loads_in_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    src = os.path.join(GOLDEN_DIR, "pattern_b")
    model = load_hf(src, jnp.float32)
    save_hf(model, str(tmp_path))
    theirs = transformers.MiMoV2FlashForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = np.load(os.path.join(src, "golden.npz"))["input_ids"]
    with torch.no_grad():
        ref = theirs(torch.from_numpy(ids).long()).logits.numpy()
    ours = np.asarray(model(jnp.asarray(ids)).logits)
    assert np.max(np.abs(ours - ref)) <= 1e-4 * np.max(np.abs(ref))


# --- bad inputs: each a one-line error naming what is wrong ------------------------------------

@pytest.fixture
def checkpoint_copy(tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(os.path.join(GOLDEN_DIR, "hybrid_a"), dst)
    return dst


def _rewrite(path, edit):
    """Rewrites a safetensors file through `edit(dict name -> array)`."""
    st = SafetensorsFile(str(path))
    tensors = edit({k: np.array(st.read(k)) for k in st.keys()})
    write_safetensors(str(path), [(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()])


def _one_line_error(exc_type, path):
    with pytest.raises(exc_type) as err:
        load_hf(str(path), jnp.float32)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_truncated_file(checkpoint_copy):
    file = checkpoint_copy / "model.safetensors"
    os.truncate(file, os.path.getsize(file) - 1000)
    message = _one_line_error(CheckpointError, checkpoint_copy)
    assert "truncated" in message and "model.safetensors" in message


def test_missing_tensor(checkpoint_copy):
    name = "model.layers.3.mlp.experts.5.up_proj.weight"
    _rewrite(checkpoint_copy / "model.safetensors", lambda t: {k: v for k, v in t.items() if k != name})
    assert f"missing tensor {name}" in _one_line_error(CheckpointError, checkpoint_copy)


def test_wrong_shape(checkpoint_copy):
    name = "model.layers.1.self_attn.q_proj.weight"
    _rewrite(checkpoint_copy / "model.safetensors", lambda t: {**t, name: t[name][:-1]})
    message = _one_line_error(CheckpointError, checkpoint_copy)
    assert name in message and "model.safetensors" in message and "expected" in message


def test_unexpected_tensor(checkpoint_copy):
    _rewrite(checkpoint_copy / "model.safetensors", lambda t: {**t, "model.layers.0.mlp.bogus": np.zeros(3, np.float32)})
    assert "unexpected tensor(s) model.layers.0.mlp.bogus" in _one_line_error(CheckpointError, checkpoint_copy)


def test_fp8_tensor_without_scale(checkpoint_copy):
    name = "model.layers.0.mlp.up_proj.weight"
    _rewrite(checkpoint_copy / "model.safetensors", lambda t: {**t, name: t[name].astype(ml_dtypes.float8_e4m3fn)})
    assert f"{name} in" in _one_line_error(CheckpointError, checkpoint_copy)


def test_unknown_architecture(checkpoint_copy):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    config["architectures"] = ["DeepseekV3ForCausalLM"]
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    message = _one_line_error(ConfigError, checkpoint_copy)
    assert "DeepseekV3ForCausalLM" in message and "config.json" in message


def test_sharding_callback_places_each_parameter_with_its_logical_axes():
    import jax

    calls = {}

    def place(path, shape, logical_axes):
        calls[path] = (shape, logical_axes)
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])

    model = load_hf(os.path.join(GOLDEN_DIR, "hybrid_a"), jnp.float32, sharding=place)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    assert calls.keys() == flat.keys()
    assert calls[("embed",)] == (flat[("embed",)].get_value().shape, ("vocab", "embed"))
    expert_path = next(p for p in calls if p[-1] == "w_gate")
    assert calls[expert_path][1] == ("layers", "layers", "experts", "embed", "mlp")


def test_mtp_file_is_read_even_when_the_index_does_not_list_it(tmp_path, small_overrides):
    model = _small_model(small_overrides)
    save_hf(model, str(tmp_path))
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != "model_mtp.safetensors"}
    index_path.write_text(json.dumps(index))
    loaded = load_hf(str(tmp_path), jnp.float32)
    assert loaded.config.num_mtp_heads == 3
    np.testing.assert_array_equal(loaded.mtp.eh_proj[...], model.mtp.eh_proj[...])
