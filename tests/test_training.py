"""train.py end to end on a very small model: exact resume after SIGKILL, the router-bias rule
balancing experts, metrics and plots, and CLI errors."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from tests.conftest import COMPILE_CACHE_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "model.vocab_size=259", "model.hidden_size=32", "model.num_layers=3", "model.layer_types=[global, swa, swa]",
    "model.mlp_types=[dense, moe, moe]", "model.qk_head_dim=24", "model.v_head_dim=16", "model.intermediate_size=48",
    "model.moe_intermediate_size=16", "model.num_experts=8", "model.num_experts_per_token=2",
    "model.sliding_window=7", "model.num_mtp_heads=2", "train.batch_size=4", "train.seq_len=32",
    "train.warmup_steps=0", "train.decay=constant", "train.learning_rate=3e-3", "train.eval_every=0",
    "train.eval_batches=2", "train.log_every=1", "mesh.fsdp=1",
]


def _train_cmd(workdir, *overrides):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config", "tiny", "--workdir", str(workdir), *SMALL,
            *overrides]


def _env():
    # Every train.py process here runs the same programs: compiled once, by the first (the cache), and
    # for compile time rather than speed (as in tests/test_distributed.py: both sides of each
    # comparison run the same program).
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=COMPILE_CACHE_DIR,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0 "
                         "--xla_llvm_disable_expensive_passes=true")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_resume_after_sigkill_gives_identical_losses(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_train_cmd(straight, "train.steps=8", "train.checkpoint_every=4"), env=_env(), check=True,
                   capture_output=True, timeout=300)
    # A long run, killed without warning once its step-4 checkpoint is committed.
    proc = subprocess.Popen(_train_cmd(killed, "train.steps=1000", "train.checkpoint_every=4"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "4" / "_CHECKPOINT_METADATA").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint at step 4"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(_train_cmd(killed, "train.steps=8", "train.checkpoint_every=4"), env=_env(),
                             capture_output=True, timeout=300, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    want, got = _losses(straight), _losses(killed)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == want[step], (step, got[step], want[step])


def test_router_bias_rule_lowers_expert_imbalance(tmp_path):
    from mimo_jax.config import load_config
    from mimo_jax.training import train

    def imbalance(rate, workdir):
        cfg = load_config("tiny", SMALL + ["train.steps=40", "train.checkpoint_every=1000", "train.balance_weight=0",
                                           f"train.bias_update_rate={rate}"])
        records = train(cfg, str(workdir), log=lambda _: None)
        return np.mean([r["expert_load_imbalance"] for r in records[-10:]])

    assert imbalance(1e-2, tmp_path / "on") < 0.9 * imbalance(0.0, tmp_path / "off")


def test_metrics_and_plot(tmp_path):
    from mimo_jax.config import load_config
    from mimo_jax.plot import plot
    from mimo_jax.training import train

    cfg = load_config("tiny", SMALL + ["train.steps=3", "train.checkpoint_every=1000", "train.eval_every=3"])
    seen = []
    records = train(cfg, str(tmp_path), log=lambda _: None, on_step=seen.append)
    assert seen == records and [r["step"] for r in seen] == [1, 2, 3]  # the notebook's live-plot hook
    for key in ("loss", "lm", "mtp", "mtp_top1", "mtp_agree", "expert_load_imbalance", "router_bias_norm", "grad_norm",
                "learning_rate", "tokens_per_second", "flops_per_second"):
        assert key in records[-1], key
    assert "eval_loss" in records[-1] and len(records[-1]["mtp"]) == 2
    png = plot(str(tmp_path))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # The checkpoint exports as a Hugging Face checkpoint with the same logits.
    import jax.numpy as jnp
    from flax import nnx

    from mimo_jax import MiMoV2Flash, load_hf, save_hf
    from mimo_jax.training import load_checkpoint

    trained = load_checkpoint(str(tmp_path))
    fresh = MiMoV2Flash(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
    assert not np.allclose(trained.embed[...], fresh.embed[...])
    save_hf(trained, str(tmp_path / "hf"), dtype=jnp.float32)
    ids = jnp.arange(24, dtype=jnp.int32).reshape(2, 12)
    np.testing.assert_allclose(load_hf(str(tmp_path / "hf"), jnp.float32)(ids).logits, trained(ids).logits, rtol=1e-5,
                               atol=1e-6)


def test_unknown_keys_are_errors_listing_valid_ones(tmp_path):
    out = subprocess.run(_train_cmd(tmp_path, "train.stepz=3"), env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "valid keys" in out.stderr and "steps" in out.stderr


def test_gradient_accumulation_matches_the_full_batch():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mimo_jax import MiMoV2Flash
    from mimo_jax.config import load_config
    from mimo_jax.train_step import make_optimizer, train_step_fn

    cfg = load_config("tiny", SMALL)
    graphdef, params, rest = nnx.split(MiMoV2Flash(cfg.model, rngs=nnx.Rngs(0)), nnx.Param, ...)
    ids = jax.random.randint(jax.random.key(0), (4, 32), 0, 259)
    seg = jnp.ones_like(ids)
    results = []
    for accum in (1, 2):
        # eps keeps round-off in near-zero gradients from steering the first Adam update.
        train = dataclasses.replace(cfg.train, grad_accum_steps=accum, eps=1e-3)
        tx = make_optimizer(train, params)
        new_params, _, metrics = jax.jit(train_step_fn(graphdef, tx, train))(params, tx.init(params), rest, ids, seg)
        results.append((new_params, metrics))
    np.testing.assert_allclose(results[1][1]["loss"], results[0][1]["loss"], rtol=1e-5)
    np.testing.assert_allclose(results[1][1]["grad_norm"], results[0][1]["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(results[1][0]), jax.tree.leaves(results[0][0])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_moments_halve_the_optimizer_state_and_round_the_fp32_update():
    import jax
    import jax.numpy as jnp

    from mimo_jax.config import TrainConfig
    from mimo_jax.train_step import make_optimizer

    params = {"w": jax.random.normal(jax.random.key(0), (16, 8)), "b": jnp.zeros((8,))}
    grads = [jax.tree.map(lambda p, i=i: jnp.sin(p + i) + 0.1, params) for i in range(3)]
    runs = {}
    for moments in ("", "bfloat16"):
        tx = make_optimizer(TrainConfig(moment_dtype=moments, warmup_steps=0, decay="constant"), params)
        state, p, states = tx.init(params), params, []
        for g in grads:
            updates, state = jax.jit(tx.update)(g, state, p)
            p = jax.tree.map(jnp.add, p, updates)
            states.append(state)
        runs[moments] = p, states
    float_bytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree) if x.dtype != jnp.int32)  # noqa: E731
    assert float_bytes(runs["bfloat16"][1][0]) * 2 == float_bytes(runs[""][1][0])
    adam = lambda state: state[1][0]  # noqa: E731 - (clip, (adam, decay, lr)) -> adam's (count, mu, nu)
    low, full = adam(runs["bfloat16"][1][0]), adam(runs[""][1][0])
    assert low.mu["w"].dtype == low.nu["w"].dtype == jnp.bfloat16 and full.mu["w"].dtype == jnp.float32
    # From zero moments, the first bf16 state is the fp32 state rounded.
    np.testing.assert_array_equal(low.nu["w"], full.nu["w"].astype(jnp.bfloat16))
    np.testing.assert_array_equal(low.mu["w"], full.mu["w"].astype(jnp.bfloat16))
    got, want = runs["bfloat16"][0]["w"], runs[""][0]["w"]
    assert not np.array_equal(got, want)
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-4)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    proc = subprocess.Popen(_train_cmd(tmp_path, "train.steps=1000", "train.checkpoint_every=3"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (tmp_path / "checkpoints" / "3" / "_CHECKPOINT_METADATA").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    saved = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert f"saved checkpoint {saved}, exiting" in stderr and saved >= 3


def test_fine_tuning_starts_from_hf_weights_or_another_run(tmp_path):
    import jax.numpy as jnp
    from flax import nnx

    from mimo_jax import MiMoV2Flash, save_hf
    from mimo_jax.config import load_config
    from mimo_jax.checkpoint import initial_model
    from mimo_jax.training import load_checkpoint, train

    cfg = load_config("tiny", SMALL + ["train.steps=2", "train.checkpoint_every=1000"])
    train(cfg, str(tmp_path / "first"), log=lambda _: None)
    first = load_checkpoint(str(tmp_path / "first"))
    save_hf(first, str(tmp_path / "hf"), dtype=jnp.float32)
    for source in (tmp_path / "hf", tmp_path / "first"):
        cfg2 = load_config("tiny", SMALL + [f"train.init_from={source}"])
        np.testing.assert_allclose(initial_model(cfg2).embed[...], first.embed[...], rtol=1e-6)
    scratch = MiMoV2Flash(cfg.model, rngs=nnx.Rngs(0))
    assert not np.allclose(scratch.embed[...], first.embed[...])
