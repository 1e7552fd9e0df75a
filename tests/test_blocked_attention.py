import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.swa_attention_reference import swa_attention_reference
from mimo_jax.attention import attention
from mimo_jax.blocked_attention import blocked_attention, pays_off

# Compile time dominates these tests; XLA's fast-compile options change no result.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                        "xla_llvm_disable_expensive_passes": True})


def _inputs(seed, b, t, h, kv, dqk, dv, sinks, packed):
    """numpy-made inputs (no eager JAX ops to compile); packed rows hold several segments whose
    boundaries fall anywhere, with positions counting from 0 in each (as `positions_from_segments`)."""
    r = np.random.RandomState(seed)
    shapes = [(b, t, h, dqk), (b, t, kv, dqk), (b, t, kv, dv), (b, t, h, dv)]
    arrays = [r.randn(*shape).astype(np.float32) for shape in shapes]
    q, k, v, ct = map(jnp.asarray, arrays)
    s = jnp.asarray(2 * r.randn(h).astype(np.float32)) if sinks else None
    if not packed:
        return q, k, v, s, ct, jnp.asarray(np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))), None
    seg = np.cumsum(r.rand(b, t) < 0.12, axis=1).astype(np.int32)
    idx = np.broadcast_to(np.arange(t), (b, t))
    starts = np.concatenate([np.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    pos = idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    return q, k, v, s, ct, jnp.asarray(pos.astype(np.int32)), jnp.asarray(seg)


def _value_and_grads(fn, q, k, v, s, ct):
    out, pullback = jax.vjp(fn, q, k, v, s)
    return out, pullback(ct)


def _assert_same(got, want):
    (out, grads), (want_out, want_grads) = got, want
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
    for name, g, w in zip("qkvs", grads, want_grads):
        assert (g is None) == (w is None)
        if w is not None:
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


@pytest.mark.parametrize(
    "t, window, block, kv, packed, sinks",
    [
        (37, 5, 8, 2, True, True),       # window < block: one block back; the last block padded
        (40, 8, 8, 1, False, False),     # window == block, MQA
        (37, 13, 8, 2, True, False),     # window > block: two blocks back
        (37, None, 8, 1, True, True),    # causal: folded triangle over an odd number of blocks
        (40, None, 10, 2, False, True),  # causal, even block count: offset N/2 pairs with itself
        (37, 30, 8, 4, True, True),      # a window reaching most of the sequence: folded and masked
    ],
)
def test_blocked_equals_the_dense_reference_in_values_and_gradients(t, window, block, kv, packed, sinks):
    q, k, v, s, ct, pos, seg = _inputs(t + (window or 0), 2, t, 4, kv, 12, 5, sinks, packed)

    @fast_jit
    def both(q, k, v, s, ct, pos, seg):
        def blocked(q, k, v, s):
            return blocked_attention(q, k, v, s, window=window, positions_BT=pos, segment_ids_BT=seg, block_size=block)

        def dense(q, k, v, s):
            return swa_attention_reference(q, k, v, s, window=window, q_positions=pos, kv_positions=pos,
                                           segment_ids=seg)

        return _value_and_grads(blocked, q, k, v, s, ct), _value_and_grads(dense, q, k, v, s, ct)

    _assert_same(*both(q, k, v, s, ct, pos, seg))


def test_xla_impl_is_blocked_for_self_attention_and_dense_for_a_cache():
    t, window = 40, 4
    q, k, v, s, ct, pos, seg = _inputs(3, 1, t, 4, 2, 8, 6, True, True)

    def xla(q, k, v, s, q_pos, kv_pos=None, seg=None):
        kv_pos = q_pos if kv_pos is None else kv_pos  # the same object: the caller's self-attention promise
        return attention(q, k, v, s, window=window, q_positions=q_pos, kv_positions=kv_pos, segment_ids=seg, impl="xla")

    @fast_jit
    def calls(q, k, v, s, ct, pos, seg):
        def dense(q, k, v, s):
            return swa_attention_reference(q, k, v, s, window=window, q_positions=pos, kv_positions=pos,
                                           segment_ids=seg)

        self_attention = _value_and_grads(lambda *a: xla(*a, pos, seg=seg), q, k, v, s, ct)
        # Queries against a longer cache are not self-attention: the dense reference answers them.
        cached = xla(q[:, -3:], k, v, s, pos[:, -3:], pos)
        want_cached = swa_attention_reference(q[:, -3:], k, v, s, window=window, q_positions=pos[:, -3:],
                                              kv_positions=pos)
        return self_attention, _value_and_grads(dense, q, k, v, s, ct), cached, want_cached

    self_attention, want, cached, want_cached = calls(q, k, v, s, ct, pos, seg)
    _assert_same(self_attention, want)
    np.testing.assert_allclose(cached, want_cached, rtol=1e-6)
    # The default block (32 here) is below T: the blocked path built no [T, T] array.
    assert _max_square_dim(jax.make_jaxpr(functools.partial(xla, seg=seg))(q, k, v, s, pos).jaxpr) < t
    # Two position arrays (two tracers here) make no self-attention promise: dense, [T, T] scores.
    assert _max_square_dim(jax.make_jaxpr(xla)(q, k, v, s, pos, pos).jaxpr) >= t
    with pytest.raises(ValueError, match="unknown attention impl"):
        attention(q, k, v, s, window=window, q_positions=pos, kv_positions=pos, impl="flash")


def _max_square_dim(jaxpr):
    """The largest n such that some intermediate (sub-jaxprs included) has two dims >= n."""
    best = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            dims = sorted(getattr(var.aval, "shape", ()), reverse=True)
            if len(dims) >= 2:
                best = max(best, dims[1])
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    best = max(best, _max_square_dim(sub))
    return best


@pytest.mark.parametrize("window, block", [(32, None), (None, 128)])
def test_forward_and_backward_never_build_a_t_by_t_array(window, block):
    t = 512
    q, k, v, s, ct, pos, _ = _inputs(0, 1, t, 2, 1, 16, 8, True, False)

    def grads(fn):
        return jax.make_jaxpr(lambda q, k, v, s: jax.vjp(fn, q, k, v, s)[1](ct))(q, k, v, s).jaxpr

    blocked = grads(lambda q, k, v, s: blocked_attention(q, k, v, s, window=window, positions_BT=pos, block_size=block))
    dense = grads(lambda q, k, v, s: swa_attention_reference(q, k, v, s, window=window, q_positions=pos,
                                                             kv_positions=pos))
    assert _max_square_dim(dense) >= t  # the walk does see the dense path's scores
    assert _max_square_dim(blocked) <= 128


def test_shapes_it_cannot_take_raise():
    q, k, v, s, _, pos, _ = _inputs(0, 1, 8, 4, 2, 8, 4, True, False)
    with pytest.raises(ValueError, match="self-attention"):
        blocked_attention(q, k[:, :4], v[:, :4], s, window=2, positions_BT=pos)
    with pytest.raises(ValueError, match="not a multiple"):
        blocked_attention(q[:, :, :3], k, v, s[:3], window=2, positions_BT=pos)
    with pytest.raises(ValueError, match="block_size"):
        blocked_attention(q, k, v, s, window=2, positions_BT=pos, block_size=0)


def test_blocking_is_used_only_where_it_pays_off():
    assert pays_off(40, 4) and pays_off(4096, 128) and pays_off(513, None)
    assert not pays_off(32, 4)  # one block: the dense pass does the same work
    assert not pays_off(512, None)  # causal up to 512 tokens: one dense pass is faster
