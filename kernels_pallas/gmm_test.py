"""Tests for the grouped-matmul kernels: TPU-semantics interpret mode against the pure-JAX references,
against the megablox kernel shipped in jax, and an ahead-of-time Mosaic compile for real TPUs.

Shapes come from a few fixed configurations (each one compiles once) and hypothesis draws the group
sizes, which are runtime values. Interpret mode with `pltpu.InterpretParams()` costs a few ms per
grid step, so the grids stay small (a kernel call here is at most ~50 steps).
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.megablox import gmm as megablox_gmm

from kernels_pallas.gmm import gmm, plan_visits, tgmm
from kernels_pallas.gmm_reference import gmm_reference, tgmm_reference

TPU_INTERPRET = pltpu.InterpretParams()
SETTINGS = settings(max_examples=15, deadline=None, derandomize=True, print_blob=True)


class Config(NamedTuple):
    M: int  # rows
    K: int  # contraction
    N: int  # output columns
    G: int  # groups
    dtype: Any
    tiling: tuple[int, int, int]


# M not a multiple of tm with several k- and n-tiles; K and N that fall back to whole-dim tiles; bf16.
CONFIGS = [
    Config(44, 256, 256, 5, jnp.float32, (8, 128, 128)),
    Config(40, 200, 136, 4, jnp.float32, (16, 128, 128)),
    Config(64, 256, 128, 4, jnp.bfloat16, (16, 128, 128)),  # M a multiple of tm
]


@st.composite
def group_sizes_for(draw, num_rows: int, num_groups: int):
    """Sizes >= 0 with sum <= num_rows: cut points drawn in [0, num_rows], sorted.

    Repeated cuts give empty groups (leading, inner, trailing); a last cut below num_rows leaves
    rows past sum(group_sizes).
    """
    cuts = sorted(draw(st.lists(st.integers(0, num_rows), min_size=num_groups, max_size=num_groups)))
    return np.diff(np.array([0] + cuts)).astype(np.int32)


@st.composite
def problems(draw, configs=CONFIGS):
    config = draw(st.sampled_from(configs))
    return config, draw(group_sizes_for(config.M, config.G))


# Edge cases every property test runs besides the drawn ones. CONFIGS[0]: M=44, G=5, tm=8 (tiles end
# at 8, 16, ...; M is padded to 48). CONFIGS[2]: M=64, G=4, tm=16 (no padding).
EDGE_CASES = [
    (CONFIGS[0], [0, 0, 0, 0, 0]),  # no rows at all: all-zero output
    (CONFIGS[0], [44, 0, 0, 0, 0]),  # one group owns everything, trailing empty groups
    (CONFIGS[0], [0, 0, 0, 0, 44]),  # leading empty groups
    (CONFIGS[0], [1, 1, 1, 1, 1]),  # single-token groups all inside the first tile
    (CONFIGS[0], [7, 1, 8, 0, 20]),  # boundaries at, just before and just after tile edges; 8 rows past the sum
    (CONFIGS[0], [0, 9, 0, 0, 1]),  # mostly rows past sum(group_sizes)
    (CONFIGS[2], [64, 0, 0, 0]),  # trailing empty groups start exactly at the (unpadded) end of M
    (CONFIGS[2], [0, 16, 0, 48]),  # every boundary on a tile edge
]


def with_edge_cases(**other_args):
    def decorate(test):
        for config, sizes in EDGE_CASES:
            test = example(problem=(config, np.array(sizes, np.int32)), **other_args)(test)
        return test

    return decorate


def random_inputs(config, *shapes, seed=0):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [jax.random.normal(key, shape, jnp.float32).astype(config.dtype) for key, shape in zip(keys, shapes)]


def assert_close(actual, expected, dtype):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert np.all(np.isfinite(actual)), "non-finite output (a block never written reads as NaN)"
    if dtype == jnp.bfloat16:  # both sides round to bf16: allow a couple of ulps at the output scale
        scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
        np.testing.assert_allclose(actual, expected, rtol=2e-2, atol=1e-2 * scale)
    else:
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-4)


@functools.partial(jax.jit, static_argnames=("tiling", "transpose_rhs"))
def kernel_forward_and_grads(lhs, rhs, group_sizes, dout, *, tiling, transpose_rhs):
    def forward(lhs, rhs):
        return gmm(lhs, rhs, group_sizes, tiling=tiling, transpose_rhs=transpose_rhs, interpret=TPU_INTERPRET)

    out, vjp = jax.vjp(forward, lhs, rhs)
    return (out, *vjp(dout))


@functools.partial(jax.jit, static_argnames=("transpose_rhs",))
def reference_forward_and_grads(lhs, rhs, group_sizes, dout, *, transpose_rhs):
    out, vjp = jax.vjp(lambda lhs, rhs: gmm_reference(lhs, rhs, group_sizes, transpose_rhs), lhs, rhs)
    return (out, *vjp(dout))


@functools.partial(jax.jit, static_argnames=("tiling", "transpose_rhs"))
def kernel_forward(lhs, rhs, group_sizes, *, tiling, transpose_rhs):
    return gmm(lhs, rhs, group_sizes, tiling=tiling, transpose_rhs=transpose_rhs, interpret=TPU_INTERPRET)


@SETTINGS
@given(problem=problems(), transpose_rhs=st.booleans())
@with_edge_cases(transpose_rhs=False)
@example(problem=(CONFIGS[0], np.array([3, 0, 20, 1, 10], np.int32)), transpose_rhs=True)
def test_gmm_forward_matches_ragged_dot(problem, transpose_rhs):
    config, group_sizes = problem
    rhs_shape = (config.G, config.N, config.K) if transpose_rhs else (config.G, config.K, config.N)
    lhs, rhs = random_inputs(config, (config.M, config.K), rhs_shape)
    out = kernel_forward(lhs, rhs, group_sizes, tiling=config.tiling, transpose_rhs=transpose_rhs)
    assert out.shape == (config.M, config.N) and out.dtype == config.dtype
    assert_close(out, gmm_reference(lhs, rhs, group_sizes, transpose_rhs), config.dtype)
    # Rows past sum(group_sizes) are exactly zero, as with ragged_dot.
    assert not np.any(np.asarray(out[int(group_sizes.sum()):], np.float32))


@settings(SETTINGS, max_examples=10)
@given(problem=problems(CONFIGS[::2]), transpose_rhs=st.booleans())
@with_edge_cases(transpose_rhs=False)
def test_gmm_gradients_match_ragged_dot(problem, transpose_rhs):
    config, group_sizes = problem
    rhs_shape = (config.G, config.N, config.K) if transpose_rhs else (config.G, config.K, config.N)
    lhs, rhs, dout = random_inputs(config, (config.M, config.K), rhs_shape, (config.M, config.N))
    got = kernel_forward_and_grads(lhs, rhs, group_sizes, dout, tiling=config.tiling, transpose_rhs=transpose_rhs)
    want = reference_forward_and_grads(lhs, rhs, group_sizes, dout, transpose_rhs=transpose_rhs)
    for name, actual, expected in zip(("out", "dlhs", "drhs"), got, want):
        assert actual.shape == expected.shape and actual.dtype == expected.dtype, name
        assert_close(actual, expected, config.dtype)
    # Experts with no rows get an exactly zero weight gradient.
    assert not np.any(np.asarray(got[2][group_sizes == 0], np.float32))


@functools.partial(jax.jit, static_argnames=("tiling",))
def kernel_tgmm(lhs, rhs, group_sizes, *, tiling):
    return tgmm(lhs, rhs, group_sizes, tiling=tiling, preferred_element_type=jnp.float32, interpret=TPU_INTERPRET)


@settings(SETTINGS, max_examples=10)
@given(problem=problems(CONFIGS[:2]))
@with_edge_cases()
def test_tgmm_matches_reference(problem):
    config, group_sizes = problem
    lhs, rhs = random_inputs(config, (config.M, config.K), (config.M, config.N))
    out = kernel_tgmm(lhs, rhs, group_sizes, tiling=config.tiling)
    assert out.shape == (config.G, config.K, config.N) and out.dtype == jnp.float32
    assert_close(out, tgmm_reference(lhs.astype(jnp.float32), rhs, group_sizes), jnp.float32)
    assert not np.any(np.asarray(out[group_sizes == 0]))


def fp8_weights(config, seed=0):
    """e4m3 values [G, K, N], their scales [G, ceil(K / 128), N], and the dequantised weights."""
    rng = np.random.default_rng(seed)
    values = jnp.asarray(rng.normal(size=(config.G, config.K, config.N)) * 4, jnp.float8_e4m3fn)
    scale = jnp.asarray(rng.uniform(0.01, 0.1, (config.G, -(-config.K // 128), config.N)), jnp.float32)
    per_row = jnp.repeat(scale, 128, axis=1)[:, :config.K]
    return values, scale, (values.astype(jnp.float32) * per_row).astype(config.dtype)


# k-tiles of one and of two 128-row scale blocks, and a K (200) that is one whole-dim tile with a partial block.
FP8_CONFIGS = [Config(44, 256, 256, 5, jnp.bfloat16, (8, 128, 128)), Config(40, 512, 128, 4, jnp.bfloat16, (16, 256, 128)),
               Config(40, 200, 136, 4, jnp.bfloat16, (16, 128, 128))]


@functools.partial(jax.jit, static_argnames=("tiling",))
def kernel_fp8(lhs, values, scale, group_sizes, *, tiling):
    return gmm(lhs, values, group_sizes, tiling=tiling, rhs_scale=scale, interpret=TPU_INTERPRET)


@settings(SETTINGS, max_examples=6)
@given(problem=problems(FP8_CONFIGS))
@example(problem=(FP8_CONFIGS[0], np.array([44, 0, 0, 0, 0], np.int32)))
@example(problem=(FP8_CONFIGS[1], np.array([0, 9, 0, 30], np.int32)))
def test_gmm_with_fp8_weights_matches_the_dequantised_weights(problem):
    """FP8-resident experts: each rhs block dequantised in the kernel by its own 128-row scales
    gives the grouped matmul of the weights dequantised beforehand."""
    config, group_sizes = problem
    values, scale, dequantised = fp8_weights(config)
    (lhs,) = random_inputs(config, (config.M, config.K))
    out = kernel_fp8(lhs, values, scale, group_sizes, tiling=config.tiling)
    assert out.shape == (config.M, config.N) and out.dtype == config.dtype
    assert_close(out, gmm_reference(lhs, dequantised, group_sizes), config.dtype)
    assert not np.any(np.asarray(out[int(group_sizes.sum()):], np.float32))


def test_gmm_reads_one_layer_of_stacked_weights_in_place():
    """With `rhs_layer`, rhs [periods, layers, G, K, N] (and FP8 scales stacked alike) is read at
    that layer: the same numbers as the kernel on the layer's slice, for every layer of the stack."""
    config = FP8_CONFIGS[0]
    group_sizes = jnp.array([20, 0, 7, 17, 0], jnp.int32)
    stacked = [fp8_weights(config, seed) for seed in range(6)]
    values, scale, dequantised = (jnp.stack(parts).reshape((2, 3) + parts[0].shape) for parts in zip(*stacked))
    (lhs,) = random_inputs(config, (config.M, config.K))

    @jax.jit
    def both(layer):
        kw = dict(tiling=config.tiling, interpret=TPU_INTERPRET, rhs_layer=layer)
        return gmm(lhs, dequantised, group_sizes, **kw), gmm(lhs, values, group_sizes, rhs_scale=scale, **kw)

    for p, j in [(0, 0), (1, 2), (0, 1)]:
        plain, fp8 = both(jnp.array([p, j], jnp.int32))
        np.testing.assert_array_equal(plain, kernel_forward(lhs, dequantised[p, j], group_sizes, tiling=config.tiling,
                                                             transpose_rhs=False))
        np.testing.assert_array_equal(fp8, kernel_fp8(lhs, values[p, j], scale[p, j], group_sizes, tiling=config.tiling))


@pytest.mark.parametrize(
    "group_sizes, tm, padding_group",
    [([3, 0, 20, 1, 10], 8, True), ([3, 0, 20, 1, 10], 8, False), ([0, 0, 0], 8, True), ([0, 0, 0], 8, False),
     ([16, 16], 8, True), ([1] * 9, 4, False)],
)
def test_visit_plan_bounds_and_order(group_sizes, tm, padding_group):
    """Every visit is in range, output tiles are only revisited consecutively, every row is covered."""
    num_rows = 36
    plan = jax.tree.map(np.asarray, plan_visits(jnp.array(group_sizes, jnp.int32), num_rows=num_rows, tm=tm,
                                                padding_group=padding_group))
    num_tiles = -(-num_rows // tm)
    assert len(plan.visit_tile) == num_tiles + len(group_sizes)
    num_multiplying, num_real = plan.visit_counts
    assert 0 < num_real <= len(plan.visit_tile) and num_multiplying <= num_real
    assert np.all((0 <= plan.visit_tile) & (plan.visit_tile < num_tiles))
    # Unused steps repeat the last real visit (no new block index, so no DMA).
    assert np.all(plan.visit_tile[num_real:] == plan.visit_tile[num_real - 1])
    assert np.all(plan.visit_group[num_real:] == plan.visit_group[num_real - 1])
    tiles, groups = plan.visit_tile[:num_real], plan.visit_group[:num_real]
    assert np.all(np.diff(tiles) >= 0) and np.all(np.diff(groups) >= 0)
    covered = np.zeros(num_tiles * tm, int)
    for tile, group in zip(tiles, groups):
        start, end = plan.group_bounds[group], plan.group_bounds[group + 1]
        rows = np.arange(tile * tm, tile * tm + tm)
        covered[rows[(rows >= start) & (rows < end)]] += 1
    if padding_group:  # gmm: every (padded) row is stored exactly once
        assert np.all(covered == 1)
    else:  # tgmm: every group gets a visit; only rows before the sum are in a group
        assert set(groups) == set(range(len(group_sizes)))
        assert np.all(covered[: sum(group_sizes)] == 1) and not np.any(covered[sum(group_sizes):])


@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_matches_shipped_megablox(transpose_rhs):
    """Forward and gradients agree with jax's megablox kernels (custom VJP: gmm, gmm^T, tgmm)."""
    m, k, n, tiling = 64, 256, 256, (16, 128, 128)
    group_sizes = jnp.array([0, 13, 1, 0, 34, 16], jnp.int32)  # sums to m: megablox leaves rows past the sum unwritten
    config = Config(m, k, n, 6, jnp.float32, tiling)
    rhs_shape = (6, n, k) if transpose_rhs else (6, k, n)
    lhs, rhs, dout = random_inputs(config, (m, k), rhs_shape, (m, n), seed=1)

    def ours(lhs, rhs):
        return gmm(lhs, rhs, group_sizes, tiling=tiling, transpose_rhs=transpose_rhs, interpret=True)

    def theirs(lhs, rhs):  # positional: preferred_element_type, tiling, group_offset, existing_out, transpose_rhs
        return megablox_gmm(lhs, rhs, group_sizes, jnp.float32, tiling, None, None, transpose_rhs, True)

    @jax.jit
    def forward_and_grads(lhs, rhs, dout):
        results = []
        for fn in (ours, theirs):
            out, vjp = jax.vjp(fn, lhs, rhs)
            results.append((out, *vjp(dout)))
        return results

    for actual, expected in zip(*forward_and_grads(lhs, rhs, dout)):
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-5)


def test_bad_arguments():
    lhs, rhs = jnp.zeros((8, 128)), jnp.zeros((2, 128, 128))
    with pytest.raises(ValueError, match="contraction"):
        gmm(jnp.zeros((8, 64)), rhs, jnp.array([4, 4]), interpret=True)
    with pytest.raises(ValueError, match="group sizes"):
        gmm(lhs, rhs, jnp.array([4, 4, 0]), interpret=True)
    with pytest.raises(ValueError, match="integer"):
        gmm(lhs, rhs, jnp.array([4.0, 4.0]), interpret=True)
    with pytest.raises(ValueError, match=r"rhs_scale \(2, 2, 128\) .* expected \(2, 1, 128\)"):
        gmm(lhs, rhs, jnp.array([4, 4]), rhs_scale=jnp.ones((2, 2, 128)), interpret=True)
    with pytest.raises(ValueError, match=r"expected lhs \[M, K\] and a 4-D rhs"):
        gmm(lhs, rhs, jnp.array([4, 4]), rhs_layer=jnp.array([0]), interpret=True)
    with pytest.raises(ValueError, match="rhs_layer must be a 1-D integer array"):
        gmm(lhs, rhs[None], jnp.array([4, 4]), rhs_layer=jnp.array([0.0]), interpret=True)


@pytest.mark.parametrize("topology", ["v5e", "v5p"])
def test_aot_compiles_for_tpu(topology):
    """Mosaic lowers the forward and both backward kernels, and the FP8-weight forward (e4m3 blocks
    and their scales in VMEM), for a real TPU (needs libtpu, no TPU)."""
    from kernels_pallas.tpu_aot import compile_for_tpu, pallas_kernel_names

    def loss(lhs, rhs, group_sizes):
        return gmm(lhs, rhs, group_sizes).astype(jnp.float32).sum()

    def fp8_forward(lhs, values, scale, group_sizes, rhs_layer=None):
        return gmm(lhs, values, group_sizes, rhs_scale=scale, rhs_layer=rhs_layer)

    m, k, n, g = 512, 1024, 512, 8
    lhs, group_sizes = jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((g,), jnp.int32)
    compiled = compile_for_tpu(jax.value_and_grad(loss, argnums=(0, 1)), lhs, jax.ShapeDtypeStruct((g, k, n), jnp.bfloat16),
                               group_sizes, topology=topology)
    assert pallas_kernel_names(compiled) == {"gmm", "gmm_transposed_rhs", "tgmm"}
    assert compiled.cost_analysis()["flops"] >= 3 * 2 * m * k * n
    compiled = compile_for_tpu(fp8_forward, lhs, jax.ShapeDtypeStruct((g, k, n), jnp.float8_e4m3fn),
                               jax.ShapeDtypeStruct((g, k // 128, n), jnp.float32), group_sizes, topology=topology)
    assert pallas_kernel_names(compiled) == {"gmm_fp8"}
    # A layer of stacked FP8 weights [periods, layers, G, K, N], picked by a traced index.
    compiled = compile_for_tpu(lambda *args: fp8_forward(*args[:-1], rhs_layer=args[-1]), lhs,
                               jax.ShapeDtypeStruct((2, 3, g, k, n), jnp.float8_e4m3fn),
                               jax.ShapeDtypeStruct((2, 3, g, k // 128, n), jnp.float32), group_sizes,
                               jax.ShapeDtypeStruct((2,), jnp.int32), topology=topology)
    assert pallas_kernel_names(compiled) == {"gmm_fp8"}
