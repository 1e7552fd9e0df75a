"""libtpu stays quiet on machines without a TPU (mimo_jax/libtpu_setup.py): a CPU run prints nothing
about TPUs, and ahead-of-time TPU topologies still work."""

import os
import re
import subprocess
import sys
import textwrap

import pytest

from mimo_jax import libtpu_setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = re.compile(r"tpu|InitGoogle|Source Location|common_lib\.cc", re.IGNORECASE)

# A fresh process as a user runs it: JAX picks its platforms itself, then compiles for a TPU topology.
# (Its own output avoids the word TPU so that any line with it is libtpu's or JAX's.)
SCRIPT = textwrap.dedent("""
    import os
    import mimo_jax, jax, numpy as np
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec
    from jax._src.lib import xla_client

    print("setup:", mimo_jax.libtpu_setup.quiet_libtpu())
    print("devices:", [d.platform for d in jax.devices()])
    print("lib loaded by discovery:", xla_client.pjrt_plugin_loaded("tpu"))
    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
                                        chips_per_host_bounds=(2, 2, 1), num_slices=1)
    mesh = jax.sharding.Mesh(np.array(topo.devices[:1]), ("chip",))
    x = jax.ShapeDtypeStruct((8, 128), np.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    compiled = jax.jit(lambda x: x * 2 + 1).lower(x).compile()
    print("aot devices:", len(topo.devices), "compiled:", compiled.memory_analysis() is not None)
    print("env left:", sorted(k for k in ("TPU_HOST_BOUNDS", "TPU_WORKER_HOSTNAMES") if k in os.environ))
""")


def _clean_env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_PLATFORMS", "JAX_FORCE_TPU_INIT", "XLA_FLAGS") and not k.startswith("PYTEST")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.skipif(not libtpu_setup.libtpu_installed(), reason="nothing to keep quiet without libtpu")
@pytest.mark.skipif(libtpu_setup.tpu_host(), reason="a TPU machine: libtpu is meant to start here")
def test_cpu_run_and_aot_compile_print_nothing_about_tpus():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=_clean_env(), capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    noise = [line for line in out.splitlines() if NOISE.search(line)]
    assert not noise, "libtpu / TPU messages on a machine without a TPU:\n" + "\n".join(noise)
    assert "setup: quiet" in proc.stdout, out
    assert "lib loaded by discovery: False" in proc.stdout, out  # discovery skipped libtpu altogether
    assert "aot devices: 4 compiled: True" in proc.stdout, out
    assert "env left: []" in proc.stdout, out  # the variables told to libtpu did not outlive its start


def test_tpu_host_detection_from_the_environment():
    assert libtpu_setup.tpu_host({"TPU_WORKER_HOSTNAMES": "t1k-0,t1k-1"})
    assert libtpu_setup.tpu_host({"TPU_ACCELERATOR_TYPE": "v5litepod-8"})
    assert libtpu_setup.tpu_host({"JAX_FORCE_TPU_INIT": "1"})
    # JAX itself sets TPU_SKIP_MDS_QUERY (and importing libtpu sets TPU_LIBRARY_PATH) on any machine.
    if not libtpu_setup.tpu_host({}):
        assert not libtpu_setup.tpu_host({"TPU_SKIP_MDS_QUERY": "1", "TPU_LIBRARY_PATH": "/x/libtpu.so"})


def test_no_tpu_host_env_is_removed_afterwards(monkeypatch):
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
    monkeypatch.setenv("TPU_HOST_BOUNDS", "2,2,1")  # set by the user: kept as it is
    with libtpu_setup._no_tpu_host_env():
        assert os.environ["TPU_WORKER_HOSTNAMES"] == "localhost"
        assert os.environ["TPU_HOST_BOUNDS"] == "2,2,1"
    assert "TPU_WORKER_HOSTNAMES" not in os.environ
    assert os.environ["TPU_HOST_BOUNDS"] == "2,2,1"
