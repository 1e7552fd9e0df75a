"""`--search`: meshes, remat policies or KV cache layouts and MoE capacity factors, cheapest
expected first, until a plan fits."""

from __future__ import annotations

import math
import sys

import jax

from mimo_jax import sharding
from mimo_jax.config import apply_overrides
from mimo_jax.plan.compiling import (
    SEQ_SHARDED_CACHE,
    PlanResult,
    abstract_cache,
    abstract_state,
    build_mesh,
    bytes_per_device,
    cache_shardings,
    compile_plan,
    step_query_len,
)
from mimo_jax.plan.report import mfu
from mimo_jax.plan.topology import GIB, Topology, parse_topology, topology_devices
from mimo_jax.train_step import make_optimizer


def candidate_meshes(devices: int, num_experts: int, mode: str = "train") -> list[dict[str, int]]:
    """Factorisations devices = data * fsdp * expert * tensor with expert | num_experts and tensor in
    1, 2, 4, 8, cheapest expected first.

    Training: no data replication (the 309B state must be sharded), little tensor parallelism (an
    all-reduce per matmul), then expert parallelism as wide as the experts allow (it divides the
    expert weights without gathering them). Inference: no data replication and no fsdp either (a
    step would gather every weight for a few tokens), then as much tensor parallelism as allowed
    (it splits the dense weights and the KV heads of a few sequences that the batch axes cannot)."""
    meshes = []
    for tensor in (1, 2, 4, 8):
        for expert in _divisors(devices // tensor if devices % tensor == 0 else 0):
            if num_experts % expert:
                continue
            rest = devices // (tensor * expert)
            for data in _divisors(rest):
                meshes.append(dict(data=data, fsdp=rest // data, expert=expert, tensor=tensor))
    if mode == "train":
        return sorted(meshes, key=lambda m: (m["data"], m["tensor"], -m["expert"]))
    return sorted(meshes, key=lambda m: (m["data"], m["fsdp"], -m["tensor"]))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0] if n > 0 else []


def search(base_cfg, topology: Topology, mode: str, seq_len: int, global_batch: int | None, max_compiles: int,
           out=sys.stdout, meshes_per_policy: int = 3, *, prefill_chunk: int | None = None,
           num_draft: int = 0, weights: str | None = None) -> tuple[list[PlanResult], PlanResult | None]:
    """Compiles candidates until one fits (or `max_compiles` are spent); returns (tried, best).

    Order: capacity factor 0 (dropless) before bounded buffers, then remat none < dots < full
    (training only), and within a policy the `meshes_per_policy` cheapest meshes whose state fits
    HBM: a plan that keeps all activations rarely fits where recomputing them does, so more meshes
    per policy would spend the compile budget on the same verdict. Inference plans count the KV
    cache in the state and accept a batch smaller than the batch shards (a single 256k sequence
    is replicated over them; the expert and tensor axes still split the weights)."""
    query_len = step_query_len(mode, seq_len, prefill_chunk, num_draft, base_cfg.model)
    devices = len(topology_devices(topology))
    if mode == "train":
        policies = [[f"model.remat={remat}"] for remat in ("none", "dots", "full")]
        capacities = (0.0, 1.25, 2.0)
    else:  # the KV cache as the rules place it, then its sequence over the batch axes a small batch leaves idle
        policies = [["model.remat=none"], ["model.remat=none", f"sharding.cache_seq=[{', '.join(SEQ_SHARDED_CACHE)}]"]]
        capacities = (0.0, 1.25)
    meshes = candidate_meshes(devices, base_cfg.model.num_experts, mode)
    tried: list[PlanResult] = []
    what = "remat policies" if mode == "train" else "KV cache layouts"
    print(f"search: {len(meshes)} meshes x {len(policies)} {what} x {len(capacities)} capacity factors on "
          f"{topology.name}, at most {max_compiles} compiles", file=out)
    print(SEARCH_HEADER, file=out, flush=True)
    shown_skips: set = set()
    ragged_refused = False  # some topologies' compilers refuse the ragged all-to-all of dropless dispatch
    for capacity in capacities:
        for policy in policies:
            compiled_here = 0
            for mesh in meshes:
                if compiled_here >= meshes_per_policy:
                    break
                if len(tried) >= max_compiles:
                    print(f"stopped: --max-compiles {max_compiles} reached", file=out)
                    return tried, None
                cfg = apply_overrides(base_cfg, [f"mesh.{k}={v}" for k, v in mesh.items()] + policy +
                                      [f"model.moe_capacity_factor={capacity}"])
                shards = math.prod(mesh[a] for a in cfg.sharding.batch)
                batch = global_batch or shards
                if mode == "train" and batch % shards:
                    continue  # the batch would be replicated over some devices: not a real candidate
                # Rows a device holds: its share of the batch, or all of it where the batch is replicated.
                tokens_per_device = query_len * (batch // shards if batch % shards == 0 else batch)
                hbm = topology.chip.hbm_gib * GIB * topology.chips / devices
                reason = None
                state = _state_bytes(cfg, topology, mode, batch, seq_len, num_draft, weights)
                if state > hbm:
                    reason = f"state alone {state / GIB:.1f} GiB > HBM"
                elif capacity == 0.0 and ragged_refused:
                    reason = "dropless needs the ragged all-to-all the compiler refused above"
                elif capacity == 0.0:
                    buffer = dropless_dispatch_bytes(cfg.model, mesh, tokens_per_device)
                    if buffer > hbm:
                        reason = f"dropless all-to-all buffer {buffer / GIB:.0f} GiB > HBM"
                elif mode == "train":
                    logits = loss_logits_bytes(cfg.model, mesh, tokens_per_device, cfg.train.loss_vocab_chunk)
                    if logits > hbm:
                        reason = f"fp32 logits and their gradient {logits / GIB:.0f} GiB > HBM"
                if reason:  # no compile needed for this verdict
                    key = (tuple(mesh.values()), capacity, tuple(policy), reason)
                    if key not in shown_skips:
                        shown_skips.add(key)
                        if len(shown_skips) <= 8:
                            skipped = compile_plan_stub(cfg, topology, mode, seq_len, batch, mesh, reason,
                                                        query_len, num_draft)
                            print(search_row(skipped), file=out, flush=True)
                    continue
                result = compile_plan(cfg, topology, mode, seq_len, global_batch, largest_buffers=0,
                                      prefill_chunk=prefill_chunk, num_draft=num_draft, weights=weights)
                tried.append(result)
                compiled_here += 1
                ragged_refused |= "Ragged all-to-all" in (result.error or "")
                print(search_row(result), file=out, flush=True)
                if result.fits:
                    return tried, result
    if len(shown_skips) > 8:
        print(f"({len(shown_skips) - 8} more candidates skipped without compiling for the same reasons)", file=out)
    return tried, None


def loss_logits_bytes(model_cfg, mesh: dict[str, int], tokens_per_device: int, vocab_chunk: int = 0) -> int:
    """The main and MTP heads' fp32 logits of a device's tokens, and their gradient: the loss keeps
    both live at once. The vocabulary splits over the tensor axis (the act_vocab rule); with
    `train.loss_vocab_chunk` only one chunk of it exists at a time."""
    heads = 1 + model_cfg.num_mtp_heads
    vocab = model_cfg.vocab_size // (mesh["tensor"] if model_cfg.vocab_size % mesh["tensor"] == 0 else 1)
    if vocab_chunk:
        vocab = min(vocab, vocab_chunk)
    return 2 * heads * tokens_per_device * vocab * 4


def dropless_dispatch_bytes(model_cfg, mesh: dict[str, int], tokens_per_device: int) -> int:
    """The send buffer of a dropless expert-parallel MoE layer: every device reserves room for all
    its tokens' choices towards every expert shard (mimo_jax.moe.expert_capacity with factor 0)."""
    shards = mesh["expert"]
    if shards == 1:
        return 0
    itemsize = 2 if model_cfg.dtype == "bfloat16" else 4
    return shards * tokens_per_device * model_cfg.num_experts_per_token * model_cfg.hidden_size * itemsize


def compile_plan_stub(cfg, topology: Topology, mode: str, seq_len: int, global_batch: int, mesh, reason: str,
                      query_len: int, num_draft: int = 0):
    return PlanResult(mode=mode, topology=topology.name, chips=topology.chips, devices=math.prod(mesh.values()),
                      mesh=dict(mesh), remat=cfg.model.remat, capacity_factor=cfg.model.moe_capacity_factor,
                      global_batch=global_batch, seq_len=seq_len, query_len=query_len, num_draft=num_draft,
                      cache_seq=cfg.sharding.cache_seq if mode != "train" else (), compile_s=0.0,
                      error="skipped, " + reason)


def _state_bytes(cfg, topology: Topology, mode: str, batch: int, seq_len: int, num_draft: int = 0,
                 weights: str | None = None) -> int:
    """Parameters, plus AdamW moments in training or the KV cache in inference, per device, from
    the shardings alone."""
    mesh = build_mesh(cfg, topology)
    _, params, _ = abstract_state(cfg.model, mode, weights)
    param_shardings = sharding.state_shardings(params, mesh, cfg.sharding)
    param_bytes = bytes_per_device(params, param_shardings)
    if mode != "train":
        cache = abstract_cache(cfg.model, batch, seq_len, num_draft)
        return param_bytes + bytes_per_device(cache, cache_shardings(cache, mesh, cfg.sharding))
    tx = make_optimizer(cfg.train, params)
    opt = jax.eval_shape(tx.init, params)
    opt_shardings = sharding.optimizer_shardings(tx, opt, param_shardings, mesh)
    return param_bytes + bytes_per_device(opt, opt_shardings)


SEARCH_HEADER = ("| mesh (data,fsdp,expert,tensor) | remat | capacity | batch | fits | peak GiB/chip | "
                 "temp GiB | est. step s | MFU | tokens/s | compile s |\n|---|---|---|---|---|---|---|---|---|---|---|")


def search_row(r: PlanResult) -> str:
    mesh = ",".join(str(r.mesh[a]) for a in ("data", "fsdp", "expert", "tensor"))
    remat = r.remat + (f", cache_seq={'+'.join(r.cache_seq)}" if r.cache_seq else "")
    if r.error:
        error = r.error if len(r.error) <= 80 else f"{r.error[:20]}...{r.error[-57:]}"
        return (f"| {mesh} | {remat} | {r.capacity_factor:g} | {r.global_batch} | no ({error}) | | | | | | "
                f"{r.compile_s:.0f} |")
    top = parse_topology(r.topology)
    low, high = r.tokens_per_second
    rate = f"{low:,.0f}" if high == low else f"{low:,.0f}-{high:,.0f}"
    return (f"| {mesh} | {remat} | {r.capacity_factor:g} | {r.global_batch} | {'yes' if r.fits else 'no'} | "
            f"{r.peak_bytes / GIB:.2f} | {r.temp_bytes / GIB:.2f} | {r.step_seconds:.3g} | "
            f"{100 * mfu(r, top):.1f}% | {rate} | {r.compile_s:.0f} |")
