import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mimo_jax import MiMoV2Flash, load_config
from mimo_jax.moe import router_stats
from mimo_jax.objective import lm_loss
from mimo_jax.router_balance import load_imbalance, update_router_bias


def test_balance_term_is_one_for_uniform_routing_and_grows_with_skew():
    e, t, k = 8, 16, 2
    uniform_experts = jnp.arange(t * k).reshape(1, t, k) % e
    flat_scores = jnp.full((1, t, e), 0.5)
    assert float(router_stats(flat_scores, uniform_experts, e).balance) == pytest.approx(1.0)
    skewed_experts = jnp.zeros((1, t, k), jnp.int32).at[..., 1].set(1)
    skewed_scores = flat_scores.at[..., :2].set(0.9)
    stats = router_stats(skewed_scores, skewed_experts, e)
    # E * sum_e f_e P_e with f = 1/2 on experts 0 and 1, P = 0.9 / (2 * 0.9 + 6 * 0.5) there.
    assert float(stats.balance) == pytest.approx(8 * 2 * 0.5 * 0.9 / 4.8)
    np.testing.assert_allclose(stats.load_E, [0.5, 0.5] + [0.0] * 6)


def test_bias_rule_raises_underloaded_and_lowers_overloaded_experts(small_overrides):
    model = MiMoV2Flash(load_config("tiny", small_overrides).model, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(0), (2, 16), 0, model.config.vocab_size)
    out = model(ids)
    assert set(out.router) == set(model.moe_runs())
    before = {key: moe.bias[...] for key, moe in model.moe_runs().items()}
    update_router_bias(model, out.router, rate=1e-3)
    for key, moe in model.moe_runs().items():
        load = out.router[key].load_E
        step = moe.bias[...] - before[key]
        np.testing.assert_allclose(step, 1e-3 * np.sign(load.mean(-1, keepdims=True) - load))
    assert float(load_imbalance(out.router)) >= 1.0


def test_loss_terms_and_mtp_metrics(small_overrides):
    model = MiMoV2Flash(load_config("tiny", small_overrides).model, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, model.config.vocab_size)
    seg = jnp.broadcast_to((jnp.arange(16) >= 9).astype(jnp.int32), (2, 16))
    out = model(ids, seg)
    plain, metrics = lm_loss(out, ids, seg, mtp_weight=0.0)
    assert float(plain) == pytest.approx(float(metrics["lm"]))
    total, metrics = lm_loss(out, ids, seg, mtp_weight=0.3, balance_weight=0.01, z_loss_weight=1e-4)
    expected = metrics["lm"] + 0.3 * metrics["mtp"].mean() + 0.01 * metrics["balance"] + 1e-4 * metrics["z_loss"]
    assert float(total) == pytest.approx(float(expected), rel=1e-6)
    assert metrics["mtp"].shape == (model.config.num_mtp_heads,)
    assert np.all((0 <= metrics["mtp_top1"]) & (metrics["mtp_top1"] <= 1))
    # A head whose logits are the main head's, shifted to the same target, agrees everywhere.
    copy = out.replace(mtp_logits=jnp.stack([jnp.roll(out.logits, -(k + 1), axis=1) for k in range(3)]))
    np.testing.assert_allclose(lm_loss(copy, ids)[1]["mtp_agree"], 1.0)


def test_mtp_distillation_is_zero_when_heads_copy_the_main_head_and_trains_only_heads(small_overrides):
    from mimo_jax.config import TrainConfig
    from mimo_jax.objective import mtp_distill_loss
    from mimo_jax.train_step import make_optimizer, train_step_fn

    model = MiMoV2Flash(load_config("tiny", small_overrides).model, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(2), (2, 16), 0, model.config.vocab_size)
    out = model(ids)
    copy = out.replace(mtp_logits=jnp.stack([jnp.roll(out.logits, -(k + 1), axis=1) for k in range(3)]))
    assert float(mtp_distill_loss(copy, ids)[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(mtp_distill_loss(out, ids)[0]) > 0

    train = TrainConfig(mode="mtp_distill", warmup_steps=0, learning_rate=1e-2)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(train, params)
    step = jax.jit(train_step_fn(graphdef, tx, train))
    new_params, _, metrics = step(params, tx.init(params), rest, ids, jnp.ones_like(ids))
    for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(new_params)):
        changed = not np.array_equal(old, new)
        assert changed == ("mtp" in jax.tree_util.keystr(path)), jax.tree_util.keystr(path)
    assert metrics["mtp_kl"].shape == (3,)


def test_schedule_warms_up_holds_then_decays():
    from mimo_jax.config import TrainConfig
    from mimo_jax.train_step import learning_rate_schedule

    lr = learning_rate_schedule(TrainConfig(steps=100, learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=10,
                                            constant_steps=20))
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(5e-4)
    assert float(lr(10)) == pytest.approx(1e-3) and float(lr(29)) == pytest.approx(1e-3)
    assert 1e-4 < float(lr(60)) < 1e-3 and float(lr(100)) == pytest.approx(1e-4)


def test_router_stats_leave_out_padding_positions():
    # One row of 4 positions, top-1 of 2 experts: tokens 0, 1 chose expert 0, tokens 2, 3 expert 1;
    # position 3 is padding (segment id 0). Over the 3 real tokens expert 0 has 2 of 3 choices.
    experts = jnp.array([[[0], [0], [1], [1]]], jnp.int32)
    scores = jnp.array([[[0.6, 0.2], [0.6, 0.2], [0.2, 0.6], [0.2, 0.6]]])
    padded = router_stats(scores, experts, 2, jnp.array([[1, 1, 1, 0]]))
    np.testing.assert_allclose(padded.load_E, [2 / 3, 1 / 3], rtol=1e-6)
    # balance = E * sum_e f_e P_e over the real tokens: f = (2/3, 1/3), P = ((.75 + .75 + .25) / 3, (.25 + .25 + .75) / 3).
    assert float(padded.balance) == pytest.approx(2 * (2 / 3 * 1.75 / 3 + 1 / 3 * 1.25 / 3), rel=1e-6)
    everything = router_stats(scores, experts, 2)  # without segment ids every position counts
    np.testing.assert_allclose(everything.load_E, [0.5, 0.5], rtol=1e-6)
    assert float(everything.balance) == pytest.approx(1.0, rel=1e-6)
    # A row of padding only adds nothing: neither to the loads nor to the balance average.
    two_rows = router_stats(jnp.concatenate([scores, scores]), jnp.concatenate([experts, experts]), 2,
                            jnp.array([[1, 1, 1, 0], [0, 0, 0, 0]]))
    np.testing.assert_allclose(two_rows.load_E, padded.load_E, rtol=1e-6)
    assert float(two_rows.balance) == pytest.approx(float(padded.balance), rel=1e-6)


def test_model_router_loads_ignore_padded_positions(small_overrides):
    model = MiMoV2Flash(load_config("tiny", small_overrides).model, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (1, 16), 0, model.config.vocab_size)
    real = model(ids[:, :10]).router
    # The same 10 tokens followed by 6 padding positions: causal attention keeps the real tokens'
    # hidden states (hence routes) as they were, and the padding's routes are left out.
    padded = model(ids, jnp.array([[1] * 10 + [0] * 6])).router
    for key in real:
        np.testing.assert_allclose(padded[key].load_E, real[key].load_E, atol=1e-6)


def test_vocab_chunked_loss_and_gradients_equal_the_unchunked_and_peak_memory_shrinks_with_the_chunk(small_overrides):
    from mimo_jax.model import ModelOutput

    model = MiMoV2Flash(load_config("tiny", small_overrides + ["model.vocab_size=300"]).model, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(3), (2, 24), 0, 300)
    seg = jnp.broadcast_to((jnp.arange(24) >= 15).astype(jnp.int32) + 1, (2, 24))
    whole, chunkable = model(ids, seg), model(ids, seg, logits=False)
    assert chunkable.logits is None and chunkable.mtp_hidden.shape == (3, 2, 24, model.config.hidden_size)

    def loss(hidden, mtp_hidden, head, chunk):
        if chunk:
            out = chunkable.replace(hidden=hidden, mtp_hidden=mtp_hidden, lm_head_DV=head)
        else:  # the model's own logits, from the same arrays
            logits = lambda h: jnp.einsum("...d,dv->...v", h, head, preferred_element_type=jnp.float32)  # noqa: E731
            out = whole.replace(logits=logits(hidden), mtp_logits=logits(mtp_hidden))
        return lm_loss(out, ids, seg, 0.3, 1e-3, 1e-4, vocab_chunk=chunk)

    arrays = (chunkable.hidden, chunkable.mtp_hidden, chunkable.lm_head_DV)
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    (ref, ref_metrics), ref_grads = grad(*arrays, 0)
    np.testing.assert_allclose(ref, lm_loss(whole, ids, seg, 0.3, 1e-3, 1e-4)[0], rtol=1e-6)
    for chunk in (64, 300):  # four chunks and a 44-column tail; one chunk
        (value, metrics), grads = grad(*arrays, chunk)
        np.testing.assert_allclose(value, ref, rtol=1e-6)
        for key in ref_metrics:
            np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-7, err_msg=key)
        for a, b in zip(grads, ref_grads):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(jnp.abs(b).max()))

    # The LM head alone at a vocabulary where the logits dominate: the compiled backward's
    # temporaries hold the [B, T, V] fp32 logits whole, and shrink with the chunk.
    targets = jnp.zeros((2, 256), jnp.int32)

    def temp_bytes(chunk):
        def head_loss(hidden_BTD, head_DV):
            logits = None if chunk else jnp.einsum("btd,dv->btv", hidden_BTD, head_DV)
            out = ModelOutput(logits=logits, mtp_logits=None, hidden=hidden_BTD, lm_head_DV=head_DV)
            return lm_loss(out, targets, vocab_chunk=chunk)[0]
        shapes = (jax.ShapeDtypeStruct((2, 256, 64), jnp.float32), jax.ShapeDtypeStruct((64, 16384), jnp.float32))
        return jax.jit(jax.grad(head_loss, (0, 1))).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = 2 * 256 * 16384 * 4
    full, coarse, fine = temp_bytes(0), temp_bytes(4096), temp_bytes(1024)
    assert full >= logits_bytes > coarse > fine, (full, coarse, fine)
