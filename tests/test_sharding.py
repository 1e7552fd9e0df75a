"""Meshes on 8 simulated CPU devices: the same loss, logits and gradients as one device, and
parameters / optimizer state placed as the rules say."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mimo_jax import MiMoV2Flash, load_config, load_hf, sharding
from mimo_jax.config import ConfigError
from mimo_jax.fp8_resident import Fp8Weight
from mimo_jax.objective import lm_loss
from mimo_jax.plan.compiling import build_step
from mimo_jax.sharding import (
    MeshConfig,
    ShardingRules,
    logical_spec,
    make_mesh,
    optimizer_shardings,
    shard_model,
    state_shardings,
)
from tests.conftest import GOLDEN_DIR

MESHES = {
    "data": MeshConfig(data=8, fsdp=1),
    "fsdp": MeshConfig(fsdp=8),
    "fsdp x expert": MeshConfig(fsdp=2, expert=4),
    "fsdp x tensor x expert": MeshConfig(fsdp=2, tensor=2, expert=2),
}


@pytest.fixture(scope="module")
def setup():
    overrides = [
        "model.vocab_size=96", "model.hidden_size=32", "model.num_layers=4",
        "model.layer_types=[global, swa, swa, global]", "model.mlp_types=[dense, moe, moe, moe]",
        "model.qk_head_dim=24", "model.v_head_dim=16", "model.intermediate_size=48",
        "model.moe_intermediate_size=16", "model.num_experts=8", "model.num_experts_per_token=2",
        "model.sliding_window=3", "model.initializer_range=0.2",
    ]
    cfg = load_config("tiny", overrides).model
    ids = jax.random.randint(jax.random.key(3), (8, 24), 0, cfg.vocab_size)
    seg = jnp.broadcast_to((jnp.arange(24) >= 15).astype(jnp.int32), (8, 24))
    return cfg, ids, seg


def _train_step(graphdef, tx):
    def step(params, opt_state, rest, ids, seg):
        def loss(params):
            out = nnx.merge(graphdef, params, rest)(ids, seg)
            return lm_loss(out, ids, seg)[0], out.logits

        (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return value, logits, grads, optax.apply_updates(params, updates), opt_state
    return step


_SINGLE_DEVICE = {}  # the unsharded reference run of a config, which several tests compare against


def _run(cfg, ids, seg, mesh=None, rules=ShardingRules()):
    if mesh is None:
        key = (cfg, id(ids), id(seg))
        if key not in _SINGLE_DEVICE:
            _SINGLE_DEVICE[key] = _run_once(cfg, ids, seg)
        return _SINGLE_DEVICE[key]
    return _run_once(cfg, ids, seg, mesh, rules)


def _run_once(cfg, ids, seg, mesh=None, rules=ShardingRules()):
    graphdef, params, rest = nnx.split(MiMoV2Flash(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    tx = optax.adamw(1e-2, eps=1e-3)  # eps keeps round-off in near-zero gradients from steering the update
    if mesh is None:
        return jax.jit(_train_step(graphdef, tx))(params, tx.init(params), rest, ids, seg)
    param_shardings = state_shardings(params, mesh, rules)
    params = jax.device_put(params, param_shardings)
    rest = jax.device_put(rest, state_shardings(rest, mesh, rules))
    opt_shardings = optimizer_shardings(tx, jax.eval_shape(tx.init, params), param_shardings, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    batch = NamedSharding(mesh, logical_spec(("batch", "seq"), rules, mesh, ids.shape))
    step = jax.jit(_train_step(graphdef, tx), out_shardings=(None, None, param_shardings, param_shardings, opt_shardings))
    with sharding.activate(mesh, rules):
        return step(params, opt_state, rest, jax.device_put(ids, batch), jax.device_put(seg, batch))


def _assert_tree_close(got, want, rtol):
    for (path, g), (_, w) in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves_with_path(want)):
        w = np.asarray(w)
        np.testing.assert_allclose(np.asarray(g), w, rtol=rtol, atol=rtol * max(1.0, float(np.abs(w).max())),
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_step_equals_single_device(setup, mesh_name):
    cfg, ids, seg = setup
    mesh = make_mesh(MESHES[mesh_name])
    want = _run(cfg, ids, seg)
    got = _run(cfg, ids, seg, mesh)
    loss, logits, grads, new_params, opt_state = got
    np.testing.assert_allclose(loss, want[0], rtol=1e-5)
    np.testing.assert_allclose(logits, want[1], rtol=1e-4, atol=1e-5)
    _assert_tree_close(grads, want[2], 1e-4)
    _assert_tree_close(new_params, want[3], 1e-4)

    # Parameters and both Adam moments are placed by the rules (weights split over fsdp/expert/tensor).
    expected = state_shardings(new_params, mesh, ShardingRules())
    adam = opt_state[0]
    for tree in (new_params, adam.mu, adam.nu):
        for (path, leaf), (_, spec) in zip(jax.tree_util.tree_leaves_with_path(tree),
                                           jax.tree_util.tree_leaves_with_path(expected)):
            assert leaf.sharding.is_equivalent_to(spec, leaf.ndim), (mesh_name, jax.tree_util.keystr(path), leaf.sharding)
    assert adam.count.sharding.is_fully_replicated
    split = [leaf for leaf in jax.tree.leaves(adam.mu) if not leaf.sharding.is_fully_replicated]
    assert split or mesh_name == "data"


def test_pallas_kernels_under_a_mesh_match_single_device(setup):
    """The kernels run per device under shard_map (heads over tensor, experts over expert)."""
    cfg, ids, seg = setup
    import dataclasses

    cfg = dataclasses.replace(cfg, attention_impl="pallas", moe_impl="pallas")
    want = _run(cfg, ids, seg)
    got = _run(cfg, ids, seg, make_mesh(MESHES["fsdp x tensor x expert"]))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    _assert_tree_close(got[2], want[2], 1e-4)


def test_expert_weights_are_split_over_the_expert_axis(setup):
    cfg, _, _ = setup
    mesh = make_mesh(MESHES["fsdp x expert"])
    model = sharding.shard_model(MiMoV2Flash(cfg, rngs=nnx.Rngs(0)), mesh, ShardingRules())
    moe_layers = [run.mlp for seg in model.segments for run in seg.runs if hasattr(run.mlp, "w_gate")]
    w_gate = moe_layers[0].w_gate[...]
    local = w_gate.addressable_shards[0].data.shape
    assert local[-3:] == (cfg.num_experts // 4, cfg.hidden_size // 2, cfg.moe_intermediate_size)


def test_mesh_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="needs 16 devices"):
        MeshConfig(data=4, fsdp=4).shape(8)
    with pytest.raises(ConfigError, match="at most one axis"):
        MeshConfig(data=-1, fsdp=-1).shape(8)
    with pytest.raises(ConfigError, match="unknown mesh axes"):
        ShardingRules(embed=("model",))
    assert MeshConfig(data=2, expert=2).shape(8) == (2, 2, 2, 1)


def test_a_mesh_axis_only_shards_dimensions_it_divides():
    mesh = make_mesh(MeshConfig(fsdp=2, tensor=4))
    rules = ShardingRules()
    assert logical_spec(("kv_heads",), rules, mesh, (8,)) == jax.sharding.PartitionSpec("tensor")
    assert logical_spec(("kv_heads",), rules, mesh, (2,)) == jax.sharding.PartitionSpec()
    assert logical_spec(("batch", "seq"), rules, mesh, (8, 5)) == jax.sharding.PartitionSpec("fsdp")


def test_sharded_train_step_keeps_layout_and_matches_unsharded_steps(setup):
    from mimo_jax.train_step import sharded_train_step, train_step_fn

    cfg, ids, seg = setup
    tx = optax.adamw(1e-2, eps=1e-3)
    graphdef, params, rest = nnx.split(MiMoV2Flash(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    mesh = make_mesh(MESHES["fsdp x tensor x expert"])
    step, shardings = sharded_train_step(graphdef, params, rest, tx, mesh, ShardingRules(), ids.shape)
    unsharded = jax.jit(train_step_fn(graphdef, tx))

    # Copies: the sharded step donates its inputs, and device_put may reuse the unsharded buffers.
    s_params = jax.device_put(jax.tree.map(jnp.copy, params), shardings["params"])
    s_opt = jax.jit(tx.init, out_shardings=shardings["opt_state"])(s_params)
    s_rest = jax.device_put(jax.tree.map(jnp.copy, rest), shardings["rest"])
    batch = jax.device_put(ids, shardings["batch"]), jax.device_put(seg, shardings["batch"])
    opt_state = tx.init(params)
    for _ in range(2):
        s_params, s_opt, s_metrics = step(s_params, s_opt, s_rest, *batch)
        params, opt_state, metrics = unsharded(params, opt_state, rest, ids, seg)
        np.testing.assert_allclose(s_metrics["loss"], metrics["loss"], rtol=1e-5)
        np.testing.assert_allclose(s_metrics["mtp"], metrics["mtp"], rtol=1e-5)
    for leaf, want in zip(jax.tree.leaves(s_params), jax.tree.leaves(shardings["params"])):
        assert leaf.sharding == want


# Experts over expert x tensor (4 shards of 2 experts, the FFN width whole) with the tokens of each
# sequence split over tensor: each device dispatches only its own tokens, over the 4-way exchange.
WIDE_EP = ("fsdp x tensor x expert", ShardingRules(experts=("expert", "tensor"), seq=("tensor",)))


@pytest.mark.parametrize("capacity_factor, exact, layout", [
    (0.0, True, ("fsdp x expert", ShardingRules())), (0.5, False, ("fsdp x expert", ShardingRules())),
    (8.0, True, WIDE_EP)])
def test_expert_dispatch_dropless_and_with_capacity(setup, capacity_factor, exact, layout):
    """Dropless (ragged exchange) and a capacity that fits everything equal one device; a small
    capacity drops choices (their expert output is zero) but stays finite."""
    import dataclasses

    cfg, ids, seg = setup
    cfg = dataclasses.replace(cfg, moe_capacity_factor=capacity_factor)
    mesh_name, rules = layout
    want = _run(cfg, ids, seg)
    got = _run(cfg, ids, seg, make_mesh(MESHES[mesh_name]), rules)
    if exact:
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
        _assert_tree_close(got[2], want[2], 1e-4)
    else:
        assert np.isfinite(got[0]) and abs(float(got[0]) - float(want[0])) > 1e-6


def test_a_batch_too_small_for_the_expert_axis_sends_each_choice_once(setup):
    """One sequence over fsdp x expert (2 x 4): every device holds the same tokens, so each sends
    only its share of the choices (dropless, and into capacity slots) and the partial outputs are
    summed over the mesh; the logits equal one device's."""
    import dataclasses

    cfg, ids, seg = setup
    ids, seg = ids[:1], seg[:1]
    mesh = make_mesh(MESHES["fsdp x expert"])
    assert logical_spec(("batch", "seq"), ShardingRules(), mesh, ids.shape) == jax.sharding.PartitionSpec()

    @nnx.jit
    def logits(model, ids, seg):
        with sharding.activate(mesh, ShardingRules()):
            return model(ids, seg).logits

    for capacity_factor in (0.0, 8.0):
        model = MiMoV2Flash(dataclasses.replace(cfg, moe_capacity_factor=capacity_factor), rngs=nnx.Rngs(0))
        want = np.asarray(model(ids, seg).logits)
        shard_model(model, mesh, ShardingRules())
        np.testing.assert_allclose(np.asarray(logits(model, ids, seg)), want, rtol=1e-4, atol=1e-5)


def test_wide_expert_parallelism_splits_experts_over_two_axes_and_tokens_over_the_sequence(setup):
    cfg, ids, _ = setup
    mesh_name, rules = WIDE_EP
    mesh = make_mesh(MESHES[mesh_name])
    assert logical_spec(("experts", "embed", "mlp"), rules, mesh, (8, 32, 16)) == \
        jax.sharding.PartitionSpec(("expert", "tensor"), "fsdp")
    model = sharding.shard_model(MiMoV2Flash(cfg, rngs=nnx.Rngs(0)), mesh, rules)
    moe = [run.mlp for seg in model.segments for run in seg.runs if hasattr(run.mlp, "w_gate")][0]
    assert moe.w_gate[...].addressable_shards[0].data.shape[-3:] == (2, 16, 16)  # 2 experts, whole width
    assert logical_spec(("batch", "seq"), rules, mesh, ids.shape) == jax.sharding.PartitionSpec(("fsdp", "expert"),
                                                                                               "tensor")


def test_expert_parallel_train_step_compiles_for_a_tpu_slice(setup):
    """On TPU the dropless exchange is a real ragged all-to-all; Mosaic kernels run per device."""
    import dataclasses

    from kernels_pallas.tpu_aot import tpu_topology
    from mimo_jax.train_step import abstract_model_state, sharded_train_step

    cfg, ids, _ = setup
    cfg = dataclasses.replace(cfg, attention_impl="pallas", moe_impl="pallas", kernel_mode="mosaic")
    mesh = make_mesh(MeshConfig(fsdp=1, expert=4), devices=tpu_topology("v5p").devices)
    graphdef, params, rest = abstract_model_state(cfg)
    tx = optax.adamw(1e-3)
    step, shardings = sharded_train_step(graphdef, params, rest, tx, mesh, ShardingRules(), ids.shape)

    def place(tree, tree_shardings):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, tree_shardings)

    batch = jax.ShapeDtypeStruct(ids.shape, ids.dtype, sharding=shardings["batch"])
    compiled = step.lower(place(params, shardings["params"]), place(jax.eval_shape(tx.init, params), shardings["opt_state"]),
                          place(rest, shardings["rest"]), batch, batch).compile()
    hlo = compiled.as_text()
    assert "ragged-all-to-all" in hlo and "tpu_custom_call" in hlo


def test_mtp_heads_and_the_embedding_lookup_keep_the_batch_split():
    """Sequence-parallel wide-EP layout (scaling.md's fp32 rows) on 8 CPU devices: no device holds
    the MTP heads' activations of the whole batch and sequence, and the embedding lookup and its
    gradient run on the table's vocabulary shard, not on the whole table (both did before the
    constraints in MTPHead and sharding.take_rows: XLA took eh_proj's and the table's `embed` split)."""
    b, t, vocab, width = 4, 80, 136, 88  # sizes no weight shares, so a shape names its array
    cfg = load_config("tiny", [
        f"train.batch_size={b}", f"train.seq_len={t}", "mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2",
        "sharding.seq=[tensor]", "sharding.experts=[expert,tensor]", f"model.vocab_size={vocab}",
        f"model.hidden_size={width}", "model.intermediate_size=56", "model.moe_intermediate_size=40",
        "model.num_layers=3", "model.layer_types=[swa, swa, global]", "model.mlp_types=[dense, moe, moe]",
        "model.qk_head_dim=24", "model.v_head_dim=16", "model.num_mtp_heads=3"])
    step, args, _ = build_step(cfg, make_mesh(cfg.mesh), "train", b, t, t)
    hlo = step.trace(*args).lower().compile().as_text()
    assert not re.findall(rf"\w+\[3,{b},{t},\d+\]", hlo)  # [heads, whole batch, whole sequence, ...]
    table_ops = [line for line in hlo.splitlines() if re.search(rf"= f32\[{vocab},{width}\]", line) and "_take" in line]
    assert not table_ops, table_ops[:3]  # gathers / scatter-adds over the whole table
    assert re.search(rf"f32\[{vocab // 2},{width}\]", hlo)  # the vocabulary shard, gathered over embed


@pytest.mark.parametrize("moe_impl", ["xla", "pallas"])
def test_fp8_resident_weights_shard_with_their_scales_and_keep_the_logits(moe_impl):
    """An FP8-resident model (load_hf(weights="fp8")) on a data x expert x tensor mesh: each weight's
    e4m3 values and block scales split over the same mesh axes, and the sharded forward gives the
    unsharded logits: experts dequantised before the shard_map dispatch (xla), or passed into it as
    FP8 and dequantised in the Pallas kernel (w_gate, w_up; w_down's 64 rows per expert cannot split
    into 128-row scale blocks over the tensor axis, so it is dequantised first)."""
    path = os.path.join(GOLDEN_DIR, "fp8_d")
    ids = jnp.asarray(np.load(os.path.join(path, "golden.npz"))["input_ids"])
    model = load_hf(path, jnp.float32, weights="fp8", moe_impl=moe_impl)
    want = np.asarray(model(ids).logits)
    mesh = make_mesh(MeshConfig(fsdp=2, expert=2, tensor=2))
    shard_model(model, mesh, ShardingRules())
    w_gate = nnx.state(model)["segments"][0]["runs"][1]["mlp"]["w_gate"].get_value()
    assert isinstance(w_gate, Fp8Weight)
    assert w_gate.values.sharding.spec == w_gate.scale.sharding.spec == P(None, None, "expert", "fsdp", "tensor")

    @nnx.jit
    def logits(model, ids):
        with sharding.activate(mesh, ShardingRules()):
            return model(ids).logits

    np.testing.assert_allclose(np.asarray(logits(model, ids)), want, rtol=0, atol=1e-5 * np.abs(want).max())
