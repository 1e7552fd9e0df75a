"""The paper's single-sample MOPD advantage against the exact top-K reverse KL (mopd.teacher_top_k),
on one domain, measured where sampling cannot blur it: the exact reverse KL on held-out prompts at
the second answer token, after the teacher's own first answer token.

    python benchmarks/mopd_estimators.py                      # after benchmarks/mopd_demo.py
    python benchmarks/mopd_estimators.py --learning-rate 1e-4 --steps 60 --markdown docs/mopd_estimators.md

Both runs start from the same student, sample the same prompts and take the same Adam steps (b2
0.999, a 10-step warm-up); only the loss differs. The held-out KL at the *first* answer token is
printed too: a student that already agrees with the teacher there should stay put.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

import jax
import jax.numpy as jnp
import optax
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mimo_jax import mopd  # noqa: E402
from mimo_jax.checkpoint import load_model  # noqa: E402
from mimo_jax.config import load_config  # noqa: E402
from mimo_jax.tokenization import make_tokenizer  # noqa: E402

DEMO = "runs/mopd_demo"


def held_out_kl(model, prompts_BT, teacher_model) -> list[float]:
    """[KL at the first answer token, KL at the second (after the teacher's first)], averaged."""
    out, ids = [], prompts_BT
    for _ in range(2):
        teacher_logp = jax.nn.log_softmax(teacher_model(ids).logits[:, -1])
        student_logp = jax.nn.log_softmax(model(ids).logits[:, -1])
        out.append(float(jnp.mean(jnp.sum(jnp.exp(student_logp) * (student_logp - teacher_logp), -1))))
        ids = jnp.concatenate([ids, jnp.argmax(teacher_logp, -1)[:, None].astype(ids.dtype)], axis=1)
    return out


def run(top_k: int, args, tokenizer, train_records, eval_ids) -> list[tuple[int, list[float]]]:
    cfg = load_config(os.path.join(ROOT, "configs/mopd_demo.yaml"),
                      [f"mopd.teacher_top_k={top_k}", f"mopd.rollouts_per_prompt={args.rollouts}"]).mopd
    student = load_model(os.path.join(ROOT, args.student), jnp.float32)
    teacher = load_model(os.path.join(ROOT, args.teacher), jnp.float32)
    graphdef, params, rest = nnx.split(student, nnx.Param, ...)
    t_graphdef, t_params = nnx.split(teacher)
    score = mopd.teacher_scorer(t_graphdef, top_k)
    tx = optax.adam(optax.linear_schedule(0.0, args.learning_rate, 10), b2=0.999)
    opt_state = tx.init(params)

    def loss_fn(p, ids, seg, inputs):
        return mopd.mopd_objective(nnx.merge(graphdef, p, rest)(ids, seg), ids, inputs, cfg)[0]

    @jax.jit
    def step(p, state, ids, seg, inputs):
        grads = jax.grad(loss_fn)(p, ids, seg, inputs)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    rng, curve = random.Random(args.seed), []
    for i in range(args.steps + 1):
        if i % args.every == 0:
            curve.append((i, held_out_kl(nnx.merge(graphdef, params, rest), eval_ids, teacher)))
            print(f"teacher_top_k={top_k} step {i}: held-out KL first token {curve[-1][1][0]:.3f}, "
                  f"second token {curve[-1][1][1]:.3f}", flush=True)
        if i == args.steps:
            break
        batch = mopd.rollout_batch(nnx.merge(graphdef, params, rest), tokenizer,
                                   rng.sample(train_records, args.prompts), cfg, args.seq_len, seed=i)
        ids, seg = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["segment_ids"])
        inputs = {name: jnp.asarray(batch[name]) for name in ("completion_mask", "sample_logprobs")}
        inputs.update(score(t_params, ids, seg))
        inputs["outcome_advantage"] = jnp.zeros(ids.shape)
        params, opt_state = step(params, opt_state, ids, seg, inputs)
    return curve


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", default=f"{DEMO}/student_base")
    parser.add_argument("--teacher", default=f"{DEMO}/teacher_addition")
    parser.add_argument("--domain", default="addition")
    parser.add_argument("--prompts-file", default=f"{DEMO}/data/prompts.jsonl")
    parser.add_argument("--eval-prompts-file", default=f"{DEMO}/data/eval_prompts.jsonl")
    parser.add_argument("--top-k", type=int, default=16, help="the exact form's K")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10, help="measure every this many steps")
    parser.add_argument("--prompts", type=int, default=128, help="prompts per step")
    parser.add_argument("--rollouts", type=int, default=2, help="rollouts per prompt")
    parser.add_argument("--seq-len", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", help="write the table here")
    args = parser.parse_args(argv)

    tokenizer = make_tokenizer(load_config(os.path.join(ROOT, "configs/mopd_demo.yaml")).data)
    train_records = [r for r in mopd.load_prompts(os.path.join(ROOT, args.prompts_file)) if r["domain"] == args.domain]
    encoded = [tokenizer.encode(r["prompt"]) for r in mopd.load_prompts(os.path.join(ROOT, args.eval_prompts_file))
               if r["domain"] == args.domain]
    length = max(set(map(len, encoded)), key=[len(e) for e in encoded].count)  # one shape: the commonest length
    eval_ids = jnp.asarray([e for e in encoded if len(e) == length], jnp.int32)
    curves = {k: run(k, args, tokenizer, train_records, eval_ids) for k in (0, args.top_k)}
    header = (f"Held-out reverse KL to the {args.domain} teacher at the second answer token (first in brackets), "
              f"{len(eval_ids)} prompts; lr {args.learning_rate:g}, {args.prompts} prompts x {args.rollouts} "
              f"rollouts per step.")
    table = ["| step | sampled-token advantage (teacher_top_k=0) | exact top-%d KL |" % args.top_k, "|---|---|---|"]
    for (step, sampled), (_, exact) in zip(curves[0], curves[args.top_k]):
        table.append(f"| {step} | {sampled[1]:.3f} ({sampled[0]:.3f}) | {exact[1]:.3f} ({exact[0]:.3f}) |")
    print("\n" + header + "\n\n" + "\n".join(table))
    if args.markdown:
        with open(os.path.join(ROOT, args.markdown), "w", encoding="utf-8") as f:
            f.write("# MOPD estimators (generated by benchmarks/mopd_estimators.py)\n\n" + header + "\n\n"
                    + "\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
