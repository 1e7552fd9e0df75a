"""The off-TPU grouped matmul (`mimo_jax.blocked_gmm`) against `jax.lax.ragged_dot`, values and gradients.

Group sizes are runtime values, so each (shape, block) compiles once and hypothesis draws the sizes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kernels_pallas.gmm_reference import gmm_reference
from mimo_jax.blocked_gmm import blocked_gmm, default_block_rows

M, K, N, G = 44, 24, 12, 5  # M is not a multiple of any block tried below
BLOCKS = (8, 16, 64)  # tiles inside M, and one tile taller than M


@functools.partial(jax.jit, static_argnames=("block", "impl"))
def forward_and_grads(lhs, rhs, group_sizes, d_out, *, block, impl):
    def forward(lhs, rhs):
        if impl == "blocked":
            return blocked_gmm(lhs, rhs, group_sizes, block_rows=block)
        return gmm_reference(lhs, rhs, group_sizes)

    out, vjp = jax.vjp(forward, lhs, rhs)
    return (out, *vjp(d_out))


def _inputs(dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), 3)
    shapes = [(M, K), (G, K, N), (M, N)]
    return [jax.random.normal(key, shape, jnp.float32).astype(dtype) for key, shape in zip(keys, shapes)]


@st.composite
def group_sizes(draw):
    """Sizes >= 0 summing to at most M: repeated cuts give empty groups, a last cut below M rows
    past the groups."""
    cuts = sorted(draw(st.lists(st.integers(0, M), min_size=G, max_size=G)))
    return np.diff(np.array([0] + cuts)).astype(np.int32)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(sizes=group_sizes(), block=st.sampled_from(BLOCKS))
@example(sizes=np.array([0, 0, 0, 0, 0], np.int32), block=8)  # no rows at all
@example(sizes=np.array([M, 0, 0, 0, 0], np.int32), block=8)  # one expert takes every row
@example(sizes=np.array([0, 0, 0, 0, M], np.int32), block=16)  # ... the last one
@example(sizes=np.array([7, 1, 8, 0, 20], np.int32), block=8)  # boundaries at and around tile edges; rows past the sum
@example(sizes=np.array([1, 1, 1, 1, 1], np.int32), block=64)  # one tile holds every group
@example(sizes=np.array([0, 9, 0, 0, 1], np.int32), block=16)  # mostly rows past the groups
def test_values_and_gradients_equal_ragged_dot(sizes, block):
    lhs, rhs, d_out = _inputs()
    got = forward_and_grads(lhs, rhs, jnp.asarray(sizes), d_out, block=block, impl="blocked")
    want = forward_and_grads(lhs, rhs, jnp.asarray(sizes), d_out, block=None, impl="ragged_dot")
    for name, actual, expected in zip(("out", "d_lhs", "d_rhs"), got, want):
        assert actual.shape == expected.shape and actual.dtype == expected.dtype, name
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-4, err_msg=name)
    out, _, d_rhs = got
    assert not np.any(np.asarray(out[int(sizes.sum()):])), "rows past the groups must be exactly zero"
    assert not np.any(np.asarray(d_rhs[sizes == 0])), "an empty expert must get an exactly zero gradient"


def test_bf16_matches_ragged_dot_to_bf16_rounding():
    lhs, rhs, d_out = _inputs(jnp.bfloat16)
    sizes = jnp.array([10, 0, 17, 3, 9], jnp.int32)
    got = forward_and_grads(lhs, rhs, sizes, d_out, block=16, impl="blocked")
    want = forward_and_grads(lhs, rhs, sizes, d_out, block=None, impl="ragged_dot")
    for actual, expected in zip(got, want):
        assert actual.dtype == jnp.bfloat16
        scale = float(jnp.abs(expected.astype(jnp.float32)).max())
        np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                                   rtol=2e-2, atol=1e-2 * scale)


def test_default_block_and_bad_arguments():
    assert default_block_rows(8192, 32) == 64 and default_block_rows(4, 256) == 16 and default_block_rows(10**6, 2) == 512
    lhs, rhs, _ = _inputs()
    with pytest.raises(ValueError, match=r"\[M, K\] and \[G, K, N\]"):
        blocked_gmm(lhs[:, :5], rhs, jnp.zeros(G, jnp.int32))
    with pytest.raises(ValueError, match="integers of shape"):
        blocked_gmm(lhs, rhs, jnp.zeros(G, jnp.float32))
    with pytest.raises(ValueError, match="integers of shape"):
        blocked_gmm(lhs, rhs, jnp.zeros(G + 1, jnp.int32))


def test_a_traced_step_counts_the_loops_as_their_dropless_work():
    """jaxpr_flops (training's flops_per_second) sees each loop's 2 M K N, forward and both gradients."""
    from mimo_jax.plan import jaxpr_flops

    lhs, rhs, _ = _inputs()
    loss = lambda lhs, rhs: blocked_gmm(lhs, rhs, jnp.array([10, 0, 17, 3, 9], jnp.int32)).sum()  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(lhs, rhs)
    assert jaxpr_flops(jaxpr)["matmul"] == 3 * 2 * M * K * N
