"""Multi-teacher on-policy distillation (MOPD, paper section 4.4): `train.py ... train.mode=mopd`.

One step:
1. Sample prompts (each has a domain) and `rollouts_per_prompt` student rollouts per prompt with
   `inference.generate` (the decode path), keeping the sampler's log-probs mu(y_t).
2. The teacher of each prompt's domain scores every rollout token in one forward (a prefill).
3. The student's training forward (the same `model(...)` call) gives log pi(y_t), and

       A_t  = sg[log pi_teacher(y_t) - log pi(y_t)] + alpha * A_outcome     (A_outcome: GRPO-normalised)
       w_t  = sg[pi(y_t) / mu(y_t)] if eps_low <= pi/mu <= eps_high else 0
       loss = -mean over rollouts of (1/|y|) sum_t w_t A_t log pi(y_t)          (paper eq. 7-9)

Its gradient is the reverse-KL policy gradient -E[log(pi_T / pi) grad log pi] (eq. 6), importance
weighted. Per-domain metrics: reverse KL to the teacher (per token, on the student's samples), the
student/teacher argmax agreement, the outcome reward, the masked-token fraction, rollout length.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimo_jax import sharding
from mimo_jax.checkpoint import load_model
from mimo_jax.config import Config, ConfigError, MOPDConfig
from mimo_jax.inference import generate
from mimo_jax.run_loop import RunMode, run
from mimo_jax.serving import load_served
from mimo_jax.train_step import Objective

# The per-token arrays a MOPD train step takes after input_ids and segment_ids, in this order; the
# top-k ones ([B, T, K]) only with mopd.teacher_top_k > 0.
MOPD_INPUTS = ("completion_mask", "sample_logprobs", "teacher_logprobs", "teacher_argmax", "outcome_advantage")
TOP_K_INPUTS = ("teacher_top_logprobs", "teacher_top_ids")


def mopd_inputs(cfg: MOPDConfig) -> tuple[str, ...]:
    return MOPD_INPUTS + (TOP_K_INPUTS if cfg.teacher_top_k else ())


# ---------------------------------------------------------------------------------------------
# Prompts and rewards


def load_prompts(path: str) -> list[dict]:
    """JSONL records with "prompt" and "domain" (strings) and an optional "answer"."""
    if not os.path.isfile(path):
        raise ConfigError(f"mopd prompts {path}: no such file")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{line_no}: not JSON ({e})") from None
            if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("prompt", "domain")):
                raise ConfigError(f"{path}:{line_no}: needs string fields \"prompt\" and \"domain\"")
            if not isinstance(record.get("answer", ""), str):
                raise ConfigError(f"{path}:{line_no}: \"answer\" must be a string")
            records.append(record)
    if not records:
        raise ConfigError(f"{path}: no prompts")
    return records


def exact_match(prompt: str, completion: str, answer: str) -> float:
    """1.0 when the completion (up to its first newline, stripped) is the answer."""
    del prompt
    return float(completion.split("\n", 1)[0].strip() == answer.strip())


REWARDS: dict[str, Callable[[str, str, str], float]] = {"exact_match": exact_match}


def resolve_reward(spec: str) -> Callable[[str, str, str], float]:
    """A name in REWARDS or "module:function" taking (prompt, completion, answer) -> float."""
    if spec in REWARDS:
        return REWARDS[spec]
    module, _, name = spec.partition(":")
    if not name:
        raise ConfigError(f"mopd.rewards: {spec!r} is neither one of {sorted(REWARDS)} nor \"module:function\"")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"mopd.rewards: cannot load {spec!r} ({e})") from None


# ---------------------------------------------------------------------------------------------
# The objective (pure functions; tests/test_mopd.py checks them against numpy)


def next_token_logprobs(logits_BTV):
    """[B, T, V]: log p(. | < t), from the logits of position t - 1 (zeros at t = 0, which nothing
    predicts)."""
    logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.concatenate([jnp.zeros_like(logp_BTV[:, :1]), logp_BTV], axis=1)


def token_logprobs(logits_BTV, ids_BT):
    """[B, T]: log p(ids[t] | < t) (0 at t = 0), and the argmax of position t - 1 (-1 at t = 0)."""
    picked = jnp.take_along_axis(next_token_logprobs(logits_BTV), ids_BT[..., None], axis=-1)[..., 0]
    argmax = jnp.argmax(logits_BTV[:, :-1], axis=-1).astype(jnp.int32)
    return picked, jnp.concatenate([jnp.full((ids_BT.shape[0], 1), -1, jnp.int32), argmax], axis=1)


def top_k_reverse_kl(student_logp_BTV, teacher_top_logp_BTK, teacher_top_ids_BTK):
    """[B, T]: KL(pi || pi_teacher) at each position over the teacher's top-K tokens plus one
    bucket holding the rest of the vocabulary (no bucket when K covers it: then the full KL)."""
    student_top_BTK = jnp.take_along_axis(student_logp_BTV, teacher_top_ids_BTK, axis=-1)
    kl_BT = jnp.sum(jnp.exp(student_top_BTK) * (student_top_BTK - teacher_top_logp_BTK), axis=-1)
    if teacher_top_ids_BTK.shape[-1] >= student_logp_BTV.shape[-1]:
        return kl_BT
    student_rest = jnp.clip(1.0 - jnp.exp(student_top_BTK).sum(-1), 0.0, 1.0)
    teacher_rest = jnp.clip(1.0 - jnp.exp(teacher_top_logp_BTK).sum(-1), 1e-30, 1.0)
    return kl_BT + jax.scipy.special.xlogy(student_rest, student_rest) - student_rest * jnp.log(teacher_rest)


def importance_weights(student_logp_BT, sample_logp_BT, eps_low: float, eps_high: float):
    """(w, kept): w = pi/mu where eps_low <= pi/mu <= eps_high, else 0 (no gradient through w)."""
    ratio = jnp.exp(jax.lax.stop_gradient(student_logp_BT) - sample_logp_BT)
    kept = (ratio >= eps_low) & (ratio <= eps_high)
    return jnp.where(kept, ratio, 0.0), kept


def group_advantages(rewards_R, group_size: int, eps: float = 1e-6):
    """GRPO: each reward minus its group's mean, over the group's standard deviation (rows come
    in groups of `group_size` rollouts of one prompt)."""
    r = np.asarray(rewards_R, np.float64).reshape(-1, group_size)
    return ((r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + eps)).reshape(-1).astype(np.float32)


def mopd_loss(student_logp_BT, completion_mask_BT, sample_logp_BT, teacher_logp_BT, outcome_advantage_BT,
              cfg: MOPDConfig, position_kl_BT=None):
    """(loss, per-row metrics) of eq. 7-9; rows without completion tokens do not count.

    With `position_kl_BT` (the exact per-position reverse KL, mopd.teacher_top_k > 0) that KL
    replaces the sampled token's distillation term at every kept position; the outcome term stays
    on the sampled tokens."""
    mask = completion_mask_BT.astype(jnp.float32)
    w, kept = importance_weights(student_logp_BT, sample_logp_BT, cfg.eps_low, cfg.eps_high)
    outcome = cfg.outcome_weight * outcome_advantage_BT
    if position_kl_BT is None:
        token_loss = -w * (jax.lax.stop_gradient(teacher_logp_BT - student_logp_BT) + outcome) * student_logp_BT
    else:
        token_loss = kept * position_kl_BT - w * outcome * student_logp_BT
    tokens_B = mask.sum(1)
    per_row = (token_loss * mask).sum(1) / jnp.maximum(tokens_B, 1.0)
    rows = (tokens_B > 0).astype(jnp.float32)
    loss = (per_row * rows).sum() / jnp.maximum(rows.sum(), 1.0)
    metrics = {
        "row_tokens": tokens_B,
        "row_reverse_kl": jax.lax.stop_gradient((student_logp_BT - teacher_logp_BT) * mask).sum(1),
        "row_masked": ((~kept) * mask).sum(1),
    }
    return loss, metrics


def mopd_objective(out, input_ids_BT, inputs: dict, cfg: MOPDConfig):
    """The train step's loss in mopd mode (see train_step.train_step_fn), from the model output and
    the step's `mopd_inputs(cfg)` by name."""
    student_logp_BT, student_argmax_BT = token_logprobs(out.logits, input_ids_BT)
    position_kl_BT = None
    if cfg.teacher_top_k:
        position_kl_BT = top_k_reverse_kl(next_token_logprobs(out.logits), inputs["teacher_top_logprobs"],
                                          inputs["teacher_top_ids"])
    loss, metrics = mopd_loss(student_logp_BT, inputs["completion_mask"], inputs["sample_logprobs"],
                              inputs["teacher_logprobs"], inputs["outcome_advantage"], cfg, position_kl_BT)
    agree = (student_argmax_BT == inputs["teacher_argmax"]) & (inputs["completion_mask"] > 0)
    return loss, {**metrics, "mopd_loss": loss, "row_agree": agree.sum(1).astype(jnp.float32)}


# ---------------------------------------------------------------------------------------------
# Rollouts and teacher scores


def rollout_batch(model, tokenizer, records: Sequence[dict], cfg: MOPDConfig, seq_len: int, seed: int) -> dict:
    """Student rollouts for `records` (each repeated rollouts_per_prompt times) as [R, seq_len] arrays."""
    prompts = [tokenizer.encode(r["prompt"]) for r in records for _ in range(cfg.rollouts_per_prompt)]
    longest = max(len(p) for p in prompts)
    if longest + cfg.max_new_tokens > seq_len:
        raise ConfigError(f"a prompt of {longest} tokens + mopd.max_new_tokens={cfg.max_new_tokens} exceeds "
                          f"train.seq_len={seq_len}")
    result = generate(model, prompts, cfg.max_new_tokens, temperature=cfg.temperature, seed=seed,
                      stop_token_ids=(tokenizer.eos_id,))
    rows, width = len(prompts), result.tokens.shape[1]
    ids = np.full((rows, seq_len), tokenizer.pad_id, np.int32)
    ids[:, :width] = result.tokens
    positions = np.arange(seq_len)
    prompt_len = np.array([len(p) for p in prompts])[:, None]
    length = result.lengths[:, None]
    sample_logp = np.zeros((rows, seq_len), np.float32)
    sample_logp[:, :width] = result.logprobs
    completions = [tokenizer.decode(ids[i, prompt_len[i, 0]: length[i, 0]]) for i in range(rows)]
    return {
        "input_ids": ids,
        "segment_ids": (positions < length).astype(np.int32),
        "completion_mask": ((positions >= prompt_len) & (positions < length)).astype(np.float32),
        "sample_logprobs": sample_logp,
        "completions": completions,
        "rollout_length": (length - prompt_len)[:, 0],
    }


def teacher_scorer(graphdef, top_k: int = 0):
    """jitted (params, ids, segment_ids) -> {name: array} for a teacher: log p(y_t) and the argmax
    at t - 1, plus, with top_k, the log-probs and ids of its top_k next tokens at each position."""

    @jax.jit
    def score(params, ids_BT, segment_ids_BT):
        logits = nnx.merge(graphdef, params)(ids_BT, segment_ids_BT).logits
        logp, argmax = token_logprobs(logits, ids_BT)
        scores = {"teacher_logprobs": logp, "teacher_argmax": argmax}
        if top_k:
            top_logp, top_ids = jax.lax.top_k(next_token_logprobs(logits), min(top_k, logits.shape[-1]))
            scores.update(teacher_top_logprobs=top_logp, teacher_top_ids=top_ids.astype(jnp.int32))
        return scores

    return score


# ---------------------------------------------------------------------------------------------
# Evaluation


def domain_accuracy(model, tokenizer, records: Sequence[dict], max_new_tokens: int, rewards: dict,
                    batch_size: int = 64) -> dict[str, float]:
    """Mean reward per domain of greedy completions (exact_match where no reward is configured)."""
    scores: dict[str, list[float]] = {}
    batch_size = min(batch_size, len(records))
    for start in range(0, len(records), batch_size):
        chunk = list(records[start: start + batch_size])
        chunk += [chunk[-1]] * (batch_size - len(chunk))  # one compiled shape
        prompts = [tokenizer.encode(r["prompt"]) for r in chunk]
        result = generate(model, prompts, max_new_tokens, stop_token_ids=(tokenizer.eos_id,))
        for i, record in enumerate(records[start: start + batch_size]):
            text = tokenizer.decode(result.tokens[i, len(prompts[i]): result.lengths[i]])
            reward = rewards.get(record["domain"], exact_match)
            scores.setdefault(record["domain"], []).append(reward(record["prompt"], text, record.get("answer", "")))
    return {domain: float(np.mean(v)) for domain, v in sorted(scores.items())}


def _per_domain(domains: Sequence[str], row_metrics: dict, rewards_R, lengths_R) -> dict:
    out = {}
    domains = np.asarray(domains)
    for domain in sorted(set(domains)):
        rows = domains == domain
        tokens = max(float(row_metrics["row_tokens"][rows].sum()), 1.0)
        out[domain] = {
            "reverse_kl": float(row_metrics["row_reverse_kl"][rows].sum()) / tokens,
            "teacher_argmax_agreement": float(row_metrics["row_agree"][rows].sum()) / tokens,
            "masked_fraction": float(row_metrics["row_masked"][rows].sum()) / tokens,
            "outcome_reward": float(np.mean(rewards_R[rows])),
            "rollout_length": float(np.mean(lengths_R[rows])),
        }
    return out


# ---------------------------------------------------------------------------------------------
# The loop


def mopd_objective_of(cfg: MOPDConfig) -> Objective:
    """The train step's objective in mopd mode: `mopd_objective` over the batch's `mopd_inputs`."""
    return Objective(lambda out, batch: mopd_objective(out, batch["input_ids"], batch, cfg), mopd_inputs(cfg))


def mopd_mode(cfg: Config, tokenizer, mesh, log) -> RunMode:
    """train.mode=mopd for `run_loop.run`: each step's batch is `prompts_per_step` x
    `rollouts_per_prompt` fresh student rollouts scored by their domains' teachers (the data
    position is the step number, so nothing but the step is checkpointed). The student starts from
    `train.init_from`; `train.batch_size` does not apply."""
    mcfg, tcfg = cfg.mopd, cfg.train
    if not mcfg.prompts or not mcfg.teachers:
        raise ConfigError("train.mode=mopd needs mopd.prompts and mopd.teachers")
    records = load_prompts(mcfg.prompts)
    teachers_by_domain = mcfg.mapping("teachers")
    missing = sorted({r["domain"] for r in records} - set(teachers_by_domain))
    if missing:
        raise ConfigError(f"{mcfg.prompts}: domains {missing} have no teacher in mopd.teachers")
    rewards = {d: resolve_reward(f) for d, f in mcfg.mapping("rewards").items()}
    if mcfg.outcome_weight and set(teachers_by_domain) - set(rewards):
        raise ConfigError(f"mopd.outcome_weight > 0 needs mopd.rewards for every domain; missing "
                          f"{sorted(set(teachers_by_domain) - set(rewards))}")
    eval_records = load_prompts(mcfg.eval_prompts) if mcfg.eval_prompts else []
    teachers = {}  # path -> (scorer, params sharded like the student's)
    for path in sorted(set(teachers_by_domain.values())):
        try:
            teacher = load_model(path, cfg.model.param_dtype)
        except FileNotFoundError as e:
            raise ConfigError(f"mopd teacher: {e}") from None
        t_graphdef, t_params = nnx.split(teacher)
        t_shardings = sharding.state_shardings(t_params, mesh, cfg.sharding)
        teachers[path] = (teacher_scorer(t_graphdef, mcfg.teacher_top_k), jax.device_put(t_params, t_shardings))
        log(f"teacher {path} for domains {sorted(d for d, p in teachers_by_domain.items() if p == path)}")

    def next_batch(step, model, place):
        pick = np.random.default_rng([tcfg.seed, step]).choice(len(records), mcfg.prompts_per_step,
                                                                replace=len(records) < mcfg.prompts_per_step)
        chosen = [records[i] for i in pick]
        batch = rollout_batch(model(), tokenizer, chosen, mcfg, tcfg.seq_len, seed=tcfg.seed * 1_000_003 + step)
        domains = [r["domain"] for r in chosen for _ in range(mcfg.rollouts_per_prompt)]
        answers = [r.get("answer", "") for r in chosen for _ in range(mcfg.rollouts_per_prompt)]
        prompts = [r["prompt"] for r in chosen for _ in range(mcfg.rollouts_per_prompt)]
        reward_R = np.array([rewards[d](p, c, a) if d in rewards else 0.0
                             for d, p, c, a in zip(domains, prompts, batch["completions"], answers)], np.float32)
        outcome = group_advantages(reward_R, mcfg.rollouts_per_prompt)
        ids, seg = place(batch["input_ids"]), place(batch["segment_ids"])
        host = {"completion_mask": batch["completion_mask"], "sample_logprobs": batch["sample_logprobs"],
                "outcome_advantage": np.broadcast_to(outcome[:, None], batch["input_ids"].shape).copy()}
        for path, (score, t_params) in teachers.items():  # each row keeps its own domain's teacher
            mine = np.array([teachers_by_domain[d] == path for d in domains])
            for name, value in score(t_params, ids, seg).items():
                value = np.asarray(value)
                host.setdefault(name, np.zeros_like(value))[mine] = value[mine]
        step_batch = {"input_ids": ids, "segment_ids": seg, **{name: place(host[name]) for name in mopd_inputs(mcfg)}}
        return step_batch, (domains, reward_R, batch["rollout_length"])

    def record(metrics, context):
        domains, reward_R, lengths = context
        row_metrics = {k: np.asarray(v) for k, v in metrics.items() if k.startswith("row_")}
        return {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                "domains": _per_domain(domains, row_metrics, reward_R, lengths)}

    def evaluate(step, model, place=None):
        if not eval_records:
            return {}
        per_domain = {}
        for domain in sorted({r["domain"] for r in eval_records}):
            subset = [r for r in eval_records if r["domain"] == domain][: mcfg.eval_max_prompts]
            per_domain.update(domain_accuracy(model(), tokenizer, subset, mcfg.max_new_tokens, rewards))
        log(f"step {step}: eval accuracy " + ", ".join(f"{d} {a:.3f}" for d, a in per_domain.items()))
        return {"eval_accuracy": per_domain}

    def progress(r, total):
        return f"step {r['step']}/{total} | loss {r['loss']:.4f} | " + " | ".join(
            f"{d}: rkl {m['reverse_kl']:.3f} agree {m['teacher_argmax_agreement']:.2f} "
            f"reward {m['outcome_reward']:.2f} masked {m['masked_fraction']:.3f} len {m['rollout_length']:.1f}"
            for d, m in r["domains"].items()) + f" | {r['step_seconds']:.2f} s"

    rows = mcfg.prompts_per_step * mcfg.rollouts_per_prompt
    if tcfg.batch_size != rows:
        log(f"mopd: a step is mopd.prompts_per_step x rollouts_per_prompt = {rows} rows; "
            f"train.batch_size={tcfg.batch_size} does not apply")
    return RunMode(objective=mopd_objective_of(mcfg), rows=rows,
                   next_batch=next_batch, record=record, evaluate=evaluate,
                   first_record=lambda model: evaluate(0, model), progress=progress)


def train_mopd(cfg: Config, workdir: str, log=print) -> list[dict]:
    """Runs (or resumes) MOPD in the shared loop (`run_loop.run`); checkpoints, config.yaml and
    metrics.jsonl are laid out as for train.py, so `load_checkpoint(workdir)` reads the result."""
    return run(cfg, workdir, mopd_mode, log)


def main(argv=None) -> int:
    """`python -m mimo_jax.mopd eval --prompts P.jsonl --model W1 [--model W2 ...]`: greedy
    accuracy per domain of each model (train.py workdirs or HF directories)."""
    parser = argparse.ArgumentParser(prog="python -m mimo_jax.mopd", description=main.__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="per-domain greedy accuracy")
    ev.add_argument("--prompts", required=True)
    ev.add_argument("--model", action="append", required=True, help="a workdir or HF directory (repeatable)")
    ev.add_argument("--max-new-tokens", type=int, default=16)
    ev.add_argument("--rewards", nargs="*", default=(), help="domain=fn (default exact_match)")
    args = parser.parse_args(argv)
    records = load_prompts(args.prompts)
    rewards = {d: resolve_reward(f) for d, f in (e.split("=", 1) for e in args.rewards)}
    domains = sorted({r["domain"] for r in records})
    print("| model | " + " | ".join(domains) + " |\n|---|" + "---|" * len(domains))
    for path in args.model:
        served = load_served(path)  # the model with its own tokenizer
        accuracy = domain_accuracy(served.model, served.tokenizer, records, args.max_new_tokens, rewards)
        print(f"| {path} | " + " | ".join(f"{accuracy[d]:.3f}" for d in domains) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
