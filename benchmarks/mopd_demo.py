"""The MOPD recipe end to end on CPU: two checkable domains, two teachers, one student.

    python benchmarks/mopd_demo.py                       # about 25 minutes on 2 cores
    python benchmarks/mopd_demo.py --markdown docs/mopd_demo.md

1. Data (runs/mopd_demo/data): 2-digit addition ("47+38=" -> "85") and string reversal
   ("rev:abcd=" -> "dcba"). 200 held-out prompts per domain never appear in training.
2. Student: train.py on a mix of both domains, stopped while it still makes mistakes on addition.
3. Teachers: from the student, one fine-tuned on each domain.
4. MOPD: train.py --config configs/mopd_demo.yaml (train.mode=mopd) from the student, each prompt
   scored by its domain's teacher.
5. Eval: `python -m mimo_jax.mopd eval` prints per-domain greedy exact-match accuracy of the
   student before and after MOPD and of each teacher.
Every stage is a command a user can run; the script prints each one before running it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import string
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/mopd_demo.yaml"
DEMO = "runs/mopd_demo"
DOMAINS = ("addition", "reversal")


def addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"{a}+{b}=", str(a + b)


def reversal(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
    return f"rev:{word}=", word[::-1]


TASKS = {"addition": addition, "reversal": reversal}


def write_jsonl(path: str, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def make_data(out: str, seed: int, train_examples: int) -> None:
    """Held-out eval prompts first, then training data that excludes them."""
    rng = random.Random(seed)
    os.makedirs(out, exist_ok=True)
    held_out, train = {d: {} for d in DOMAINS}, {d: [] for d in DOMAINS}
    for domain, task in TASKS.items():
        while len(held_out[domain]) < 200:
            prompt, answer = task(rng)
            held_out[domain][prompt] = answer
        while len(train[domain]) < train_examples:
            prompt, answer = task(rng)
            if prompt not in held_out[domain]:
                train[domain].append((prompt, answer))
    write_jsonl(f"{out}/eval_prompts.jsonl", ({"prompt": p, "domain": d, "answer": a}
                                               for d in DOMAINS for p, a in held_out[d].items()))
    write_jsonl(f"{out}/prompts.jsonl", ({"prompt": p, "domain": d, "answer": a}
                                          for d in DOMAINS for p, a in train[d]))
    for domain in DOMAINS:
        write_jsonl(f"{out}/{domain}.jsonl", ({"text": p + a} for p, a in train[domain]))
    mixed = [p + a for d in DOMAINS for p, a in train[d]]
    rng.shuffle(mixed)
    write_jsonl(f"{out}/mix.jsonl", ({"text": t} for t in mixed))


def run(cmd: list[str], timings: dict, label: str) -> str:
    print("\n$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True).stdout
    timings[label] = time.perf_counter() - start
    print(out[-3000:], flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student-steps", type=int, default=1000)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--mopd-steps", type=int, default=800)
    parser.add_argument("--also-sampled", action="store_true",
                        help="also run MOPD with the paper's single-sample advantage (mopd.teacher_top_k=0), for comparison")
    parser.add_argument("--train-examples", type=int, default=20000, help="per domain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", help="write the results table here")
    args = parser.parse_args(argv)

    python = sys.executable
    train = [python, "train.py", "--config", CONFIG]
    # The SFT stages: packed rows of 64 tokens at the usual pre-training rate and Adam b2.
    lm = ["train.mode=lm", 'train.init_from=""', "train.eval_every=0", "train.checkpoint_every=1000",
          "train.seq_len=64", "train.learning_rate=1e-3", "train.min_learning_rate=1e-4", "train.decay=cosine",
          "train.warmup_steps=10", "train.b2=0.95"]
    timings: dict[str, float] = {}
    start = time.perf_counter()
    for stage in ("student_base", "teacher_addition", "teacher_reversal", "student_mopd", "student_mopd_sampled"):
        if os.path.isdir(os.path.join(ROOT, DEMO, stage)):  # train.py would resume it instead
            print(f"removing {DEMO}/{stage} from an earlier run", flush=True)
            shutil.rmtree(os.path.join(ROOT, DEMO, stage))
    make_data(os.path.join(ROOT, DEMO, "data"), args.seed, args.train_examples)
    run([*train, "--workdir", f"{DEMO}/student_base", *lm, f"train.steps={args.student_steps}",
         f"data.paths=[{DEMO}/data/mix.jsonl]"], timings, "student (weak mix)")
    for domain in DOMAINS:
        run([*train, "--workdir", f"{DEMO}/teacher_{domain}", *lm, f"train.steps={args.teacher_steps}",
             f"train.init_from={DEMO}/student_base", f"data.paths=[{DEMO}/data/{domain}.jsonl]"],
            timings, f"teacher {domain}")
    run([*train, "--workdir", f"{DEMO}/student_mopd", f"train.steps={args.mopd_steps}"], timings, "MOPD")
    names = {f"{DEMO}/student_base": "student before MOPD", f"{DEMO}/teacher_addition": "teacher: addition",
             f"{DEMO}/teacher_reversal": "teacher: reversal", f"{DEMO}/student_mopd": "student after MOPD"}
    recipe_seconds = time.perf_counter() - start
    if args.also_sampled:
        run([*train, "--workdir", f"{DEMO}/student_mopd_sampled", f"train.steps={args.mopd_steps}",
             "mopd.teacher_top_k=0"], timings, "comparison: MOPD, sampled-token advantage")
        names[f"{DEMO}/student_mopd_sampled"] = "student after MOPD, sampled-token advantage (teacher_top_k=0)"
    models = list(names)
    table = run([python, "-m", "mimo_jax.mopd", "eval", "--prompts", f"{DEMO}/data/eval_prompts.jsonl",
                 "--max-new-tokens", "8", *sum((["--model", m] for m in models), [])], timings, "eval")
    recipe_seconds += timings["eval"]
    rows = [line for line in table.splitlines() if line.startswith("|")]
    accuracy = {line.split("|")[1].strip(): [float(x) for x in line.split("|")[2:-1]] for line in rows[2:]}
    best = [max(accuracy[f"{DEMO}/teacher_{d}"][i] for d in DOMAINS) for i in range(len(DOMAINS))]
    after = accuracy[f"{DEMO}/student_mopd"]
    ratio = ", ".join(f"{d} {a / b:.0%}" if b else f"{d} n/a (no teacher scores)" for d, a, b in zip(DOMAINS, after, best))
    summary = "\n".join([
        "| model | " + " | ".join(DOMAINS) + " |", "|---|---|---|",
        *(f"| {name} | " + " | ".join(f"{x:.3f}" for x in accuracy[path]) + " |" for path, name in names.items()),
        "",
        f"Student after MOPD / better teacher: {ratio}.",
        "",
        "| stage | seconds |", "|---|---|", *(f"| {k} | {v:.0f} |" for k, v in timings.items()),
        f"| the recipe (data to eval, without the comparison) | {recipe_seconds:.0f} |",
    ])
    print("\n" + summary)
    if args.markdown:
        with open(os.path.join(ROOT, args.markdown), "w", encoding="utf-8") as f:
            f.write("# MOPD demo results (generated by benchmarks/mopd_demo.py)\n\n"
                    f"Greedy exact-match accuracy on 200 held-out prompts per domain; steps: student "
                    f"{args.student_steps}, teachers {args.teacher_steps}, MOPD {args.mopd_steps}; "
                    f"{os.cpu_count()} CPU cores.\n\n" + summary + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
