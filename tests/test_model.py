import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mimo_jax import MiMoV2Flash, load_config
from mimo_jax.layers import apply_rope
from mimo_jax.model import positions_from_segments
from tests.conftest import SMALL_OVERRIDES


@pytest.fixture(scope="module")
def model():
    """Shared: the tests only read it."""
    return MiMoV2Flash(load_config("tiny", list(SMALL_OVERRIDES)).model, rngs=nnx.Rngs(0))


def _np_rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _np_rope(x, pos, theta, rot):
    half = rot // 2
    inv = 1.0 / theta ** (np.arange(0, rot, 2) / rot)
    ang = pos[:, None] * inv
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x1, x2 = x[..., :half], x[..., half:rot]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rot:]], -1)


def _np_mtp_head(p, cfg, h, emb):
    """One MTP head on one sequence, written from the spec: z = eh_proj([enorm(e), hnorm(h)]),
    SWA attention with sinks + value scale, dense SwiGLU, final norm. h: [T, D] post-norm hidden."""
    eps, t = cfg.rms_norm_eps, h.shape[0]
    z = np.concatenate([_np_rmsnorm(emb, p["enorm"], eps), _np_rmsnorm(h, p["hnorm"], eps)], -1) @ p["eh_proj"]
    x = _np_rmsnorm(z, p["input_norm"], eps)
    pos = np.arange(t, dtype=np.float64)
    q = _np_rope(np.einsum("td,dhk->thk", x, p["q"]), pos, cfg.swa_rope_theta, cfg.rotary_dim)
    k = _np_rope(np.einsum("td,dhk->thk", x, p["k"]), pos, cfg.swa_rope_theta, cfg.rotary_dim)
    v = np.einsum("td,dhk->thk", x, p["v"]) * cfg.attention_value_scale
    groups = cfg.num_attention_heads // cfg.swa_kv_heads
    out = np.zeros((t, cfg.num_attention_heads, cfg.v_head_dim))
    for i in range(t):
        for head in range(cfg.num_attention_heads):
            keys = [j for j in range(t) if 0 <= i - j <= cfg.sliding_window]
            s = np.array([q[i, head] @ k[j, head // groups] for j in keys]) / np.sqrt(cfg.qk_head_dim)
            w = np.exp(s - s.max())
            w = w / (w.sum() + np.exp(p["sinks"][head] - s.max()))
            out[i, head] = sum(wj * v[j, head // groups] for wj, j in zip(w, keys))
    z = z + np.einsum("thv,hvd->td", out, p["o"])
    y = _np_rmsnorm(z, p["post_attn_norm"], eps)
    gate = y @ p["gate"]
    z = z + (gate / (1 + np.exp(-gate)) * (y @ p["up"])) @ p["down"]
    return _np_rmsnorm(z, p["final_norm"], eps)


def test_mtp_heads_match_numpy_reference(model):
    cfg = model.config
    ids = jax.random.randint(jax.random.key(1), (2, 11), 0, cfg.vocab_size)
    out = model(ids)
    hidden = np.asarray(out.hidden, np.float64)
    # The heads read the post-norm hidden state: it is what the lm_head turns into the main logits.
    np.testing.assert_allclose(out.logits, hidden @ np.asarray(model.lm_head[...]), rtol=1e-4, atol=1e-5)
    embed, lm_head = np.asarray(model.embed[...], np.float64), np.asarray(model.lm_head[...], np.float64)
    m = model.mtp
    for k in range(cfg.num_mtp_heads):
        p = {name: np.asarray(arr[k], np.float64) for name, arr in {
            "enorm": m.enorm.weight, "hnorm": m.hnorm.weight, "eh_proj": m.eh_proj, "input_norm": m.block.input_norm.weight,
            "q": m.block.attn.q, "k": m.block.attn.k, "v": m.block.attn.v, "o": m.block.attn.o, "sinks": m.block.attn.sinks,
            "post_attn_norm": m.block.post_attn_norm.weight, "gate": m.block.mlp.gate, "up": m.block.mlp.up,
            "down": m.block.mlp.down, "final_norm": m.final_norm.weight}.items()}
        for b in range(ids.shape[0]):
            # Head k at position j reads token j+k+1 and predicts token j+k+2; later positions have no target.
            valid = ids.shape[1] - k - 1
            emb = embed[np.asarray(ids[b, k + 1:])]
            ref = _np_mtp_head(p, cfg, hidden[b, :valid], emb) @ lm_head
            np.testing.assert_allclose(out.mtp_logits[k, b, :valid], ref, rtol=2e-4, atol=2e-4)


def test_rope_rotates_only_the_first_dims_in_half_pairs():
    x = jax.random.normal(jax.random.key(0), (1, 5, 2, 24))
    pos = jnp.arange(5)[None] + 3
    y = apply_rope(x, pos, 10_000.0, 8)
    np.testing.assert_array_equal(y[..., 8:], x[..., 8:])
    np.testing.assert_allclose(y[0], _np_rope(np.asarray(x[0], np.float64), np.arange(5) + 3.0, 10_000.0, 8), atol=1e-5)
    # A rotation: the norm of each (i, i+4) pair is kept.
    np.testing.assert_allclose(x[..., :4] ** 2 + x[..., 4:8] ** 2, y[..., :4] ** 2 + y[..., 4:8] ** 2, rtol=1e-5)


def test_packed_segments_equal_separate_sequences(model):
    a = jax.random.randint(jax.random.key(2), (1, 9), 0, model.config.vocab_size)
    b = jax.random.randint(jax.random.key(3), (1, 6), 0, model.config.vocab_size)
    packed = model(jnp.concatenate([a, b], 1), segment_ids_BT=jnp.array([[1] * 9 + [2] * 6]))
    np.testing.assert_allclose(packed.logits[:, :9], model(a).logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed.logits[:, 9:], model(b).logits, rtol=1e-5, atol=1e-5)
    # MTP heads too, wherever their input token is still inside the same document.
    np.testing.assert_allclose(packed.mtp_logits[0, :, 9:14], model(b).mtp_logits[0, :, :5], rtol=1e-5, atol=1e-5)


def test_positions_restart_per_segment():
    seg = jnp.array([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    np.testing.assert_array_equal(positions_from_segments(seg), [[0, 1, 2, 0, 1, 0, 1, 2, 3]])


def test_compiled_program_does_not_grow_with_depth(small_overrides):
    def hlo_size(num_layers):
        pattern = ["global" if i == 0 or (i + 1) % 6 == 0 else "swa" for i in range(num_layers)]
        cfg = load_config("tiny", small_overrides + [
            f"model.num_layers={num_layers}", f"model.layer_types=[{', '.join(pattern)}]",
            f"model.mlp_types=[dense{', moe' * (num_layers - 1)}]"]).model
        model = nnx.eval_shape(lambda: MiMoV2Flash(cfg, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
        return len(jax.jit(lambda s, i: nnx.merge(graphdef, s)(i).logits).lower(state, ids).as_text())

    # 24 and 48 layers: 2 vs 6 repeats of the [global, swa x 5] period. Same program size.
    assert hlo_size(48) < 1.05 * hlo_size(24)


_NO_REMAT_GRADS = {}


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_policies_give_the_same_gradients(small_overrides, remat):
    def grads(policy):
        cfg = load_config("tiny", small_overrides + [f"model.remat={policy}"]).model
        graphdef, params, rest = nnx.split(MiMoV2Flash(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
        ids = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
        grad_fn = jax.grad(lambda p: nnx.merge(graphdef, p, rest)(ids).logits.std())
        assert bool(re.search(r"remat|checkpoint", str(jax.make_jaxpr(grad_fn)(params)))) == (policy != "none")
        return jax.tree.leaves(grad_fn(params))

    if "none" not in _NO_REMAT_GRADS:  # the same reference for every policy: computed once
        _NO_REMAT_GRADS["none"] = grads("none")
    for got, want in zip(grads(remat), _NO_REMAT_GRADS["none"]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * float(np.abs(want).max()))
