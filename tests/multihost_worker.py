"""One process of the multi-host test (tests/test_distributed.py launches it; not a test itself).

Runs 2 sharded training steps of the small test model on a (fsdp=2, expert=2, tensor=2) mesh over
all global devices, each process loading only its own rows of the batch (--one-device: the same
steps unsharded, the reference). The cluster comes from
the MIMO_* environment variables (unset: a single process, the reference run). Process 0 writes
the losses (and, with --save, the trained parameters gathered to numpy) under --out; every
process writes a report_<index>.json with its rows.

    python tests/multihost_worker.py --out DIR [--save]
"""

import argparse
import json
import os
import sys
import time

START = time.perf_counter()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Importing jax starts no backend; only `distributed.initialize` has to come before first use.
import jax
import numpy as np
import optax
from flax import nnx

from mimo_jax import MiMoV2Flash, distributed, load_config
from mimo_jax.sharding import make_mesh
from mimo_jax.train_step import abstract_model_state, sharded_train_step

# tests/test_sharding.py's small model at two layers (one of each kind): four processes share the
# CPU cores while they compile.
SMALL_MODEL = [
    "model.vocab_size=96", "model.hidden_size=32", "model.num_layers=2",
    "model.layer_types=[global, swa]", "model.mlp_types=[dense, moe]",
    "model.qk_head_dim=24", "model.v_head_dim=16", "model.intermediate_size=48",
    "model.moe_intermediate_size=16", "model.num_experts=8", "model.num_experts_per_token=2",
    "model.sliding_window=3", "model.initializer_range=0.2",
]
MESH = ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2"]
BATCH, SEQ, STEPS = 8, 24, 2


def load_rows(start: int, stop: int, vocab_size: int):
    """Rows [start, stop) of a deterministic global batch; each row is generated on its own, so a
    host never materialises rows it does not own (host-local data loading)."""
    ids = np.stack([np.random.default_rng([1234, row]).integers(0, vocab_size, SEQ, dtype=np.int32)
                    for row in range(start, stop)])
    segments = np.broadcast_to((np.arange(SEQ) >= 15).astype(np.int32), ids.shape).copy()
    return ids, segments


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="directory for report_<i>.json (and params.npz, checkpoint/)")
    parser.add_argument("--save", action="store_true", help="also save an orbax checkpoint and the params")
    parser.add_argument("--one-device", action="store_true", help="the unsharded reference: a 1-device mesh")
    args = parser.parse_args()

    cfg = load_config("tiny", SMALL_MODEL + (["mesh.fsdp=1"] if args.one_device else MESH))
    plan = distributed.initialize(cfg.distributed)  # before anything touches the backend
    distributed.log(f"[{time.perf_counter() - START:.1f}s] {plan}: {jax.process_count()} processes, "
                    f"{jax.device_count()} devices")
    mesh = make_mesh(cfg.mesh)  # over the devices of every process
    # The same seed on every host gives the same host-local parameters; put_global then hands
    # each host's devices their shards. (Built under one jit: eager init compiles each op.)
    graphdef = abstract_model_state(cfg.model)[0]
    params, rest = jax.jit(lambda: nnx.split(MiMoV2Flash(cfg.model, rngs=nnx.Rngs(0)), nnx.Param, ...)[1:])()
    tx = optax.adamw(1e-2, eps=1e-3)
    step, shardings = sharded_train_step(graphdef, params, rest, tx, mesh, cfg.sharding, (BATCH, SEQ))
    params = distributed.put_global(params, shardings["params"])
    rest = distributed.put_global(rest, shardings["rest"])
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)

    start, stop = distributed.host_rows(BATCH, shardings["batch"])
    ids, segments = distributed.global_batch(load_rows(start, stop, cfg.model.vocab_size), shardings["batch"], BATCH)

    losses = []
    for _ in range(STEPS):
        params, opt_state, metrics = step(params, opt_state, rest, ids, segments)
        losses.append(float(metrics["loss"]))
        distributed.log(f"[{time.perf_counter() - START:.1f}s] step {len(losses)}: loss {losses[-1]:.6f}")

    if args.save:
        import orbax.checkpoint as ocp

        # Every process writes its own shards; process 0 writes the metadata and commits.
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(os.path.abspath(args.out), "checkpoint"), params)
        checkpointer.wait_until_finished()
        host_params = distributed.to_host(params)  # a collective: every process takes part
        if distributed.is_main_process():
            flat = {jax.tree_util.keystr(path): leaf
                    for path, leaf in jax.tree_util.tree_leaves_with_path(host_params)}
            np.savez(os.path.join(args.out, "params.npz"), **flat)
        distributed.log(f"[{time.perf_counter() - START:.1f}s] saved")

    # Process 0's report carries the losses the test checks; the others' show which rows they loaded.
    report = {"losses": losses, "process_index": jax.process_index(), "process_count": jax.process_count(),
              "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
              "rows": [start, stop], "plan_mode": plan.mode}
    with open(os.path.join(args.out, f"report_{jax.process_index()}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
