"""train.py starting sharded on 8 CPU devices, from scratch and from a Hugging Face FP8 checkpoint,
against the same runs on one device.

    python benchmarks/sharded_start.py --out docs/sharded_start.md   # configs/cpu_1b.yaml: ~20 min, 2 cores
    python benchmarks/sharded_start.py --quick                       # a 2-layer toy of it, ~2 minutes

1. An FP8 checkpoint (`save_hf(model, dir, "fp8")`: e4m3 with 128x128 block scales, the release's
   layout) of a fresh model at the config's seed, written by a subprocess so its host copy is freed.
2. Four `train.py --config configs/cpu_1b.yaml model.param_dtype=bfloat16` runs (fp32 compute) for
   `train.steps` steps, each a subprocess with its own device count
   (XLA_FLAGS=--xla_force_host_platform_device_count): from scratch and with
   `train.init_from=<the FP8 checkpoint>`, each on 8 devices (`mesh.tensor=8`: every large weight
   and its Adam moments split 8 ways from their creation, `checkpoint.initial_model`) and on 1.
3. The table: each run's losses (from its metrics.jsonl), the largest difference between the
   sharded and the one-device losses, wall time and the process's peak host memory.

The memory of the sharded start itself is checked by tests/test_checkpoint.py (the compiled
initializer's per-device output and temporaries on the same config).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(1, HERE)  # benchmarks/machine.py, also when this file is imported rather than run

from machine import cpu_name  # noqa: E402

CONFIG = "configs/cpu_1b.yaml"
QUICK = ["model.hidden_size=256", "model.num_layers=2", "model.layer_types=[global, swa]",
         "model.mlp_types=[dense, moe]", "model.intermediate_size=512", "model.moe_intermediate_size=128",
         "model.num_experts=16", "model.vocab_size=4096"]
# The 8 simulated devices share one host's memory, where any weight a mesh gathers or replicates
# exists 8 times: FSDP's per-layer all-gathers (the default mesh, or fsdp=2 x expert=4) ran this
# 24 GiB machine out of memory in the first step. Tensor parallelism over all 8 splits every large
# weight 8 ways along its heads, FFN width or vocabulary and gathers none (the activations are
# small here).
SHARDED_MESH = ["mesh.fsdp=1", "mesh.tensor=8"]
# bf16 parameters halve the state the 8-device step holds (fp32 compute): with fp32 ones it needs
# more than this 24 GiB host.
RUN_OVERRIDES = ["model.param_dtype=bfloat16"]
# XLA:CPU's default, concurrency-optimised scheduler holds every parameter's gradient and optimizer
# temporaries at once; the plain one cuts a step's temporaries by a third (per device 2.41 -> 1.57 GB
# on an earlier 1.5B version of the config, which did not fit this host even so; 1.15 GB on this one).
LEAN_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
# The losses of a sharded and a one-device run differ by float rounding only: XLA sums in another
# order on 8 devices, and the sampler of a sharded init is fused differently (docs/training.md).
LOSS_RTOL = 1e-5
EXPORT = """
import sys
from flax import nnx
from mimo_jax import MiMoV2Flash, load_config, save_hf
cfg = load_config(sys.argv[1], sys.argv[3:])
save_hf(MiMoV2Flash(cfg.model, rngs=nnx.Rngs(cfg.train.seed)), sys.argv[2], "fp8", progress=False)
"""


def log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {LEAN_SCHEDULER}",
               ALLOW_MULTIPLE_LIBTPU_LOAD="1", PYTHONUNBUFFERED="1")
    return env


def _run(argv: list[str], devices: int, log_path: str) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of one subprocess; raises with its log's tail if it fails."""
    start = time.perf_counter()
    with open(log_path, "w") as f:
        proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=_env(devices), stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        with open(log_path, errors="replace") as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"{' '.join(argv)} on {devices} device(s) exited {code}; {log_path} ends:\n{tail}")
    return seconds, usage.ru_maxrss / 2**20  # KiB on Linux


def losses(workdir: str) -> list[float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f if '"loss"' in line]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="markdown table (default: print it)")
    parser.add_argument("--quick", action="store_true", help="a 2-layer toy of the config (a smoke run)")
    parser.add_argument("--keep", default=None, help="keep the checkpoint and workdirs in this directory")
    args = parser.parse_args(argv)
    overrides = RUN_OVERRIDES + (QUICK if args.quick else [])
    root = args.keep or tempfile.mkdtemp(prefix="sharded_start_")
    os.makedirs(root, exist_ok=True)
    try:
        fp8_dir = os.path.join(root, "hf_fp8")
        log(f"exporting a fresh {CONFIG} model as an FP8 Hugging Face checkpoint to {fp8_dir}")
        export_s, export_gib = _run(["-c", EXPORT, CONFIG, fp8_dir, *overrides], 1, os.path.join(root, "export.log"))
        fp8_bytes = sum(os.path.getsize(os.path.join(fp8_dir, n)) for n in os.listdir(fp8_dir))
        rows = {}
        for source, extra in (("scratch", []), ("HF FP8", [f"train.init_from={fp8_dir}"])):
            for devices in (8, 1):
                workdir = os.path.join(root, f"{source.replace(' ', '_')}_{devices}")
                log(f"train.py from {source} on {devices} device(s) -> {workdir}")
                mesh = SHARDED_MESH if devices > 1 else []
                seconds, gib = _run(["train.py", "--config", CONFIG, "--workdir", workdir, *overrides, *mesh, *extra],
                                    devices, workdir + ".log")
                rows[source, devices] = (losses(workdir), seconds, gib)
                shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)  # gigabytes each
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    text = table(rows, overrides, export_s, export_gib, fp8_bytes)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        log(f"wrote {args.out}")
    else:
        print(text)
    worst = max(_rel_gap(rows[s, 8][0], rows[s, 1][0]) for s in ("scratch", "HF FP8"))
    return 0 if worst <= LOSS_RTOL else 1


def _rel_gap(a: list[float], b: list[float]) -> float:
    if len(a) != len(b) or not a:
        return float("inf")
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def table(rows, overrides, export_s, export_gib, fp8_bytes) -> str:
    from mimo_jax.config import load_config  # here, not at the top: the runs are subprocesses, --help needs no jax
    from mimo_jax.params import count_params

    cfg = load_config(CONFIG, overrides)
    counts = count_params(cfg.model)
    total = counts["main"] + counts["mtp"]
    quick = overrides != RUN_OVERRIDES
    command = f"python benchmarks/sharded_start.py{' --quick' if quick else ''} --out docs/sharded_start.md"
    lines = [
        "# Sharded start on 8 CPU devices (generated by benchmarks/sharded_start.py)", "",
        f"`train.py --config {CONFIG} {' '.join(RUN_OVERRIDES)}`{' with the --quick overrides' if quick else ''}: "
        f"{total / 1e9:.2f}B parameters ({total:,} with the MTP head), {cfg.model.param_dtype} parameters, "
        f"{cfg.model.dtype} compute, "
        f"{cfg.train.moment_dtype or cfg.model.param_dtype} Adam moments, batch {cfg.train.batch_size} x "
        f"{cfg.train.seq_len}, {cfg.train.steps} steps. Each run is its own process with its own device count; "
        f"8 devices use the mesh `{' '.join(SHARDED_MESH)}`: every large weight and its moments are created in "
        "their eighths (heads, FFN width, vocabulary) and none is gathered; a mesh that gathers weights (FSDP) "
        "would hold 8 copies of a layer's experts in this one host's memory. The FP8 checkpoint is a fresh model "
        "at the config's seed "
        "written by `save_hf(..., \"fp8\")` "
        f"({fp8_bytes / 2**30:.2f} GiB on disk, {export_s:.0f} s, peak {export_gib:.1f} GiB host memory).", "",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores; "
        f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "", "Made with (CI runs its `--help`):", "",
        "<!-- doc-test: reduced python benchmarks/sharded_start.py --help -->",
        "```bash", command, "```", "",
        "| start | devices | losses by step | largest relative difference from 1 device | wall | peak host memory |",
        "|---|---|---|---|---|---|",
    ]
    for (source, devices), (loss, seconds, gib) in rows.items():
        gap = "-" if devices == 1 else f"{_rel_gap(loss, rows[source, 1][0]):.1e}"
        lines.append(f"| {source} | {devices} | {', '.join(f'{x:.6f}' for x in loss)} | {gap} | {seconds:.0f} s | "
                     f"{gib:.1f} GiB |")
    lines += ["", f"The sharded losses equal the one-device ones to {LOSS_RTOL:g} relative (float rounding: XLA "
              "sums in another order on 8 devices). Peak host memory is the whole process (8 CPU devices share "
              "one host), so it does not show the per-device split; tests/test_checkpoint.py checks that on "
              "the compiled initializer.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
