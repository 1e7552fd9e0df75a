"""Multi-host (multi-process) JAX: starting the cluster, host-local data loading, global arrays.

Every host runs the same program. After `initialize`, `jax.devices()` lists the devices of all
hosts, a mesh over them is global, and jitted functions run SPMD across hosts. What stays per
host is data: each host loads only its own rows of a global batch (`host_rows`) and
`global_batch` stitches them into one global `jax.Array` without moving data between hosts.

    initialize(cfg.distributed)                  # before anything touches a JAX backend
    mesh = make_mesh(cfg.mesh)                   # all devices of all hosts
    step, shardings = sharded_train_step(...)
    params = put_global(params, shardings["params"])
    start, stop = host_rows(global_batch_size, shardings["batch"])
    ids = global_batch(load_rows(start, stop), shardings["batch"], global_batch_size)
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from mimo_jax.config import ConfigError, DistributedConfig

__all__ = ["ClusterPlan", "DistributedConfig", "global_batch", "host_rows", "initialize", "is_main_process",
           "log", "on_cloud_tpu_vm", "put_global", "resolve", "to_host"]

ENV_COORDINATOR_ADDRESS = "MIMO_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "MIMO_NUM_PROCESSES"
ENV_PROCESS_ID = "MIMO_PROCESS_ID"

SINGLE = "single"      # one process: nothing to start
EXPLICIT = "explicit"  # jax.distributed.initialize(coordinator_address, num_processes, process_id)
AUTO = "auto"          # jax.distributed.initialize(): JAX detects the TPU slice from its metadata

_DEFAULTS = DistributedConfig()


@dataclasses.dataclass(frozen=True)
class ClusterPlan:
    """What `initialize` will do, resolved from the config, the environment and the machine."""

    mode: str
    coordinator_address: str = ""
    num_processes: int = 1
    process_id: int = 0
    initialization_timeout: int = 300


# The plan this process was started with (None until `initialize` starts a cluster).
_ACTIVE_PLAN: ClusterPlan | None = None


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} (environment) is not an integer") from None


def resolve(cfg: DistributedConfig, environ: Mapping[str, str] | None = None,
            on_tpu_vm: bool | None = None) -> ClusterPlan:
    """The cluster `initialize` starts; a pure function of its arguments (for tests).

    Rule:
      1. Each field comes from the config when it differs from its default ("" / 1 / 0), else from
         the environment (MIMO_COORDINATOR_ADDRESS, MIMO_NUM_PROCESSES, MIMO_PROCESS_ID), else
         the default. An explicit config value always wins over the environment.
      2. num_processes > 1: an explicit cluster. coordinator_address ("host:port" of process 0)
         is required and 0 <= process_id < num_processes.
      3. Nothing set anywhere (no field in the config or the environment) on a Cloud TPU VM:
         `jax.distributed.initialize()` with no arguments, which reads the slice's hosts from the
         TPU metadata (a single-host TPU VM then is a cluster of one). MIMO_NUM_PROCESSES=1 in
         the environment opts out of this.
      4. Otherwise a single process; a coordinator_address or process_id without
         num_processes > 1 is an error rather than silently ignored.
    `environ` defaults to os.environ; `on_tpu_vm` to `on_cloud_tpu_vm()`.
    """
    environ = os.environ if environ is None else environ

    def pick(field: str, env_name: str, env_value):
        """(value, describe): describe(v) names where the value came from, for error messages."""
        value = getattr(cfg, field)
        if value == getattr(_DEFAULTS, field) and env_value is not None:
            return env_value, lambda v: f"{env_name}={v!r} (environment)"
        return value, lambda v: f"distributed.{field}={v!r}"

    coordinator, coordinator_src = pick("coordinator_address", ENV_COORDINATOR_ADDRESS,
                                        environ.get(ENV_COORDINATOR_ADDRESS) or None)
    num_processes, num_src = pick("num_processes", ENV_NUM_PROCESSES, _env_int(environ, ENV_NUM_PROCESSES))
    process_id, id_src = pick("process_id", ENV_PROCESS_ID, _env_int(environ, ENV_PROCESS_ID))
    timeout = cfg.initialization_timeout

    if timeout <= 0:
        raise ConfigError(f"distributed.initialization_timeout must be > 0 seconds, got {timeout}")
    if num_processes < 1:
        raise ConfigError(f"{num_src(num_processes)} must be >= 1")
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"{id_src(process_id)} must be in [0, num_processes) with {num_src(num_processes)}")
    if coordinator:
        host, sep, port = coordinator.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{coordinator_src(coordinator)} must be host:port (e.g. 10.0.0.1:1234)")

    if num_processes > 1:
        if not coordinator:
            raise ConfigError(
                f"{num_src(num_processes)} needs distributed.coordinator_address (or "
                f"{ENV_COORDINATOR_ADDRESS}): the host:port where process 0 runs the coordination service")
        return ClusterPlan(EXPLICIT, coordinator, num_processes, process_id, timeout)
    if coordinator:
        raise ConfigError(f"{coordinator_src(coordinator)} is set but {num_src(num_processes)}; set the number of "
                          f"processes (distributed.num_processes or {ENV_NUM_PROCESSES}) or drop the address")
    nothing_set = (cfg == dataclasses.replace(_DEFAULTS, initialization_timeout=timeout)
                   and not any(environ.get(n) for n in (ENV_COORDINATOR_ADDRESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID)))
    if nothing_set and (on_cloud_tpu_vm() if on_tpu_vm is None else on_tpu_vm):
        return ClusterPlan(AUTO, initialization_timeout=timeout)
    return ClusterPlan(SINGLE, initialization_timeout=timeout)


def on_cloud_tpu_vm() -> bool:
    """Whether this host is a Cloud TPU VM (or a GKE TPU pod), checked without starting a backend:
    the TPU worker variables GKE and multislice set, or TPU chips on the PCI bus."""
    if any(os.environ.get(n) for n in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
                                       "MEGASCALE_COORDINATOR_ADDRESS")):
        return True
    try:  # private, but it is the check JAX itself uses and it knows every TPU generation
        from jax._src import hardware_utils  # private JAX: guarded, a release may move it

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # noqa: BLE001 - a moved private helper must not break single-host runs
        return False


def initialize(cfg: DistributedConfig | None = None) -> ClusterPlan:
    """Starts (or joins) the multi-process JAX cluster described by `cfg` and the environment.

    See `resolve` for how the config, MIMO_* environment variables and TPU auto-detection combine.
    Call it once per process before anything touches a JAX backend (jax.devices(), arrays, jit).
    Calling it again with the same settings, or with a single-process setting, does nothing;
    asking for a different cluster than the running one is an error. Returns the plan used.
    """
    global _ACTIVE_PLAN
    plan = resolve(cfg or DistributedConfig())
    if _ACTIVE_PLAN is not None or jax.distributed.is_initialized():
        running = _ACTIVE_PLAN
        if plan.mode == EXPLICIT:
            if running is not None and running.mode == EXPLICIT and dataclasses.replace(
                    running, initialization_timeout=plan.initialization_timeout) != plan:
                raise RuntimeError(f"JAX distributed is already initialized as {running}; cannot re-initialize "
                                   f"as {plan}")
            # Started elsewhere (or auto-detected): check it is the cluster asked for.
            if (running is None or running.mode == AUTO) and (
                    (jax.process_count(), jax.process_index()) != (plan.num_processes, plan.process_id)):
                raise RuntimeError(
                    f"JAX distributed is already initialized with process {jax.process_index()} of "
                    f"{jax.process_count()}, not process_id={plan.process_id} of num_processes={plan.num_processes}")
        return running or plan
    if plan.mode == EXPLICIT:
        jax.distributed.initialize(coordinator_address=plan.coordinator_address, num_processes=plan.num_processes,
                                   process_id=plan.process_id, initialization_timeout=plan.initialization_timeout)
    elif plan.mode == AUTO:
        jax.distributed.initialize(initialization_timeout=plan.initialization_timeout)
    else:
        return plan
    _ACTIVE_PLAN = plan
    return plan


def is_main_process() -> bool:
    return jax.process_index() == 0


def log(msg: str) -> None:
    """Prints on process 0 only (to stderr, flushed), so N hosts do not print N copies."""
    if is_main_process():
        print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- host-local data


def host_rows(global_batch_size: int, sharding: jax.sharding.Sharding | None = None) -> tuple[int, int]:
    """(start, stop): the rows of the global batch this process loads.

    Without `sharding`, rows are split evenly in process order. With the batch's NamedSharding,
    they are the rows this process's devices hold under it; that is the even split for the usual
    meshes (data/fsdp/expert outermost over hosts), and the whole batch on every host when the
    batch is replicated across hosts.
    """
    if global_batch_size <= 0:
        raise ValueError(f"global batch size must be positive, got {global_batch_size}")
    if sharding is None or not isinstance(sharding, NamedSharding):
        count, index = jax.process_count(), jax.process_index()
        if global_batch_size % count:
            raise ValueError(f"global batch size {global_batch_size} does not divide over {count} processes; "
                             f"use a multiple of {count}")
        per_host = global_batch_size // count
        return index * per_host, (index + 1) * per_host

    # Only the batch dimension's spec decides which rows a device holds.
    row_spec = PartitionSpec(sharding.spec[0] if len(sharding.spec) else None)
    rows_sharding = NamedSharding(sharding.mesh, row_spec)
    try:
        index_map = rows_sharding.addressable_devices_indices_map((global_batch_size,))
    except ValueError:  # jax's IndivisibleError
        parts = sharding.mesh.shape
        names = row_spec[0] if isinstance(row_spec[0], tuple) else (row_spec[0],)
        count = int(np.prod([parts[n] for n in names if n is not None]))
        raise ValueError(f"global batch size {global_batch_size} does not divide over the {count} batch shards "
                         f"of the sharding {row_spec}; use a multiple of {count}") from None
    spans = sorted({(idx[0].start or 0, global_batch_size if idx[0].stop is None else idx[0].stop)
                    for idx in index_map.values()})
    start, stop = spans[0][0], spans[-1][1]
    if any(a[1] != b[0] for a, b in itertools.pairwise(spans)):
        raise ValueError(f"the mesh gives process {jax.process_index()} non-contiguous batch rows {spans}; "
                         "order the mesh so each host's devices are adjacent along the batch axes")
    return start, stop


def global_batch(host_local_data, sharding: jax.sharding.Sharding, global_batch_size: int | None = None):
    """A global jax.Array (or pytree of them) from this host's rows (`host_rows`) of the batch.

    `host_local_data` is a numpy array or a pytree of them, all with the same leading (row) size.
    `global_batch_size` is checked against `host_rows` when given (clearer than JAX's shape error);
    without it JAX infers the global shape from the sharding.
    """
    local = jax.tree.map(np.asarray, host_local_data)
    leaves = jax.tree.leaves(local)
    if not leaves:
        raise ValueError("global_batch: no arrays given")
    rows = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
    if len(rows) != 1 or None in rows:
        raise ValueError(f"global_batch: every array needs the same leading row count, got {sorted(map(str, rows))}")
    (local_rows,) = rows
    if global_batch_size is None:
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)
    start, stop = host_rows(global_batch_size, sharding)
    if local_rows != stop - start:
        raise ValueError(f"process {jax.process_index()} loads rows [{start}, {stop}) of the global batch of "
                         f"{global_batch_size}, i.e. {stop - start} rows, but was given {local_rows}")
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, x, (global_batch_size,) + x.shape[1:]), local)


# --------------------------------------------------------------------------- whole arrays


def put_global(tree, shardings):
    """Places a host-local pytree (the same values on every host, e.g. a model built from the same
    seed) onto possibly multi-host shardings; each host fills only its own devices' shards.

    `jax.device_put` onto a sharding with another host's devices is not allowed; this builds each
    leaf with `jax.make_array_from_callback` instead.
    """
    def place(value, sharding):
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree, shardings)


def to_host(tree):
    """Numpy copies of (possibly multi-host) arrays, the full value on every host; all processes
    must call it (arrays not fully addressable here are gathered across hosts)."""
    def fetch(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(fetch, tree)
