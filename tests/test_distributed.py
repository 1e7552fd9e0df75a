"""Multi-host JAX: two processes on 127.0.0.1 (4 CPU devices each, one 8-device global mesh) train
like one unsharded process (to float rounding), their checkpoint restores onto other meshes, and the
cluster settings resolve (config, MIMO_* environment, TPU auto-detection) with clear errors.

The cluster runs in subprocesses with timeouts: a process whose peer never comes is killed by
JAX at the initialization timeout instead of raising, which must not hang the test run.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from mimo_jax import distributed, load_config
from mimo_jax.config import (
    Config,
    ConfigError,
    DistributedConfig,
    MeshConfig,
    apply_overrides,
)
from mimo_jax.distributed import ClusterPlan, resolve
from mimo_jax.sharding import make_mesh, state_shardings

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().with_name("multihost_worker.py")
TIMEOUT_S = 900  # a guard against hangs: the two-process fixture took 212 s beside a second pytest worker (-n 2)
# Both sides of the comparison run the same program, so trading XLA:CPU optimisation for compile
# time (about half) changes nothing being tested.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _worker_module():
    spec = importlib.util.spec_from_file_location("multihost_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env(device_count: int, **mimo: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIMO_", "JAX_", "XLA_"))}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={device_count} {FAST_COMPILE}",
        ALLOW_MULTIPLE_LIBTPU_LOAD="1",
        PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
        **mimo,
    )
    return env


def _stderr_tail(path: Path, chars: int = 4000) -> str:
    # XLA's SPMD warnings and gloo's connection lines bury the interesting part.
    lines = [ln for ln in path.read_text(errors="replace").splitlines()
             if "spmd_partitioner" not in ln and not ln.startswith("[Gloo]")]
    return "\n".join(lines)[-chars:]


def _run_together(jobs: dict, timeout_s: float) -> dict[str, str]:
    """Runs the jobs (name -> (args, env, log path)) concurrently; {name: why} for those that failed.

    When one fails, the rest are stopped at once: a peer left waiting for it would otherwise sit
    in jax.distributed until its own timeout.
    """
    procs = {}
    failed: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    try:
        for name, (args, env, log) in jobs.items():
            with open(log, "w") as f:  # a file, not a pipe: XLA's warnings would fill a pipe
                procs[name] = subprocess.Popen([sys.executable, *args], env=env, stdout=f, stderr=subprocess.STDOUT,
                                               cwd=REPO)
        while not failed and any(p.poll() is None for p in procs.values()):
            if time.monotonic() > deadline:
                failed = {n: f"timed out after {timeout_s} s" for n, p in procs.items() if p.poll() is None}
                break
            failed = {n: f"exit code {p.returncode}" for n, p in procs.items() if p.poll() not in (None, 0)}
            time.sleep(0.2)
        failed = failed or {n: f"exit code {p.returncode}" for n, p in procs.items() if p.returncode != 0}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return failed


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Starts the 2-process cluster (with a checkpoint) and the 1-process reference together."""
    root = tmp_path_factory.mktemp("multihost")
    cluster_dir, reference_dir = root / "cluster", root / "reference"
    cluster_dir.mkdir()
    reference_dir.mkdir()
    port = _free_port()
    jobs = {}
    for pid in range(2):
        env = _worker_env(4, MIMO_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", MIMO_NUM_PROCESSES="2",
                          MIMO_PROCESS_ID=str(pid))
        jobs[f"process {pid}"] = ([str(WORKER), "--out", str(cluster_dir), "--save"], env, root / f"process{pid}.log")
    # The reference is one process on one device: an unsharded program compiles in a fraction of
    # the time. MIMO_NUM_PROCESSES=1 keeps it single even on a TPU VM (no auto-detection).
    jobs["reference"] = ([str(WORKER), "--out", str(reference_dir), "--one-device"],
                         _worker_env(1, MIMO_NUM_PROCESSES="1"), root / "reference.log")

    start = time.monotonic()
    failed = _run_together(jobs, TIMEOUT_S)
    if failed:
        report = "\n\n".join(f"--- {name} ({failed.get(name, 'finished, or stopped after the failure')}):\n"
                               f"{_stderr_tail(log)}" for name, (_, _, log) in jobs.items())
        pytest.fail(f"multi-host workers failed:\n{report}")
    print(f"multi-host workers took {time.monotonic() - start:.1f} s")
    return {"cluster": [json.loads((cluster_dir / f"report_{i}.json").read_text()) for i in range(2)],
            "reference": json.loads((reference_dir / "report_0.json").read_text()),
            "checkpoint": cluster_dir / "checkpoint", "params": cluster_dir / "params.npz"}


def test_two_processes_train_like_one_process(runs):
    first, second = runs["cluster"]
    reference = runs["reference"]
    for i, report in enumerate(runs["cluster"]):
        assert (report["process_index"], report["process_count"], report["plan_mode"]) == (i, 2, "explicit")
        assert (report["device_count"], report["local_device_count"]) == (8, 4)
    # Host-local loading: each process loaded only its half of the 8-row batch.
    assert first["rows"] == [0, 4] and second["rows"] == [4, 8]
    assert (reference["process_count"], reference["device_count"], reference["rows"]) == (1, 1, [0, 8])
    assert len(first["losses"]) == 2
    np.testing.assert_allclose(first["losses"], reference["losses"], rtol=1e-5)
    np.testing.assert_allclose(second["losses"], first["losses"], rtol=0)  # one SPMD program, one result
    assert first["losses"][1] < first["losses"][0]


def test_checkpoint_of_two_processes_restores_onto_other_meshes(runs):
    """The 2-process run saved its (fsdp=2, expert=2, tensor=2)-sharded params with orbax, each
    process writing its own shards; one process restores them onto different meshes."""
    import orbax.checkpoint as ocp

    from mimo_jax.train_step import abstract_model_state

    cfg = load_config("tiny", _worker_module().SMALL_MODEL)
    abstract_params = abstract_model_state(cfg.model)[1]
    saved = dict(np.load(runs["params"]))
    meshes = {"data=2, fsdp=4": make_mesh(MeshConfig(data=2, fsdp=-1)),
              "one device": make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])}
    checkpointer = ocp.StandardCheckpointer()
    for name, mesh in meshes.items():
        shardings = state_shardings(abstract_params, mesh, cfg.sharding)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_params, shardings)
        restored = checkpointer.restore(runs["checkpoint"], target)
        leaves = jax.tree_util.tree_leaves_with_path(restored)
        assert sorted(jax.tree_util.keystr(p) for p, _ in leaves) == sorted(saved), name
        for (path, leaf), sharding in zip(leaves, jax.tree.leaves(shardings)):
            key = jax.tree_util.keystr(path)
            assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (name, key, leaf.sharding)
            np.testing.assert_array_equal(np.asarray(leaf), saved[key], err_msg=f"{name}: {key}")
        if name == "data=2, fsdp=4":  # the embedding really is split differently from the saving mesh
            embed = restored["embed"][...]
            assert len({s.data.shape for s in embed.addressable_shards}) == 1
            assert embed.addressable_shards[0].data.shape != embed.shape


# --------------------------------------------------------------------------- resolution rules

NO_ENV: dict[str, str] = {}


def test_defaults_are_a_single_process_off_tpu_and_auto_detection_on_tpu():
    assert resolve(DistributedConfig(), NO_ENV, on_tpu_vm=False).mode == "single"
    assert resolve(DistributedConfig(), NO_ENV, on_tpu_vm=True) == ClusterPlan("auto")
    # An explicit single process opts out of auto-detection on a TPU VM.
    assert resolve(DistributedConfig(), {"MIMO_NUM_PROCESSES": "1"}, on_tpu_vm=True).mode == "single"


def test_environment_fills_fields_the_config_leaves_at_defaults():
    env = {"MIMO_COORDINATOR_ADDRESS": "10.0.0.2:1234", "MIMO_NUM_PROCESSES": "4", "MIMO_PROCESS_ID": "3"}
    assert resolve(DistributedConfig(), env, on_tpu_vm=True) == ClusterPlan("explicit", "10.0.0.2:1234", 4, 3)
    # Explicit config values win over the environment, field by field.
    cfg = DistributedConfig(coordinator_address="host-0:99", process_id=1, initialization_timeout=30)
    assert resolve(cfg, env, on_tpu_vm=False) == ClusterPlan("explicit", "host-0:99", 4, 1, 30)
    # The YAML/override path reaches the same section.
    cfg = apply_overrides(Config(), ["distributed.num_processes=2", "distributed.coordinator_address=h:1"])
    assert resolve(cfg.distributed, NO_ENV, on_tpu_vm=False) == ClusterPlan("explicit", "h:1", 2, 0)



def test_gke_tpu_worker_variables_count_as_a_tpu_vm(monkeypatch):
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-0,host-1")
    assert distributed.on_cloud_tpu_vm()


@pytest.mark.parametrize("cfg, env, message", [
    (DistributedConfig(coordinator_address="h:1", num_processes=2, process_id=2), NO_ENV,
     r"distributed.process_id=2 must be in \[0, num_processes\) with distributed.num_processes=2"),
    (DistributedConfig(coordinator_address="h:1", num_processes=2), {"MIMO_PROCESS_ID": "5"},
     r"MIMO_PROCESS_ID=5 \(environment\) must be in \[0, num_processes\) with distributed.num_processes=2"),
    (DistributedConfig(process_id=1), NO_ENV,
     r"distributed.process_id=1 must be in \[0, num_processes\) with distributed.num_processes=1"),
    (DistributedConfig(num_processes=2), NO_ENV, "distributed.num_processes=2 needs distributed.coordinator_address"),
    (DistributedConfig(num_processes=0), NO_ENV, "distributed.num_processes=0 must be >= 1"),
    (DistributedConfig(), {"MIMO_NUM_PROCESSES": "two"},
     r"MIMO_NUM_PROCESSES='two' \(environment\) is not an integer"),
    (DistributedConfig(coordinator_address="localhost", num_processes=2), NO_ENV,
     "distributed.coordinator_address='localhost' must be host:port"),
    (DistributedConfig(), {"MIMO_COORDINATOR_ADDRESS": "h:1"},
     r"MIMO_COORDINATOR_ADDRESS='h:1' \(environment\) is set but distributed.num_processes=1"),
    (DistributedConfig(initialization_timeout=0), NO_ENV, "distributed.initialization_timeout must be > 0"),
])
def test_inconsistent_settings_name_the_field(cfg, env, message):
    with pytest.raises(ConfigError, match=message):
        resolve(cfg, env, on_tpu_vm=False)


@pytest.fixture
def fake_jax_distributed(monkeypatch):
    """Records jax.distributed.initialize calls instead of starting a cluster."""
    calls = []
    for name in ("MIMO_COORDINATOR_ADDRESS", "MIMO_NUM_PROCESSES", "MIMO_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_ACTIVE_PLAN", None)
    monkeypatch.setattr(distributed, "on_cloud_tpu_vm", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(calls))
    return calls


def test_initialize_starts_the_cluster_once(fake_jax_distributed, monkeypatch):
    calls = fake_jax_distributed
    assert distributed.initialize(DistributedConfig()).mode == "single"
    assert calls == []
    monkeypatch.setenv("MIMO_PROCESS_ID", "1")
    cfg = DistributedConfig(coordinator_address="10.0.0.1:8476", num_processes=2, initialization_timeout=60)
    plan = distributed.initialize(cfg)
    assert calls == [{"coordinator_address": "10.0.0.1:8476", "num_processes": 2, "process_id": 1,
                      "initialization_timeout": 60}]
    monkeypatch.delenv("MIMO_PROCESS_ID")
    cfg = DistributedConfig(coordinator_address="10.0.0.1:8476", num_processes=2, process_id=1)
    assert distributed.initialize(cfg) == plan  # idempotent
    assert distributed.initialize(DistributedConfig()) == plan  # a single-process default is no conflict
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="already initialized"):
        distributed.initialize(DistributedConfig(coordinator_address="10.0.0.1:8476", num_processes=4))


def test_initialize_on_a_tpu_vm_lets_jax_detect_the_slice(fake_jax_distributed, monkeypatch):
    monkeypatch.setattr(distributed, "on_cloud_tpu_vm", lambda: True)
    assert distributed.initialize(DistributedConfig()).mode == "auto"
    assert fake_jax_distributed == [{"initialization_timeout": 300}]


def test_log_prints_on_process_zero_only(capsys, monkeypatch):
    distributed.log("hello")
    assert capsys.readouterr().err == "hello\n"
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    distributed.log("hello")
    assert not distributed.is_main_process()
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- host-local data


def test_host_rows_split_the_batch_in_process_order(monkeypatch):
    assert distributed.host_rows(8) == (0, 8)  # this pytest process is a cluster of one
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    monkeypatch.setattr(jax, "process_index", lambda: 2)
    assert distributed.host_rows(8) == (4, 6)
    with pytest.raises(ValueError, match="global batch size 6 does not divide over 4 processes"):
        distributed.host_rows(6)
    with pytest.raises(ValueError, match="must be positive"):
        distributed.host_rows(0)


def test_host_rows_and_global_batch_follow_the_batch_sharding():
    mesh = make_mesh(MeshConfig(fsdp=2, expert=2, tensor=2))
    batch = NamedSharding(mesh, PartitionSpec(("fsdp", "expert")))
    assert distributed.host_rows(8, batch) == (0, 8)
    with pytest.raises(ValueError, match="global batch size 6 does not divide over the 4 batch shards"):
        distributed.host_rows(6, batch)

    ids = np.arange(8 * 5, dtype=np.int32).reshape(8, 5)
    both = distributed.global_batch({"ids": ids, "seg": ids % 2}, batch, 8)
    assert both["ids"].sharding == batch and both["ids"].shape == (8, 5)
    np.testing.assert_array_equal(both["ids"], ids)
    np.testing.assert_array_equal(both["seg"], ids % 2)
    np.testing.assert_array_equal(distributed.global_batch(ids, batch), ids)
    with pytest.raises(ValueError, match=r"loads rows \[0, 8\) .* 8 rows, but was given 4"):
        distributed.global_batch(ids[:4], batch, 8)
    with pytest.raises(ValueError, match="same leading row count"):
        distributed.global_batch({"a": ids, "b": ids[:4]}, batch, 8)


def test_put_global_and_to_host_round_trip():
    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    tree = {"w": np.arange(32.0).reshape(8, 4), "b": np.ones(3, np.float32)}
    shardings = {"w": NamedSharding(mesh, PartitionSpec("fsdp", "tensor")), "b": NamedSharding(mesh, PartitionSpec())}
    placed = distributed.put_global(tree, shardings)
    assert placed["w"].sharding == shardings["w"] and placed["w"].addressable_shards[0].data.shape == (2, 2)
    back = distributed.to_host(placed)
    np.testing.assert_array_equal(back["w"], tree["w"])
    np.testing.assert_array_equal(back["b"], tree["b"])
