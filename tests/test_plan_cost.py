"""The plan's cost model (mimo_jax.plan.cost): collectives read from HLO text, the probe
decomposition of the layer stack, and, on 8 CPU devices, probes that add up to the whole model
compiled unrolled."""

import collections
import dataclasses
import io

import jax
import jax.numpy as jnp
import pytest

from mimo_jax.config import load_config, release_layer_types, release_mlp_types
from mimo_jax.plan import PlanResult, build_step, hand_flops_per_token, jaxpr_flops, parse_topology, report
from mimo_jax.plan.cost import estimate_cost, parse_collectives, probe_config, probe_layer_kinds
from mimo_jax.sharding import make_mesh

MESH = {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}  # device id = 4 * fsdp + 2 * expert + tensor

HLO = """
  %all-gather.1 = bf16[8,128]{1,0} all-gather(%p), channel_id=1, replica_groups=[4,2]<=[2,2,2]T(2,1,0), dimensions={0}
  %ag-start = (f32[16]{0}, f32[32]{0}) all-gather-start(%q), channel_id=2, replica_groups={{0,4},{1,5},{2,6},{3,7}}
  %all-gather-done = f32[32]{0} all-gather-done(%ag-start)
  %all-reduce.2 = (f32[100]{0}, f32[28]{0}) all-reduce(%a, %b), channel_id=3, replica_groups={}, to_apply=%add
  %reduce-scatter.3 = f32[64]{0} reduce-scatter(%c), channel_id=4, replica_groups=[2,4]<=[8], dimensions={0}
  ROOT %all-to-all.4 = s32[4,10]{1,0} all-to-all(%d), channel_id=5, replica_groups=[4,2]<=[4,2]T(1,0)
  %collective-permute.5 = f32[50]{0} collective-permute(%e), channel_id=6, source_target_pairs={{0,0},{1,2},{2,1},{3,3}}
  %not-a-collective = f32[10]{0} add(%x, %y)
"""


def test_collectives_are_read_with_their_sizes_groups_and_mesh_axes():
    found = parse_collectives(HLO, MESH)
    by_kind = {c.kind: c for c in found[2:]}
    assert len(found) == 6  # the -done op and the add are not collectives
    gather, gather_async = found[0], found[1]
    # [4,2]<=[2,2,2]T(2,1,0): ids transposed, so groups {0,4},{2,6},...: devices differing in fsdp.
    assert gather.axes == ("fsdp",) and gather.group_size == 2
    assert gather.wire_bytes == 8 * 128 * 2 * (1 / 2)
    # all-gather-start's type holds the operand and the output: the output is the 32 floats.
    assert gather_async.axes == ("fsdp",) and gather_async.wire_bytes == pytest.approx(32 * 4 / 2)
    reduce = by_kind["all-reduce"]
    assert reduce.axes == ("fsdp", "expert", "tensor") and reduce.group_size == 8
    assert reduce.wire_bytes == pytest.approx(2 * 128 * 4 * 7 / 8)
    scatter = by_kind["reduce-scatter"]  # [2,4]<=[8]: {0,1,2,3}: expert x tensor
    assert scatter.axes == ("expert", "tensor") and scatter.wire_bytes == 64 * 4 * 3
    a2a = by_kind["all-to-all"]  # [4,2]<=[4,2]T(1,0): {0,2}: expert
    assert a2a.axes == ("expert",) and a2a.wire_bytes == 4 * 10 * 4 / 2
    permute = by_kind["collective-permute"]  # two of four pairs move data
    assert permute.axes == ("expert", "tensor") and permute.wire_bytes == 50 * 4 * 2 / 4


def test_probes_reproduce_every_layer_kind_of_the_stack():
    release = tuple(zip(release_layer_types(), release_mlp_types()))
    assert [(len(k), w) for k, w in probe_layer_kinds(release)] == [(12, -5.0), (18, 6.0)]  # 7 x [global, swa x 5]
    mid = release[:20]  # [global, swa x 4, (global, swa x 5) x 2, global, swa]: 11 + 17 > 20 layers
    assert probe_layer_kinds(mid) == [(mid, 1.0)]
    long = release[:1] + (("swa", "moe"), ("global", "moe")) * 5
    assert [(len(k), w) for k, w in probe_layer_kinds(long)] == [(3, -3.0), (5, 4.0)]
    for kinds in (release, long):
        counted = collections.Counter()
        for probe, weight in probe_layer_kinds(kinds):
            for kind in probe:
                counted[kind] += weight
        assert counted == collections.Counter(kinds)


def test_probe_costs_add_up_to_the_whole_model_compiled_unrolled():
    """6 layers [global dense, swa moe x 5] on a 2x2x2 CPU mesh: the probes (2 and 3 layers)
    extrapolate to the flops, HBM bytes and collectives of the 6 layers compiled unrolled, with two
    micro-batches. (On CPU the MoE runs ragged_dot: the tiled XLA grouped matmul is a loop.)"""
    layers = "model.layer_types=[" + ", ".join(["global"] + ["swa"] * 5) + "]"
    mlps = "model.mlp_types=[" + ", ".join(["dense"] + ["moe"] * 5) + "]"
    cfg = load_config("tiny", ["model.num_layers=6", layers, mlps, "model.num_mtp_heads=1",
                               "mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2", "model.moe_capacity_factor=2",
                               "model.moe_impl=ragged_dot",
                               "train.loss_vocab_chunk=128", "train.grad_accum_steps=2"])
    mesh = make_mesh(cfg.mesh, jax.devices()[:8])
    topology = parse_topology("v5p-16")  # its chip figures price the step; the programs are CPU ones
    batch, seq = 8, 32

    cost = estimate_cost(cfg, topology, mesh, "train", batch, seq, seq, 0, build_step, 1.0)
    assert [(n, w) for n, w, _ in cost.probes] == [(2, -3.0), (3, 4.0)]
    assert cost.micro_batches == 2 and not cost.notes

    whole = probe_config(cfg, tuple(zip(cfg.model.layer_types, cfg.model.mlp_types)))
    step, args, _ = build_step(whole, mesh, "train", batch // 2, seq, seq)
    compiled = step.trace(*args).lower().compile()
    unrolled, text = compiled.cost_analysis(), compiled.as_text()
    assert cost.flops == pytest.approx(2 * unrolled["flops"], rel=1e-3)
    assert cost.hbm_bytes == pytest.approx(2 * unrolled["bytes accessed"], rel=0.02)
    wire = collections.Counter()
    for c in parse_collectives(text, dict(mesh.shape)):
        wire[(c.kind, c.axes)] += 2 * c.wire_bytes
    assert wire and set(wire) == set(cost.collectives)
    for key, value in wire.items():
        assert cost.collectives[key] == pytest.approx(value, rel=0.02), key
    assert cost.compute_seconds == pytest.approx(cost.flops / 459e12)
    assert cost.ici_seconds == pytest.approx(sum(cost.collectives.values()) / 200e9)

    # The plan report prints the estimate and times the step by it.
    result = PlanResult(mode="train", topology=topology.name, chips=8, devices=8, mesh=dict(mesh.shape), remat="none",
                        capacity_factor=2.0, global_batch=batch, seq_len=seq, query_len=seq, hbm_bytes=1.0,
                        traced_flops={"total": cost.flops * 8, "matmul": cost.flops * 8, "pallas": 0.0},
                        hand=hand_flops_per_token(cfg.model, seq, "train"), cost=cost)
    out = io.StringIO()
    report(result, topology, out)
    assert result.step_seconds == cost.overlapped_seconds and "cost model:" in out.getvalue()
    assert f"{cost.serial_seconds:.4g} s with no collective hidden" in out.getvalue()


def test_the_planned_step_follows_gradient_accumulation():
    """The plan traces train.py's own step: with 4 micro-batches, a 4-step scan over quarter batches
    doing the same matmul work. (Compiled, the micro-batches hold less: docs/scaling.md's rows.)"""
    cfg = load_config("tiny", ["model.num_layers=2", "model.layer_types=[global, swa]", "model.mlp_types=[dense, moe]",
                               "model.num_mtp_heads=1", "mesh.fsdp=2"])
    mesh = make_mesh(cfg.mesh, jax.devices()[:2])
    flops = {}
    for accum in (1, 4):
        config = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum_steps=accum))
        step, args, _ = build_step(config, mesh, "train", 8, 32, 32)
        jaxpr = step.trace(*args).jaxpr
        micro = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan" and e.params["length"] == 4]
        assert len(micro) == (accum == 4)
        if micro:
            assert {v.aval.shape for v in micro[0].invars if v.aval.dtype == jnp.int32} >= {(4, 2, 32)}
        flops[accum] = jaxpr_flops(jaxpr)["total"]
    assert flops[4] == pytest.approx(flops[1], rel=1e-6)
