"""KV caches, generation and MTP speculative decoding (mimo_jax.kv_cache, mimo_jax.inference)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mimo_jax import MiMoV2Flash, generate, inference, kv_cache, load_config, load_hf
from mimo_jax.inference import SamplingParams, SlotEngine, processed_probs, speculative_accept
from tests.conftest import GOLDEN_DIR


def _model(overrides, extra=(), seed=0):
    cfg = load_config("tiny", [*overrides, *extra]).model
    return MiMoV2Flash(cfg, rngs=nnx.Rngs(seed))


def _greedy_by_full_forwards(model, prompt, n):
    """Causal, so padding after the sequence does not change its logits: one compile."""
    forward = nnx.jit(lambda m, ids: m(ids).logits)
    seq = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, len(prompt) + n), np.int32)
        padded[0, : len(seq)] = seq
        seq.append(int(jnp.argmax(forward(model, jnp.asarray(padded))[0, len(seq) - 1])))
    return seq


def _coin_flip_model(overrides):
    """Every head's and the main model's argmax is token 2 or 3, by the sign of h . w: drafts
    agree with the main model about half the time, so all acceptance counts occur."""
    model = _model(overrides, ["model.vocab_size=6", "model.pad_token_id=0"], seed=3)
    w = np.zeros(model.lm_head[...].shape, np.float32)
    w[:, 2] = np.asarray(model.lm_head[...])[:, 2] * 10
    w[:, 3] = -w[:, 2]
    model.lm_head[...] = jnp.asarray(w)
    return model


@pytest.mark.parametrize("slice_layers_in_place, moe_impl", [(False, "xla"), (True, "xla"), (True, "pallas")])
def test_cached_steps_equal_the_full_forward(small_overrides, slice_layers_in_place, moe_impl):
    """Prefill in chunks shorter than the ring and longer than it, then decode: the logits of
    every position equal one uncached forward, across several ring wrap-arounds (window 3); also
    with each layer sliced [p, j] from the stacked parameters, as on TPU, where the Pallas grouped
    matmul reads the expert weights from their stacks (interpreted here)."""
    model = _model(small_overrides + [f"model.moe_impl={moe_impl}"])
    for segment in model.segments:
        segment.slice_layers_in_place = slice_layers_in_place
    b, t = 2, 30
    ids = jax.random.randint(jax.random.key(1), (b, t), 3, 96)
    full = model(ids).logits
    cache = kv_cache.init_cache(model.config, b, 40, num_draft=3)
    step = nnx.jit(lambda m, ids, positions, cache: m(ids, positions_BT=positions, cache=cache))
    got = []
    for start, stop in [(0, 2), (2, 14), (14, 20)] + [(i, i + 1) for i in range(20, t)]:
        positions = jnp.broadcast_to(jnp.arange(start, stop), (b, stop - start))
        out = step(model, ids[:, start:stop], positions, cache)
        cache = out.cache
        got.append(out.logits)
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=2e-5, rtol=1e-4)


def test_swa_cache_memory_is_constant_in_context_length(small_overrides):
    cfg = load_config("tiny", small_overrides).model
    short = kv_cache.init_cache(cfg, 2, 64, num_draft=3, mtp=True)
    long = kv_cache.init_cache(cfg, 2, 4096, num_draft=3, mtp=True)
    ring = cfg.sliding_window + 1 + 3
    layers = {}  # (short slots, long slots) -> layers
    for key, kv in short.layers.items():
        sizes = (kv.k.shape[3], long.layers[key].k.shape[3])
        layers[sizes] = layers.get(sizes, 0) + kv.k.shape[0] * kv.k.shape[1]
    assert layers == {(ring, ring): 2, (64, 4096): 2}  # the SWA rings do not grow; the global caches do
    assert short.mtp.k.shape == long.mtp.k.shape == (cfg.num_mtp_heads, 2, cfg.sliding_window + 6, 2, cfg.qk_head_dim)
    assert short.ring_positions.shape == long.ring_positions.shape == (2, ring)


def test_greedy_equals_argmax_of_full_forwards(small_overrides):
    model = _model(small_overrides)
    prompts = [list(range(5, 16)), [7, 8, 9]]
    result = generate(model, prompts, 12)
    for row, prompt in enumerate(prompts):
        want = _greedy_by_full_forwards(model, prompt, 12)
        assert result.lengths[row] == len(want)
        assert result.tokens[row, : len(want)].tolist() == want
    assert result.tokens.shape == (2, 11 + 12)
    assert (result.tokens[1, 3 + 12:] == model.config.pad_token_id).all()
    assert result.acceptance_length is None


@pytest.mark.parametrize("fixture", ["hybrid_a", "pattern_b"])
def test_greedy_matches_transformers_generate(fixture):
    path = os.path.join(GOLDEN_DIR, fixture)
    golden = np.load(os.path.join(path, "decode.npz"))
    model = load_hf(path, jnp.float32)
    want, lens = golden["tokens"], golden["prompt_lens"]
    new = want.shape[1] - lens.max()
    result = generate(model, [want[i, :n] for i, n in enumerate(lens)], int(new), prefill_chunk=4)
    for row, n in enumerate(lens):
        ref = want[row][want[row] >= 0]
        assert result.tokens[row, : len(ref)].tolist() == ref.tolist(), row


def test_stop_tokens_and_limits(small_overrides):
    model = _model(small_overrides)
    free = generate(model, [[5, 6, 7]], 10).tokens[0]
    stop = int(free[3 + 4])  # the 5th generated token
    first = int(np.argmax(free[3:] == stop))  # it may also appear earlier
    result = generate(model, [[5, 6, 7], [5, 6, 7]], 10, stop_token_ids=(stop,))
    assert result.lengths.tolist() == [3 + first + 1] * 2
    assert result.tokens[0, : 3 + first + 1].tolist() == free[: 3 + first + 1].tolist()
    assert result.tokens.shape[1] == 3 + first + 1
    assert generate(model, [[5, 6, 7]], 0).tokens.tolist() == [[5, 6, 7]]
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [[5]], 3, temperature=-1.0)
    with pytest.raises(ValueError, match="num_draft"):
        generate(model, [[5]], 3, speculative=True, num_draft=4)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], 3)


def test_speculative_greedy_is_identical_to_plain_greedy(small_overrides):
    """Every acceptance count (0..3 drafts) and every rollback happens, across ring wrap-arounds
    (window 3, 40 new tokens), and batch rows of different lengths."""
    model = _coin_flip_model(small_overrides)
    prompts = [[1, 2, 3, 4, 5, 1, 2], [3], [4, 4, 5, 1]]
    plain = generate(model, prompts, 40)
    for num_draft, chunk in ((1, 512), (3, 4)):
        spec = generate(model, prompts, 40, speculative=True, num_draft=num_draft, prefill_chunk=chunk)
        np.testing.assert_array_equal(spec.tokens, plain.tokens)
        assert spec.count_hist[1:].sum() > 0
        assert all(spec.count_hist[n] > 0 for n in range(1, num_draft + 2)), spec.count_hist
        assert 1.0 < spec.acceptance_length <= num_draft + 1


def test_drafts_equal_the_uncached_mtp_heads(small_overrides):
    """Mid-generation, draft k is head k's argmax at the last processed position p over the
    verified tokens followed by the earlier drafts, as an uncached forward computes it."""
    model = _coin_flip_model(small_overrides)
    d, prompts = 3, [[1, 2, 3, 4, 5, 1, 2], [3, 5]]
    prompt_BP, prompt_len_B = inference._padded_prompts(prompts, 8, 0)
    state = inference.new_state(model, 2, 48, num_draft=d).replace(
        limit=jnp.array([40, 40]), done=jnp.zeros((2,), bool))
    state = inference.prefill(model, state, jnp.asarray(prompt_BP), jnp.asarray(prompt_len_B), 8)
    step = nnx.jit(lambda m, s: inference.speculative_step(m, s, d))
    draft = nnx.jit(lambda m, s: inference.draft(m, s, d))
    full = nnx.jit(lambda m, ids: m(ids).mtp_logits)
    for rounds in range(7):
        drafted = draft(model, state)
        for row in range(2):
            n = int(state.length[row])
            seq = np.zeros((1, 48), np.int32)
            seq[0, : n + d] = np.asarray(drafted.tokens[row, : n + d])
            want = np.argmax(np.asarray(full(model, jnp.asarray(seq)))[:, 0, n - 2], axis=-1)[:d]
            assert seq[0, n: n + d].tolist() == want.tolist(), (rounds, row)
        state = step(model, state)


def test_speculative_accept_is_lossless():
    """With a deterministic draft, the first emitted token is distributed as p_0, and the second,
    given that the first draft was accepted, as p_1."""
    vocab, d, n = 5, 2, 40000
    p_NV = jnp.array([[0.1, 0.4, 0.2, 0.25, 0.05], [0.3, 0.1, 0.1, 0.2, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2]])
    drafts = jnp.array([1, 4], jnp.int32)
    keys = jax.random.split(jax.random.key(0), n)
    tokens, count = speculative_accept(jnp.broadcast_to(p_NV, (n, d + 1, vocab)), jnp.broadcast_to(drafts, (n, d)), keys)
    tokens, count = np.asarray(tokens), np.asarray(count)
    first = np.bincount(tokens[:, 0], minlength=vocab) / n
    np.testing.assert_allclose(first, p_NV[0], atol=0.01)
    accepted = count >= 2
    second = np.bincount(tokens[accepted, 1], minlength=vocab) / accepted.sum()
    np.testing.assert_allclose(second, p_NV[1], atol=0.015)
    assert abs(accepted.mean() - 0.4) < 0.01 and abs((count == 3).mean() - 0.4 * 0.3) < 0.01


def test_speculative_sampling_has_the_main_models_distribution(small_overrides):
    """Many seeds of one prompt: the 1st and 2nd sampled tokens follow the exact main-model
    marginals (computed by enumerating the first token), with and without speculation."""
    model = _model(small_overrides, ["model.vocab_size=6", "model.pad_token_id=0"], seed=3)
    prompt, temperature, n = [1, 2, 3, 4], 1.5, 3000
    p1 = np.asarray(jax.nn.softmax(model(jnp.asarray([prompt])).logits[0, -1] / temperature))
    ext = jnp.asarray([prompt + [t] for t in range(6)])
    p2_given = np.asarray(jax.nn.softmax(model(ext).logits[:, -1] / temperature, axis=-1))
    p2 = p1 @ p2_given
    for speculative in (False, True):
        rows = [prompt] * n
        result = generate(model, rows, 3, temperature=temperature, seed=7, speculative=speculative)
        out = result.tokens
        # the reported log-probs are the sampling distribution's (the first token's is exact here)
        np.testing.assert_allclose(result.logprobs[:, 4], np.log(p1[out[:, 4]]), rtol=1e-4, atol=1e-5)
        for got, want in ((out[:, 4], p1), (out[:, 5], p2)):
            freq = np.bincount(got, minlength=6) / n
            chi2 = n * np.sum((freq - want) ** 2 / want)
            assert chi2 < 25, (speculative, freq, want)  # 5 dof: p < 1e-4 under the null


def test_processed_probs_top_k_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]] * 4))
    probs = np.asarray(processed_probs(logits, jnp.array([1.0, 1.0, 1.0, 0.0]), jnp.array([2, 0, 0, 0]),
                                       jnp.array([1.0, 0.8, 0.5, 1.0])))
    np.testing.assert_allclose(probs[0], [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0], atol=1e-6)  # top-2
    np.testing.assert_allclose(probs[1], np.array([0.5, 0.2, 0.15, 0, 0]) / 0.85, atol=1e-6)  # top-p 0.8
    np.testing.assert_allclose(probs[2], [1, 0, 0, 0, 0], atol=1e-6)  # top-p 0.5 keeps the first
    np.testing.assert_allclose(probs[3], [1, 0, 0, 0, 0])  # greedy


def test_slot_engine_continuous_batching_matches_generate(small_overrides):
    """Requests join and leave while others decode; each one's output equals `generate` alone."""
    model = _coin_flip_model(small_overrides)
    requests = {"a": ([1, 2, 3], 9), "b": ([4], 14), "c": ([5, 5, 1, 2, 3, 4], 6), "d": ([2, 3], 11)}
    for speculative in (False, True):
        engine = SlotEngine(model, num_slots=2, max_seq_len=32, speculative=speculative)
        alone = generate(model, [p for p, _ in requests.values()], 14, speculative=speculative).tokens
        want = {k: alone[i, len(p): len(p) + n].tolist() for i, (k, (p, n)) in enumerate(requests.items())}
        queue, slots, got, finished = list(requests), {}, {k: [] for k in requests}, set()
        while len(finished) < len(requests):
            while queue and engine.free_slots():
                key, slot = queue.pop(0), engine.free_slots()[0]
                engine.insert(slot, requests[key][0], max_new_tokens=requests[key][1], sampling=SamplingParams())
                slots[slot] = key
            for slot, update in engine.step().items():
                got[slots[slot]] += update.new_tokens
                if update.finished:
                    assert update.finish_reason == "length"
                    finished.add(slots[slot])
                    engine.release(slot)
        assert got == want
    with pytest.raises(ValueError, match="exceeds the context"):
        engine.insert(0, [1] * 30, max_new_tokens=5)
    with pytest.raises(ValueError, match="not free"):
        engine.insert(0, [1], max_new_tokens=2)
        engine.insert(0, [1], max_new_tokens=2)


def test_slot_engine_stop_token_and_cancel(small_overrides):
    model = _model(small_overrides)
    free = generate(model, [[5, 6, 7]], 8).tokens[0, 3:].tolist()
    engine = SlotEngine(model, num_slots=3, max_seq_len=24, speculative=False)
    engine.insert(0, [5, 6, 7], max_new_tokens=8, sampling=SamplingParams(), stop_token_ids=[free[2]])
    engine.insert(2, [5, 6, 7], max_new_tokens=8, sampling=SamplingParams())
    engine.release(2)  # cancelled before it ran: slot 0 is unaffected
    out, update = [], None
    while update is None or not update.finished:
        update = engine.step()[0]
        out += update.new_tokens
    assert out == free[: free.index(free[2]) + 1] and update.finish_reason == "stop"
    assert engine.step() == {} and sorted(engine.free_slots()) == [1, 2]
