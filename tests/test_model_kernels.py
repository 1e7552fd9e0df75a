"""The whole model under each kernel choice: same logits and gradients on CPU (Pallas kernels in
interpret mode), and a full train step of a reduced-depth model compiled for real TPU chips."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mimo_jax import MiMoV2Flash, load_config


def _loss_fn(graphdef, rest):
    def loss(params, input_ids, segment_ids):
        out = nnx.merge(graphdef, params, rest)(input_ids, segment_ids)
        logits = jnp.concatenate([out.logits[None], out.mtp_logits]) if out.mtp_logits is not None else out.logits
        # A fixed pseudo-random projection of every logit, so every output position matters.
        weights = jnp.cos(jnp.arange(logits.size, dtype=jnp.float32) * 0.37).reshape(logits.shape)
        return jnp.sum(logits.astype(jnp.float32) * weights), out.logits
    return loss


def _logits_and_grads(cfg, input_ids, segment_ids):
    graphdef, params, rest = nnx.split(MiMoV2Flash(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    # Jitted: op by op, the interpret-mode kernels cost more than compiling the whole step.
    (_, logits), grads = jax.jit(jax.value_and_grad(_loss_fn(graphdef, rest), has_aux=True))(params, input_ids, segment_ids)
    return logits, grads


_REFERENCE = {}


# The reference is the defaults off TPU (block-local XLA attention, the tiled XLA grouped matmul).
@pytest.mark.parametrize("attention_impl, moe_impl", [("pallas", "pallas"), ("pallas", "ragged_dot"), ("dense", "dense")])
def test_every_kernel_choice_gives_the_same_logits_and_gradients(small_overrides, attention_impl, moe_impl):
    cfg = load_config("tiny", small_overrides + ["model.sliding_window=5"]).model
    input_ids = jax.random.randint(jax.random.key(1), (2, 37), 0, cfg.vocab_size)
    segment_ids = jnp.stack([jnp.zeros(37, jnp.int32), (jnp.arange(37) >= 20).astype(jnp.int32)])
    if "ref" not in _REFERENCE:  # the default kernels' results, the same for every choice: computed once
        _REFERENCE["ref"] = _logits_and_grads(cfg, input_ids, segment_ids)
    ref_logits, ref_grads = _REFERENCE["ref"]
    logits, grads = _logits_and_grads(
        dataclasses.replace(cfg, attention_impl=attention_impl, moe_impl=moe_impl), input_ids, segment_ids
    )
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-5)
    flat_ref = dict(nnx.to_flat_state(ref_grads))
    for path, grad in nnx.to_flat_state(grads):
        want = np.asarray(flat_ref[path].get_value())
        np.testing.assert_allclose(grad.get_value(), want, atol=1e-4 * max(1.0, float(np.abs(want).max())),
                                   err_msg="/".join(map(str, path)))


REDUCED_DEPTH = [  # the release's attention and expert shapes, one layer of each kind, a narrow residual stream
    "model.num_layers=2", "model.layer_types=[global, swa]", "model.mlp_types=[dense, moe]",
    "model.hidden_size=512", "model.vocab_size=2048", "model.num_attention_heads=16", "model.global_kv_heads=1",
    "model.swa_kv_heads=2", "model.intermediate_size=1024", "model.moe_intermediate_size=256",
    "model.num_experts=32", "model.num_experts_per_token=8", "model.num_mtp_heads=1",
    "model.attention_impl=pallas", "model.moe_impl=pallas", "model.kernel_mode=mosaic",
]


def test_train_step_with_pallas_kernels_compiles_for_tpu():
    """jit(loss -> grads -> AdamW update) of a reduced-depth model: GQA 16:1 global and 8:1 SWA
    layers with d 192/128 and window 128, top-8 MoE; Mosaic lowers every kernel in it. For v5e (the
    Colab TPU): each kernel alone also compiles for v5p (kernels_pallas/*_test.py)."""
    from kernels_pallas.tpu_aot import compile_for_tpu, pallas_kernel_names

    cfg = load_config("mimo_v2_flash", REDUCED_DEPTH).model
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: MiMoV2Flash(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
    tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.1)
    opt_state = jax.eval_shape(tx.init, params)

    def train_step(params, opt_state, rest, input_ids, segment_ids):
        def loss(params):
            logits = nnx.merge(graphdef, params, rest)(input_ids, segment_ids).logits[:, :-1]
            return optax.softmax_cross_entropy_with_integer_labels(logits, input_ids[:, 1:]).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    ids = jax.ShapeDtypeStruct((2, 512), jnp.int32)
    compiled = compile_for_tpu(train_step, params, opt_state, rest, ids, ids, topology="v5e")
    kernels = {"swa_attention_fwd", "swa_attention_dq", "swa_attention_dkv", "gmm", "gmm_transposed_rhs", "tgmm"}
    assert pallas_kernel_names(compiled) == kernels
