"""Tests run on the CPU, also when libtpu is installed (it is, for ahead-of-time TPU compiles), with
8 simulated devices for the mesh tests (single-device code runs on the first)."""

import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# The tests compile far more than they run: XLA:CPU's cheap backend passes cut test_sharding.py plus
# test_inference.py from 539 to 397 s on 2 cores (a compile takes about a third less, a step runs
# slower) and change results only by float rounding. The processes tests start inherit it. Set any
# --xla_backend_optimization_level yourself to test the optimised programs.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

# XLA:CPU's default, concurrency-optimised scheduler runs independent ops side by side and so holds
# every parameter's temporaries at once (the random bits of an init, a step's gradient and optimizer
# intermediates): on configs/cpu_1b.yaml it gives a sharded init 1.5x a device's share in
# temporaries and a train step 2.4 GB per device, where the plain scheduler needs 0.5x and 1.6 GB.
# Step times on 2 cores were the same (docs/training.md says the same to CPU users).
if "xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_cpu_enable_concurrency_optimized_scheduler=false"

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")

import mimo_jax  # noqa: E402,F401  (keeps libtpu quiet for the kernel tests too: mimo_jax/libtpu_setup.py)


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """One process runs every test: drop each module's compiled programs so they do not pile up
    (a full run once segfaulted inside an XLA compile after most of the suite)."""
    yield
    jax.clear_caches()
