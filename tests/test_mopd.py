"""Multi-teacher on-policy distillation (mimo_jax.mopd)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mimo_jax import MiMoV2Flash, load_config
from mimo_jax.config import ConfigError, MOPDConfig
from mimo_jax.mopd import (group_advantages, load_prompts, mopd_loss, next_token_logprobs, resolve_reward,
                           token_logprobs, top_k_reverse_kl)

def _numpy_mopd(student, mask, sample, teacher, outcome, eps_low, eps_high, alpha):
    ratio = np.exp(student - sample)
    kept = (ratio >= eps_low) & (ratio <= eps_high)
    w = np.where(kept, ratio, 0.0)
    adv = (teacher - student) + alpha * outcome
    tokens = mask.sum(1)
    per_row = -(w * adv * student * mask).sum(1) / np.maximum(tokens, 1)
    rows = tokens > 0
    return per_row[rows].mean(), ((~kept) * mask).sum(1), ((student - teacher) * mask).sum(1)


def test_loss_weights_and_masking_match_numpy():
    rng = np.random.default_rng(0)
    b, t = 5, 7
    student = -rng.uniform(0.1, 3, (b, t)).astype(np.float32)
    sample = student + rng.normal(0, 0.8, (b, t)).astype(np.float32)  # some ratios leave [0.5, 2]
    teacher = -rng.uniform(0.1, 3, (b, t)).astype(np.float32)
    outcome = np.repeat(rng.normal(size=(b, 1)), t, 1).astype(np.float32)
    mask = (rng.uniform(size=(b, t)) < 0.7).astype(np.float32)
    mask[2] = 0  # a rollout with no completion tokens does not count
    cfg = MOPDConfig(eps_low=0.5, eps_high=2.0, outcome_weight=0.3)
    loss, metrics = mopd_loss(*(jnp.asarray(x) for x in (student, mask, sample, teacher, outcome)), cfg)
    want_loss, want_masked, want_kl = _numpy_mopd(student, mask, sample, teacher, outcome, 0.5, 2.0, 0.3)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["row_masked"], want_masked)
    np.testing.assert_allclose(metrics["row_reverse_kl"], want_kl, rtol=1e-5)
    assert 0 < want_masked.sum() < mask.sum()  # the two-sided mask did drop some tokens, not all


def test_group_advantages_are_grpo_normalised():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, 4)
    np.testing.assert_allclose(adv[:4], [1, -1, -1, 1], atol=1e-5)
    np.testing.assert_allclose(adv[4:], 0, atol=1e-6)  # a group that all agree carries no signal


def test_reverse_kl_gradient_matches_the_analytic_one(small_overrides):
    """Summing the surrogate over every next token y weighted by pi(y) (the on-policy expectation,
    w = 1) gives exactly the gradient of KL(pi(.|x) || pi_teacher(.|x)) at that position."""
    cfg = load_config("tiny", [*small_overrides, "model.vocab_size=6", "model.num_mtp_heads=0"]).model
    student, teacher = MiMoV2Flash(cfg, rngs=nnx.Rngs(1)), MiMoV2Flash(cfg, rngs=nnx.Rngs(2))
    graphdef, params = nnx.split(student)
    context = [1, 4, 2, 5]
    rows = jnp.asarray([context + [y] for y in range(6)], jnp.int32)
    teacher_logp, _ = token_logprobs(teacher(rows).logits, rows)
    mask = jnp.zeros(rows.shape).at[:, -1].set(1.0)
    mopd_cfg = MOPDConfig(eps_low=0.5, eps_high=2.0)

    def surrogate(p):
        logits = nnx.merge(graphdef, p)(rows).logits
        logp, _ = token_logprobs(logits, rows)
        pi = jax.lax.stop_gradient(jnp.exp(logp[:, -1]))
        losses = [mopd_loss(logp[y:y + 1], mask[y:y + 1], jax.lax.stop_gradient(logp[y:y + 1]), teacher_logp[y:y + 1],
                            jnp.zeros((1, rows.shape[1])), mopd_cfg)[0] for y in range(6)]
        return sum(pi[y] * losses[y] for y in range(6))

    def reverse_kl(p):
        logp = jax.nn.log_softmax(nnx.merge(graphdef, p)(rows[:1]).logits[0, len(context) - 1])
        return jnp.sum(jnp.exp(logp) * (logp - teacher_logp[:, -1]))

    # mopd.teacher_top_k = vocab: the loss of any one rollout is that KL itself, no sum over y needed.
    teacher_full = next_token_logprobs(teacher(rows[:1]).logits)
    top_logp, top_ids = jax.lax.top_k(teacher_full, 6)

    def top_k_loss(p):
        logits = nnx.merge(graphdef, p)(rows[:1]).logits
        logp, _ = token_logprobs(logits, rows[:1])
        position_kl = top_k_reverse_kl(next_token_logprobs(logits), top_logp, top_ids)
        return mopd_loss(logp, mask[:1], jax.lax.stop_gradient(logp), teacher_logp[:1], jnp.zeros((1, rows.shape[1])),
                         dataclasses.replace(mopd_cfg, teacher_top_k=6), position_kl)[0]

    want = jax.jit(jax.grad(reverse_kl))(params)
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(want))
    assert scale > 1e-4
    for got in (jax.jit(jax.grad(surrogate))(params), jax.jit(jax.grad(top_k_loss))(params)):
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, w, atol=1e-5 * scale)
    np.testing.assert_allclose(top_k_loss(params), reverse_kl(params), rtol=1e-5)


def test_top_k_reverse_kl_lumps_the_rest_of_the_vocabulary():
    """KL between the two distributions coarse-grained to {the teacher's top K tokens, the rest};
    with K = vocab it is the full KL."""
    rng = np.random.default_rng(1)
    b, t, v, k = 2, 3, 9, 4
    student = np.log(rng.dirichlet(np.ones(v), (b, t))).astype(np.float32)
    teacher = np.log(rng.dirichlet(np.ones(v), (b, t))).astype(np.float32)
    top_ids = np.argsort(-teacher, -1)[..., :k]
    top_teacher = np.take_along_axis(teacher, top_ids, -1)
    s_top = np.exp(np.take_along_axis(student, top_ids, -1))
    s_rest, t_rest = 1 - s_top.sum(-1), 1 - np.exp(top_teacher).sum(-1)
    want = (s_top * (np.log(s_top) - top_teacher)).sum(-1) + s_rest * (np.log(s_rest) - np.log(t_rest))
    got = top_k_reverse_kl(jnp.asarray(student), jnp.asarray(top_teacher), jnp.asarray(top_ids, jnp.int32))
    np.testing.assert_allclose(got, want, rtol=1e-4)
    all_ids = np.argsort(-teacher, -1)
    full = top_k_reverse_kl(jnp.asarray(student), jnp.asarray(np.take_along_axis(teacher, all_ids, -1)),
                            jnp.asarray(all_ids, jnp.int32))
    np.testing.assert_allclose(full, (np.exp(student) * (student - teacher)).sum(-1), rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(got) < np.asarray(full) + 1e-6)  # coarse-graining never raises a KL


def test_prompts_and_rewards_are_checked(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "1+1=", "domain": "add"}\n{"prompt": 3}\n')
    with pytest.raises(ConfigError, match=r"p.jsonl:2: needs string fields"):
        load_prompts(str(bad))
    assert resolve_reward("exact_match")("1+1=", "2\n", "2") == 1.0
    assert resolve_reward("mimo_jax.mopd:exact_match")("x", "3", "2") == 0.0
    with pytest.raises(ConfigError, match="neither one of"):
        resolve_reward("nope")
    with pytest.raises(ConfigError, match="domain=value"):
        MOPDConfig(teachers=("no_equals_sign",))


def _mopd_run(tmp_path, small_overrides):
    """(teacher directory, train.py overrides of a small MOPD run whose student starts from it)."""
    from mimo_jax import save_hf

    base = [*small_overrides, "model.vocab_size=260", "train.seq_len=32", "train.log_every=1"]
    teacher = str(tmp_path / "teacher")
    save_hf(MiMoV2Flash(load_config("tiny", base).model, rngs=nnx.Rngs(5)), teacher)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "domain": d, "answer": str(2 * a)}) + "\n"
                               for a, d in [(1, "add"), (2, "add"), (3, "echo"), (4, "echo")]))
    mopd = [*base, "train.mode=mopd", f"mopd.prompts={prompts}", f"mopd.eval_prompts={prompts}",
            f"mopd.teachers=[add={teacher}, echo={teacher}]", "mopd.rewards=[add=exact_match]",
            "mopd.prompts_per_step=2", "mopd.rollouts_per_prompt=2", "mopd.max_new_tokens=4",
            "train.eval_every=0", "train.checkpoint_every=2", f"train.init_from={teacher}"]
    return teacher, mopd


def test_train_py_mopd_end_to_end(tmp_path, small_overrides, monkeypatch, capsys):
    """`train.py ... train.mode=mopd` from a HF-directory teacher, through the shared loop's guards:
    SIGTERM mid-run saves a checkpoint and returns 0; the resume continues from it with per-domain
    metrics and a checkpoint that load_checkpoint reads; a non-finite loss stops the run with the
    last checkpoint kept and the metrics of the bad step."""
    import signal

    from mimo_jax import mopd as mopd_module
    from mimo_jax.training import load_checkpoint, main

    teacher, mopd = _mopd_run(tmp_path, small_overrides)
    student = tmp_path / "student"
    rollouts = mopd_module.rollout_batch

    def rollouts_then_sigterm(model, tokenizer, records, cfg, seq_len, seed):
        batch = rollouts(model, tokenizer, records, cfg, seq_len, seed)
        if seed % 1_000_003 == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # during step 1: the loop finishes it, saves, exits
        return batch

    monkeypatch.setattr(mopd_module, "rollout_batch", rollouts_then_sigterm)
    assert main(["--config", "tiny", "--workdir", str(student), *mopd, "train.steps=50",
                 "train.checkpoint_every=50"]) == 0
    assert "saved checkpoint 1, exiting" in capsys.readouterr().err
    assert sorted(p.name for p in (student / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]

    monkeypatch.setattr(mopd_module, "rollout_batch", rollouts)
    # The resume also switches to the top-k KL (its inputs are [B, T, K]); the state is the same.
    main(["--config", "tiny", "--workdir", str(student), *mopd, "train.steps=3", "mopd.teacher_top_k=8"])
    lines = [json.loads(line) for line in open(student / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [0, 1, 2, 3]
    assert set(lines[0]["eval_accuracy"]) == {"add", "echo"} and "eval_accuracy" in lines[-1]
    for record in lines[1:]:
        assert set(record["domains"]) <= {"add", "echo"} and np.isfinite(record["loss"])
        for m in record["domains"].values():
            assert {"reverse_kl", "teacher_argmax_agreement", "masked_fraction", "outcome_reward",
                    "rollout_length"} <= set(m)
            assert 0 <= m["teacher_argmax_agreement"] <= 1 and 0 <= m["masked_fraction"] <= 1
    assert load_checkpoint(str(student)).config.vocab_size == 260
    with pytest.raises(ConfigError, match=r"\['echo'\] have no teacher"):
        main(["--config", "tiny", "--workdir", str(tmp_path / "x"), *mopd, f"mopd.teachers=[add={teacher}]"])

    objective = mopd_module.mopd_objective
    monkeypatch.setattr(mopd_module, "mopd_objective",
                        lambda *args: (lambda loss, metrics: (loss * jnp.nan, metrics))(*objective(*args)))
    with pytest.raises(FloatingPointError, match="loss became nan at step 4; the last checkpoint is kept"):
        main(["--config", "tiny", "--workdir", str(student), *mopd, "train.steps=5", "train.checkpoint_every=1"])
    assert max(int(p.name) for p in (student / "checkpoints").iterdir() if p.name.isdigit()) == 3
    lines = [json.loads(line) for line in open(student / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [0, 1, 2, 3, 4] and not np.isfinite(lines[-1]["loss"])
