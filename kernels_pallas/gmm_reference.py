"""Pure-JAX references for the grouped matmuls in `gmm.py` (XLA, any backend)."""

import jax
import jax.numpy as jnp


def gmm_reference(lhs_MK, rhs, group_sizes_G, transpose_rhs=False):
    """Rows of group g times rhs[g] ([G, K, N], or [G, N, K] if transpose_rhs); fp32 accumulate."""
    rhs_GKN = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
    out_MN = jax.lax.ragged_dot(lhs_MK, rhs_GKN, group_sizes_G.astype(jnp.int32), preferred_element_type=jnp.float32)
    return out_MN.astype(lhs_MK.dtype)


def tgmm_reference(lhs_MK, rhs_MN, group_sizes_G, num_groups=None):
    """Per-group lhs_g^T @ rhs_g -> [G, K, N] in lhs.dtype; rows past sum(group_sizes) are ignored."""
    num_groups = group_sizes_G.shape[0] if num_groups is None else num_groups
    ends_G = jnp.cumsum(group_sizes_G.astype(jnp.int32))[:num_groups]
    rows_M = jnp.arange(lhs_MK.shape[0])
    group_of_row_M = jnp.searchsorted(ends_G, rows_M, side="right")  # == num_groups past the end
    one_hot_MG = jax.nn.one_hot(group_of_row_M, num_groups, dtype=jnp.float32)
    out_GKN = jnp.einsum(
        "mg,mk,mn->gkn", one_hot_MG, lhs_MK.astype(jnp.float32), rhs_MN.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    return out_GKN.astype(lhs_MK.dtype)
