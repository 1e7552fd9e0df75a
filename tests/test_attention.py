import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax.attention import attention, attention_mask


def test_window_sees_that_many_previous_positions_plus_itself():
    pos = jnp.arange(10)[None]
    mask = np.asarray(attention_mask(pos, pos, 3))[0]
    assert mask.sum(1).tolist() == [1, 2, 3, 4, 4, 4, 4, 4, 4, 4]
    assert mask[9, 6] and not mask[9, 5] and not mask[2, 3]


@pytest.mark.parametrize("window", [None, 2, 50])
def test_sinks_scale_the_output_by_sigmoid_of_lse_minus_sink(window):
    keys = jax.random.split(jax.random.key(0), 4)
    b, t, h, kv = 2, 7, 4, 2
    q = jax.random.normal(keys[0], (b, t, h, 12))
    k = jax.random.normal(keys[1], (b, t, kv, 12))
    v = jax.random.normal(keys[2], (b, t, kv, 5))
    sinks = jax.random.normal(keys[3], (h,))
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    with_sinks = attention(q, k, v, sinks, window=window, q_positions=pos, kv_positions=pos)
    without = attention(q, k, v, None, window=window, q_positions=pos, kv_positions=pos)
    # Log-sum-exp of the visible scores, computed independently with GQA expanded by repetition.
    k_full = jnp.repeat(k, h // kv, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k_full) / jnp.sqrt(12.0)
    mask = attention_mask(pos, pos, window)[:, None]
    lse = jax.nn.logsumexp(jnp.where(mask, scores, -jnp.inf), axis=-1)
    expected = without * jax.nn.sigmoid(lse - sinks[None, :, None]).transpose(0, 2, 1)[..., None]
    np.testing.assert_allclose(with_sinks, expected, rtol=1e-5, atol=1e-6)


def test_segment_ids_pair_for_queries_against_a_longer_cache():
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (1, 2, 2, 8))
    k = jax.random.normal(keys[1], (1, 6, 1, 8))
    v = jax.random.normal(keys[2], (1, 6, 1, 4))
    q_pos, kv_pos = jnp.array([[4, 5]]), jnp.arange(6)[None]
    out = attention(q, k, v, None, window=None, q_positions=q_pos, kv_positions=kv_pos,
                    segment_ids=(jnp.array([[1, 1]]), jnp.array([[0, 0, 1, 1, 1, 1]])))
    ref = attention(q, k[:, 2:], v[:, 2:], None, window=None, q_positions=q_pos, kv_positions=kv_pos[:, 2:])
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    with pytest.raises(ValueError, match="pass \\(q, kv\\)"):
        attention(q, k, v, None, window=None, q_positions=q_pos, kv_positions=kv_pos, segment_ids=jnp.ones((1, 2)))
