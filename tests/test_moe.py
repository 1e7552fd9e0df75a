import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mimo_jax.config import ModelConfig
from mimo_jax.moe import experts_dense, experts_gathered, experts_sorted, route


def _cfg(**kw):
    base = dict(num_layers=2, layer_types=("global", "swa"), mlp_types=("dense", "moe"), num_experts=8,
                num_experts_per_token=2, hidden_size=16)
    return ModelConfig(**{**base, **kw})


def test_bias_steers_selection_but_not_weights():
    cfg = _cfg()
    x = jax.random.normal(jax.random.key(0), (5, 16))
    router = jax.random.normal(jax.random.key(1), (16, 8))
    bias = jnp.zeros(8).at[7].set(10.0)
    weights, experts, _ = route(x, router, bias, cfg)
    assert np.all(np.asarray(experts) == 7, axis=1).sum() == 0 and np.all(np.any(np.asarray(experts) == 7, axis=1))
    scores = jax.nn.sigmoid(x @ router)
    chosen = jnp.take_along_axis(scores, experts, 1)
    np.testing.assert_allclose(weights, chosen / chosen.sum(1, keepdims=True), rtol=1e-6)


def test_group_limited_routing_picks_from_top_groups_only():
    cfg = _cfg(n_group=4, topk_group=1, num_experts_per_token=2, routed_scaling_factor=2.5)
    x = jax.random.normal(jax.random.key(2), (64, 16))
    router = jax.random.normal(jax.random.key(3), (16, 8))
    weights, experts, _ = route(x, router, jnp.zeros(8), cfg)
    groups = np.asarray(experts) // 2
    assert np.all(groups[:, 0] == groups[:, 1])
    np.testing.assert_allclose(weights.sum(1), 2.5, rtol=1e-6)


@settings(max_examples=12, deadline=None)
@given(tokens=st.integers(1, 24), experts=st.integers(1, 6), top_k=st.integers(1, 3), seed=st.integers(0, 1000))
def test_sorted_and_gathered_dispatch_match_the_dense_reference_with_gradients(tokens, experts, top_k, seed):
    top_k = min(top_k, experts)
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (tokens, 8))
    w = [jax.random.normal(k, s) * 0.3 for k, s in zip(keys[1:4], [(experts, 8, 4), (experts, 8, 4), (experts, 4, 8)])]
    # Skewed choices leave some experts empty and give others a single token.
    ids = jax.random.randint(keys[4], (tokens, top_k), 0, max(1, experts // 2 + 1))
    weights = jax.random.uniform(keys[4], (tokens, top_k))

    def loss(fn, x, *w):
        return jnp.sum(fn(x, weights, ids, *w) ** 2)

    @functools.partial(jax.jit, static_argnums=0)  # one compile per example, not an op-by-op run (8x faster)
    def values_and_gradients(fn, x, *w):
        return fn(x, weights, ids, *w), jax.grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2, 3))(x, *w)

    y_dense, g_dense = values_and_gradients(experts_dense, x, *w)
    # The sorted dispatch (training) and the gathered weights (few-token decode steps).
    for fn in (experts_sorted, experts_gathered):
        y, g = values_and_gradients(fn, x, *w)
        np.testing.assert_allclose(y, y_dense, rtol=1e-5, atol=1e-5)
        for a, b in zip(g, g_dense):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
