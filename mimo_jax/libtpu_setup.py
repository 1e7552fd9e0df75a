"""Keeps libtpu quiet on machines without a TPU, and still lets them compile for TPUs ahead of time.

libtpu is installed on CPU machines too (the `test` extra pulls `jax[tpu]`) because the project
compiles Pallas kernels and training steps for TPU topologies there (`kernels_pallas/tpu_aot.py`,
`mimo_jax.plan`). With libtpu importable, stock JAX:

- at backend discovery (the first `jax.devices()` / computation with `JAX_PLATFORMS` unset) loads
  and initialises libtpu, tries to open TPU chips and, finding none, quietly falls back to the CPU;
- when libtpu's runtime initialises (at that discovery, or at the first
  `jax.experimental.topologies.get_topology_desc(platform="tpu", ...)`), libtpu looks for the
  Cloud TPU VM it expects (`TPU_SKIP_MDS_QUERY`, which JAX sets when no chip is on the PCI bus,
  skips the metadata server) and, with neither `TPU_ACCELERATOR_TYPE` / `TPU_HOST_BOUNDS` nor
  `TPU_WORKER_HOSTNAMES` set, prints "Failed to find host bounds for accelerator type: WARNING:
  could not determine TPU accelerator type ..." and an `E0000 ... common_lib.cc:554]
  INVALID_ARGUMENT: unexpected worker hostname ...` trace to stderr. They are written before
  libtpu sets up its logging, so `TF_CPP_MIN_LOG_LEVEL`, `TPU_MIN_LOG_LEVEL`, `TPU_STDERR_LOG_LEVEL`
  and `GRPC_VERBOSITY` do not silence them.

`quiet_libtpu()` (run by `import mimo_jax`, before JAX starts a backend) changes two things, and
only where libtpu is installed and this machine has no TPU (`tpu_host()` is false):

1. Backend discovery skips the TPU backend unless the platforms are chosen explicitly
   (`JAX_PLATFORMS` / `jax_platforms`, read when the backends start): libtpu is not loaded at all
   for a CPU or GPU run (about 0.3 s saved), and `jax.devices("tpu")` says why it is absent.
2. The first TPU topology description (and a TPU backend asked for explicitly) initialises libtpu
   with `TPU_HOST_BOUNDS=1,1,1` and `TPU_WORKER_HOSTNAMES=localhost` (a single host, this one),
   set for that call only and then removed again, so nothing
   downstream (`mimo_jax.distributed.on_cloud_tpu_vm`, JAX's cluster detection, child processes)
   mistakes the machine for a TPU VM. Topologies and compiled programs are the same as without them.

On a TPU VM or GKE TPU node `tpu_host()` is true and nothing is changed; `MIMO_QUIET_LIBTPU=0`
turns all of this off (to see what libtpu says). Both hooks wrap private
JAX functions (`jax._src.xla_bridge`); where a JAX release lacks them, nothing is changed and the
messages come back (`tests/test_platform.py` notices). Code that uses JAX without `import mimo_jax`
(`kernels_pallas` on its own, `benchmarks/kernels.py`) can call `quiet_libtpu()` itself, before it
starts a backend or describes a TPU topology.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import importlib.util
import os
import pathlib
import threading

# Set by Cloud TPU VMs, GKE TPU node pools and multislice jobs, or by a user pointing libtpu at a
# TPU by hand: any of them means "this is (meant to be) a TPU host", so nothing is changed.
# (Not TPU_SKIP_MDS_QUERY: JAX itself sets it on machines without TPU chips.)
TPU_HOST_ENV = (
    "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID", "TPU_ACCELERATOR_TYPE", "TPU_TOPOLOGY",
    "TPU_HOST_BOUNDS", "TPU_CHIPS_PER_HOST_BOUNDS", "TPU_PROCESS_BOUNDS", "TPU_CHIPS_PER_PROCESS_BOUNDS",
    "TPU_VISIBLE_CHIPS", "TPU_VISIBLE_DEVICES", "MEGASCALE_COORDINATOR_ADDRESS", "CLOUD_TPU_TASK_ID",
    "JAX_FORCE_TPU_INIT",
)

# What libtpu is told while its runtime initialises on a machine without a TPU.
_NO_TPU_HOST_ENV = {"TPU_HOST_BOUNDS": "1,1,1", "TPU_WORKER_HOSTNAMES": "localhost"}

# Google's PCI vendor id and the TPU device ids (as in jax._src.hardware_utils, which knows newer ones).
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}

_lock = threading.Lock()  # guards _state
_init_lock = threading.RLock()  # one libtpu initialisation (and os.environ change) at a time
_state: str | None = None


def _tpu_on_pci_bus() -> bool:
    try:  # private, but it is JAX's own check and it knows every TPU generation JAX supports
        from jax._src import hardware_utils  # private JAX: guarded, a release may move it

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # noqa: BLE001 - a moved helper: the same scan, with the ids known here
        pass
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if (pathlib.Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR and
                    pathlib.Path(vendor).with_name("device").read_text().strip() in _TPU_PCI_DEVICES):
                return True
        except OSError:
            continue
    return False


def tpu_host(environ=None) -> bool:
    """Whether this machine has (or claims to have) TPU chips: TPU device nodes (`/dev/accel*` on v4 /
    v5p, VFIO groups `/dev/vfio/<n>` on v5e / v6e and newer), TPU chips on the PCI bus, or the
    variables TPU VMs, GKE and multislice jobs set (`TPU_HOST_ENV`). Starts no backend. Errs towards
    yes: a yes only means libtpu is left alone."""
    environ = os.environ if environ is None else environ
    if any(environ.get(name) is not None for name in TPU_HOST_ENV):
        return True
    if glob.glob("/dev/accel*") or [p for p in glob.glob("/dev/vfio/*") if os.path.basename(p) != "vfio"]:
        return True
    return _tpu_on_pci_bus()


def libtpu_installed() -> bool:
    """Whether JAX would find libtpu (the `libtpu` package or `TPU_LIBRARY_PATH`), without loading it."""
    if os.environ.get("TPU_LIBRARY_PATH"):
        return True
    try:
        return importlib.util.find_spec("libtpu") is not None
    except (ImportError, ValueError):
        return False


@contextlib.contextmanager
def _no_tpu_host_env():
    """`_NO_TPU_HOST_ENV` in os.environ (where unset) for the duration, removed afterwards."""
    added = [name for name in _NO_TPU_HOST_ENV if name not in os.environ]
    for name in added:
        os.environ[name] = _NO_TPU_HOST_ENV[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _libtpu_initialized() -> bool:
    try:
        from jax._src.lib import xla_client  # private JAX: guarded, a release may move it

        return bool(xla_client.pjrt_plugin_initialized("tpu"))
    except Exception:  # noqa: BLE001 - not loaded yet, or an older/newer API: assume not initialised
        return False


def _quietly(fn):
    """`fn` run with `_NO_TPU_HOST_ENV` while libtpu's runtime is not yet initialised (libtpu reads
    these variables once, when it initialises)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _libtpu_initialized():
            return fn(*args, **kwargs)
        with _init_lock, _no_tpu_host_env():
            return fn(*args, **kwargs)

    wrapper._mimo_quiet_libtpu = True
    return wrapper


def _skip_unless_asked(factory):
    """The TPU backend factory, refusing (quietly: JAX registers TPU as fail-quietly) during automatic
    backend discovery; run as usual, with libtpu kept quiet, when the platforms are chosen explicitly."""
    quiet = _quietly(factory)

    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        import jax  # this module runs before anything imports jax (mimo_jax/__init__.py), so not at its top

        if not jax.config.jax_platforms:
            raise RuntimeError("skipped by mimo_jax: this machine has no TPU (set JAX_PLATFORMS=tpu or "
                               "JAX_FORCE_TPU_INIT=1 to try anyway)")
        return quiet(*args, **kwargs)

    wrapper._mimo_quiet_libtpu = True
    return wrapper


def quiet_libtpu() -> str:
    """Keeps libtpu from starting or printing anything on a machine without a TPU (see the module
    docstring); idempotent and cheap. Call it before the first JAX computation or TPU topology.

    Returns what was done: "quiet" (hooks in place), "tpu-host" (a TPU machine: nothing changed),
    "no-libtpu" (nothing to keep quiet), "unsupported-jax" (this JAX lacks the functions wrapped),
    "disabled" (`MIMO_QUIET_LIBTPU=0` in the environment: JAX and libtpu left as they are)."""
    global _state
    with _lock:
        if _state is None:
            _state = _install()
        return _state


def _install() -> str:
    if os.environ.get("MIMO_QUIET_LIBTPU") == "0":
        return "disabled"
    if not libtpu_installed():
        return "no-libtpu"
    if tpu_host():
        return "tpu-host"
    try:
        from jax._src import xla_bridge as xb  # private JAX: guarded, a release may move it

        registration = xb._backend_factories["tpu"]
        topology_factory = xb.make_pjrt_tpu_topology
        registration.factory  # noqa: B018 - fail here, not half-way, on an unknown layout
    except Exception:  # noqa: BLE001 - another JAX layout: leave JAX as it is
        return "unsupported-jax"
    if not getattr(topology_factory, "_mimo_quiet_libtpu", False):
        xb.make_pjrt_tpu_topology = _quietly(topology_factory)
    if not getattr(registration.factory, "_mimo_quiet_libtpu", False):
        registration.factory = _skip_unless_asked(registration.factory)
    return "quiet"
