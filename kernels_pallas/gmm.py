"""Grouped matmul (MoE experts) as Pallas TPU kernels: `gmm`, its weight-gradient `tgmm`, and a VJP.

Rows of `lhs` are sorted by group (expert): group g owns rows [start_g, end_g), where end_g is the
running sum of `group_sizes` (clipped to M). `gmm` computes out[rows of g] = lhs[rows of g] @ rhs[g];
`tgmm` computes out[g] = lhs[rows of g]^T @ rhs[rows of g].

Visit plan (computed in JAX, handed to the kernel as scalar-prefetch int32 arrays in SMEM)
-----------------------------------------------------------------------------------------
M is cut into tiles of `tm` rows. A *visit* is one (m-tile, group) pair where the group has rows in
the tile; visits are listed group by group, tiles ascending, so the same output tile is only ever
revisited on consecutive grid steps (Pallas writes an output block back when its index changes).
A tile that straddles a group boundary is visited once per group and each visit stores only its own
rows (a row mask from `group_bounds`). Every group boundary adds at most one visit, so

    num visits <= num_m_tiles + num_groups

is a static grid bound; the real count is data dependent. The arrays are:

    group_bounds [num_groups + 1 (+1)]  row where each group starts; the last entry is the end
    visit_tile   [num_m_tiles + num_groups]  m-tile of each grid step
    visit_group  [num_m_tiles + num_groups]  group of each grid step
    visit_counts [2]  (visits that multiply, visits that are real)

`gmm` prefetches one more array, `rhs_layer`: the index of the layer read from a stacked rhs (a
lone 0 for an unstacked one, which the kernel views with one leading axis of size 1).

Steps past the real visits repeat the last real visit, so their block indices do not change (no
DMA), and `pl.when` skips their compute and stores.

`gmm` adds a *padding group* after the real ones that owns the rows past sum(group_sizes) (and the
rows that pad M to a multiple of `tm`): its visits store zeros, as `jax.lax.ragged_dot` does, and
its operand blocks are pinned to the last multiplying visit's blocks so they cost no DMA either.
Empty groups get no visit in `gmm`. In `tgmm` every group owns an output block that must be written,
so an empty group gets one visit that stores zeros, pinned to the m-tile the previous visit used.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

DEFAULT_TILING = (128, 512, 512)
_LANES = 128
FP8_BLOCK = 128  # rows of the contraction axis that share one FP8 scale (the release's 128-wide blocks)


class VisitPlan(NamedTuple):
    """Scalar-prefetch metadata; see the module docstring."""

    group_bounds: jax.Array
    visit_tile: jax.Array
    visit_group: jax.Array
    visit_counts: jax.Array


def plan_visits(group_sizes_G, *, num_rows: int, tm: int, padding_group: bool) -> VisitPlan:
    """The visit plan for `num_rows` rows in tiles of `tm` (num_rows need not be a multiple of tm).

    padding_group=True (gmm): one extra group owns the rows from sum(group_sizes) to the padded end,
    and empty groups are not visited. False (tgmm): every group, even an empty one, is visited.
    """
    num_groups = group_sizes_G.shape[0]
    num_m_tiles = pl.cdiv(num_rows, tm)
    num_steps = num_m_tiles + num_groups
    ends = jnp.minimum(jnp.cumsum(group_sizes_G.astype(jnp.int32)), num_rows)
    if padding_group:
        ends = jnp.concatenate([ends, jnp.array([num_m_tiles * tm], jnp.int32)])
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), ends[:-1]])
    has_rows = ends > starts
    first_tile = starts // tm
    visits_per_group = jnp.where(has_rows, (ends - 1) // tm - first_tile + 1, 0)
    if not padding_group:
        # An empty group still writes its (zero) output block. It reuses the m-tile the previous
        # visit loaded (the one holding row start-1) so its operand blocks cost no DMA.
        visits_per_group = jnp.where(has_rows, visits_per_group, 1)
        first_tile = jnp.where(has_rows, first_tile, jnp.maximum(starts - 1, 0) // tm)
    visits_end = jnp.cumsum(visits_per_group)
    num_real = visits_end[-1]
    num_multiplying = visits_end[num_groups - 1]  # excludes the padding group's visits
    # Steps past the last real visit repeat it: same block indices, nothing new fetched.
    step = jnp.minimum(jnp.arange(num_steps, dtype=jnp.int32), num_real - 1)
    group = jnp.searchsorted(visits_end, step, side="right").astype(jnp.int32)
    tile = first_tile[group] + step - (visits_end - visits_per_group)[group]
    return VisitPlan(
        group_bounds=jnp.concatenate([jnp.zeros(1, jnp.int32), ends]),
        visit_tile=tile.astype(jnp.int32),
        visit_group=group,
        visit_counts=jnp.stack([num_multiplying, num_real]).astype(jnp.int32),
    )


def _sublanes(dtype) -> int:
    """Rows per native (sublane) tile: 8 for 32-bit, 16 for bf16, 32 for 8-bit dtypes."""
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def _lane_tile(dim: int, preferred: int) -> int:
    """A tile for a dimension that is a lane (minor) dim of some block.

    Mosaic needs each block dim to be a multiple of 128 or the whole array dim. Take the largest
    multiple of 128 that divides `dim` and is <= preferred, else the whole dim.
    """
    if dim <= preferred:
        return dim
    for tile in range(preferred - preferred % _LANES, 0, -_LANES):
        if dim % tile == 0:
            return tile
    return dim


def _row_tile(num_rows: int, preferred: int, *dtypes) -> int:
    """A tile over M: a multiple of the sublane count, no larger than M needs (M is padded to it)."""
    align = max(_sublanes(d) for d in dtypes)
    return max(align, min(pl.cdiv(preferred, align), pl.cdiv(num_rows, align)) * align)


def _pad_rows(x, num_rows: int):
    return x if x.shape[0] == num_rows else jnp.pad(x, ((0, num_rows - x.shape[0]), (0, 0)))


def _rows_in_group(shape, tile, start, end, tm):
    """[tm, n] mask of the rows of m-tile `tile` that lie in [start, end)."""
    rows = tile * tm + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    return (rows >= start) & (rows < end)


def _dequantized_block(rhs_ref, scale_ref, k_i, compute_dtype):
    """The [tk, tn] rhs block of FP8 values times its scales: `scale_ref` holds the whole [K / 128,
    tn] column of scales (a block of a few rows would break Mosaic's 8-row tiling), and each
    128-row slab of the block takes its own row of it."""
    tk = rhs_ref.shape[0]
    slabs = pl.cdiv(tk, FP8_BLOCK)
    parts = [rhs_ref[c * FP8_BLOCK:min((c + 1) * FP8_BLOCK, tk), :].astype(jnp.float32)
             * scale_ref[pl.ds(k_i * slabs + c, 1), :] for c in range(slabs)]
    return (parts[0] if slabs == 1 else jnp.concatenate(parts, axis=0)).astype(compute_dtype)


def _gmm_kernel(
    group_bounds, visit_tile, visit_group, visit_counts, rhs_layer,  # scalar prefetch (SMEM)
    lhs_ref, rhs_ref, *refs,
    tm: int, tiles_k: int, transpose_rhs: bool, compute_dtype, scaled: bool,
):
    scale_ref, out_ref, acc_ref = refs if scaled else (None, *refs)
    step, k = pl.program_id(1), pl.program_id(2)
    is_real = step < visit_counts[1]
    is_multiplying = step < visit_counts[0]

    # Padding-group visits zero the accumulator too, so the store below writes zeros for them.
    @pl.when(is_real & (k == 0))
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(is_multiplying)
    def _multiply():
        contract_rhs = 1 if transpose_rhs else 0  # transposed: rhs block is [tn, tk], an NT matmul
        rhs = (_dequantized_block(rhs_ref, scale_ref, k, compute_dtype) if scaled
               else rhs_ref[...].astype(compute_dtype))
        acc_ref[...] += jax.lax.dot_general(
            lhs_ref[...].astype(compute_dtype),
            rhs,
            (((1,), (contract_rhs,)), ((), ())),
            preferred_element_type=jnp.float32,
        )

    @pl.when(is_real & (k == tiles_k - 1))
    def _store():
        group, tile = visit_group[step], visit_tile[step]
        start, end = group_bounds[group], group_bounds[group + 1]
        whole_tile = (start <= tile * tm) & (tile * tm + tm <= end)

        @pl.when(whole_tile)
        def _store_all():
            out_ref[...] = acc_ref[...].astype(out_ref.dtype)

        @pl.when(jnp.logical_not(whole_tile))
        def _store_group_rows():
            # Other rows of this tile belong to the neighbouring visits of the same tile. The
            # select is done in fp32 (chips without a bf16 VPU).
            mask = _rows_in_group(acc_ref.shape, tile, start, end, tm)
            kept = out_ref[...].astype(jnp.float32)
            out_ref[...] = jnp.where(mask, acc_ref[...], kept).astype(out_ref.dtype)


def _gmm_call(lhs_MK, rhs, group_sizes_G, tiling, transpose_rhs: bool, out_dtype, interpret, rhs_scale=None,
              rhs_layer=None):
    """The pallas_call; rhs is [G, K, N], or [G, N, K] when transpose_rhs; FP8 values with
    `rhs_scale` [G, ceil(K / 128), N] (not transposed). With `rhs_layer` (int32 [L]), rhs and
    rhs_scale carry L leading stack axes and the blocks are read from that layer of the stack."""
    if rhs_layer is None:
        rhs_layer = jnp.zeros(1, jnp.int32)
        rhs, rhs_scale = rhs[None], None if rhs_scale is None else rhs_scale[None]
    stack_dims = rhs_layer.shape[0]
    m, k = lhs_MK.shape
    num_groups = rhs.shape[stack_dims]
    n = rhs.shape[-2] if transpose_rhs else rhs.shape[-1]
    if m == 0 or k == 0 or n == 0:
        return jnp.zeros((m, n), out_dtype)
    tm = _row_tile(m, tiling[0], lhs_MK.dtype, out_dtype)
    tk, tn = _lane_tile(k, tiling[1]), _lane_tile(n, tiling[2])
    tiles_m, tiles_k, tiles_n = pl.cdiv(m, tm), k // tk, n // tn
    plan = plan_visits(group_sizes_G, num_rows=m, tm=tm, padding_group=True)
    last_k = tiles_k - 1

    def operand_visit(step, k_i, visit_counts):
        # After the last multiplying visit (padding-group visits, unused steps) hold the operand
        # blocks where that visit left them: an unchanged block index means no DMA.
        last = visit_counts[0] - 1
        held = step > last
        return jnp.maximum(jnp.minimum(step, last), 0), jnp.where(held, last_k, k_i)

    def lhs_index(n_i, step, k_i, group_bounds, visit_tile, visit_group, visit_counts, layer):
        visit, k_i = operand_visit(step, k_i, visit_counts)
        return visit_tile[visit], k_i

    def rhs_index(n_i, step, k_i, group_bounds, visit_tile, visit_group, visit_counts, layer):
        visit, k_i = operand_visit(step, k_i, visit_counts)
        # With no multiplying visit at all, visit 0 is the padding group: clamp to a real expert.
        group = jnp.minimum(visit_group[visit], num_groups - 1)
        stack_index = tuple(layer[i] for i in range(stack_dims))
        return stack_index + ((group, n_i, k_i) if transpose_rhs else (group, k_i, n_i))

    def out_index(n_i, step, k_i, group_bounds, visit_tile, visit_group, visit_counts, layer):
        return visit_tile[step], n_i

    def scale_index(n_i, step, k_i, *prefetch_refs):
        *stack_index, group, _, n_i = rhs_index(n_i, step, k_i, *prefetch_refs)
        return *stack_index, group, 0, n_i

    layers = math.prod(rhs.shape[:stack_dims])  # only one layer of the stack is read
    rhs_block = (None,) * (stack_dims + 1) + ((tn, tk) if transpose_rhs else (tk, tn))
    out_bytes = tiles_m * tm * n * jnp.dtype(out_dtype).itemsize
    cost = pl.CostEstimate(
        flops=2 * m * k * n,
        transcendentals=0,
        # lhs is streamed once per n-tile; every expert's weights are read about once.
        bytes_accessed=lhs_MK.nbytes * tiles_n + out_bytes
        + (rhs.nbytes + (0 if rhs_scale is None else rhs_scale.nbytes)) // layers,
    )
    scaled = rhs_scale is not None
    kernel = functools.partial(
        _gmm_kernel, tm=tm, tiles_k=tiles_k, transpose_rhs=transpose_rhs, scaled=scaled,
        compute_dtype=lhs_MK.dtype if scaled else jnp.promote_types(lhs_MK.dtype, rhs.dtype),
    )
    in_specs = [pl.BlockSpec((tm, tk), lhs_index), pl.BlockSpec(rhs_block, rhs_index)]
    operands = [_pad_rows(lhs_MK, tiles_m * tm), rhs]
    if scaled:
        in_specs.append(pl.BlockSpec((None,) * (stack_dims + 1) + (rhs_scale.shape[-2], tn), scale_index))
        operands.append(rhs_scale.astype(jnp.float32))
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((tiles_m * tm, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(tiles_n, plan.visit_tile.shape[0], tiles_k),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((tm, tn), out_index),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        # Visits of one n-tile must run in order (they revisit output tiles); n-tiles are independent.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
        name="gmm_transposed_rhs" if transpose_rhs else "gmm_fp8" if scaled else "gmm",
    )(*plan, rhs_layer.astype(jnp.int32), *operands)
    return out[:m]


def _tgmm_kernel(
    group_bounds, visit_tile, visit_group, visit_counts,  # scalar prefetch (SMEM)
    lhs_ref, rhs_ref, out_ref, acc_ref,
    *, tm: int, num_steps: int, compute_dtype,
):
    step = pl.program_id(2)
    num_real = visit_counts[1]
    is_real = step < num_real
    group, tile = visit_group[step], visit_tile[step]
    start, end = group_bounds[group], group_bounds[group + 1]
    first_of_group = (step == 0) | (visit_group[jnp.maximum(step - 1, 0)] != group)
    last_of_group = (step == num_real - 1) | (visit_group[jnp.minimum(step + 1, num_steps - 1)] != group)

    @pl.when(is_real & first_of_group)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(is_real & (end > start))
    def _multiply():
        # Rows of the tile outside the group belong to other groups (or are padding): zero them in
        # both operands so that neither can leak (0 * inf would).
        lhs = lhs_ref[...].astype(jnp.float32)
        rhs = rhs_ref[...].astype(jnp.float32)
        lhs = jnp.where(_rows_in_group(lhs.shape, tile, start, end, tm), lhs, 0.0)
        rhs = jnp.where(_rows_in_group(rhs.shape, tile, start, end, tm), rhs, 0.0)
        acc_ref[...] += jax.lax.dot_general(
            lhs.astype(compute_dtype),
            rhs.astype(compute_dtype),
            (((0,), (0,)), ((), ())),  # lhs^T @ rhs, contracting the rows
            preferred_element_type=jnp.float32,
        )

    @pl.when(is_real & last_of_group)
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _tgmm_call(lhs_MK, rhs_MN, group_sizes_G, tiling, num_groups: int, out_dtype, interpret):
    m, k = lhs_MK.shape
    n = rhs_MN.shape[1]
    if m == 0 or k == 0 or n == 0:
        return jnp.zeros((num_groups, k, n), out_dtype)
    group_sizes_G = group_sizes_G[:num_groups]
    tm = _row_tile(m, tiling[0], lhs_MK.dtype, rhs_MN.dtype)
    tk, tn = _lane_tile(k, tiling[1]), _lane_tile(n, tiling[2])
    tiles_m, tiles_k, tiles_n = pl.cdiv(m, tm), k // tk, n // tn
    plan = plan_visits(group_sizes_G, num_rows=m, tm=tm, padding_group=False)
    num_steps = plan.visit_tile.shape[0]

    def lhs_index(k_i, n_i, step, group_bounds, visit_tile, visit_group, visit_counts):
        return visit_tile[step], k_i

    def rhs_index(k_i, n_i, step, group_bounds, visit_tile, visit_group, visit_counts):
        return visit_tile[step], n_i

    def out_index(k_i, n_i, step, group_bounds, visit_tile, visit_group, visit_counts):
        return visit_group[step], k_i, n_i

    cost = pl.CostEstimate(
        flops=2 * m * k * n,
        transcendentals=0,
        bytes_accessed=lhs_MK.nbytes * tiles_n + rhs_MN.nbytes * tiles_k
        + num_groups * k * n * jnp.dtype(out_dtype).itemsize,
    )
    kernel = functools.partial(
        _tgmm_kernel, tm=tm, num_steps=num_steps,
        compute_dtype=jnp.promote_types(lhs_MK.dtype, rhs_MN.dtype),
    )
    padded_rows = tiles_m * tm
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(tiles_k, tiles_n, num_steps),
            in_specs=[pl.BlockSpec((tm, tk), lhs_index), pl.BlockSpec((tm, tn), rhs_index)],
            out_specs=pl.BlockSpec((None, tk, tn), out_index),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        # A group's visits accumulate in order into its resident output block; (k, n) blocks are independent.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
        name="tgmm",
    )(*plan, _pad_rows(lhs_MK, padded_rows), _pad_rows(rhs_MN, padded_rows))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _gmm_vjp(lhs, rhs, group_sizes, tiling, transpose_rhs, out_dtype, interpret):
    return _gmm_call(lhs, rhs, group_sizes, tiling, transpose_rhs, out_dtype, interpret)


def _gmm_vjp_fwd(lhs, rhs, group_sizes, tiling, transpose_rhs, out_dtype, interpret):
    out = _gmm_call(lhs, rhs, group_sizes, tiling, transpose_rhs, out_dtype, interpret)
    return out, (lhs, rhs, group_sizes)


def _gmm_vjp_bwd(tiling, transpose_rhs, out_dtype, interpret, residuals, dout_MN):
    lhs_MK, rhs, group_sizes_G = residuals
    tm, tk, tn = tiling
    # dlhs = dout @ rhs[g]^T: the same kernel with the rhs orientation flipped and K, N swapped.
    dlhs_MK = _gmm_call(dout_MN, rhs, group_sizes_G, (tm, tn, tk), not transpose_rhs, lhs_MK.dtype, interpret)
    num_groups = rhs.shape[0]
    if transpose_rhs:  # rhs[g] is [N, K]: drhs[g] = dout_g^T @ lhs_g
        drhs = _tgmm_call(dout_MN, lhs_MK, group_sizes_G, (tm, tn, tk), num_groups, rhs.dtype, interpret)
    else:  # rhs[g] is [K, N]: drhs[g] = lhs_g^T @ dout_g
        drhs = _tgmm_call(lhs_MK, dout_MN, group_sizes_G, tiling, num_groups, rhs.dtype, interpret)
    return dlhs_MK, drhs, None


_gmm_vjp.defvjp(_gmm_vjp_fwd, _gmm_vjp_bwd)


def _check(lhs, rhs, group_sizes, rhs_ndim: int, name: str):
    if lhs.ndim != 2 or rhs.ndim != rhs_ndim:
        raise ValueError(f"{name}: expected lhs [M, K] and a {rhs_ndim}-D rhs, got {lhs.shape} and {rhs.shape}")
    if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"{name}: group_sizes must be a 1-D integer array, got {group_sizes.dtype}{group_sizes.shape}")


def gmm(
    lhs_MK: jax.Array,
    rhs: jax.Array,
    group_sizes_G: jax.Array,
    *,
    tiling: tuple[int, int, int] = DEFAULT_TILING,
    transpose_rhs: bool = False,
    preferred_element_type: Any = None,
    interpret: Any = False,
    rhs_scale: jax.Array | None = None,
    rhs_layer: jax.Array | None = None,
) -> jax.Array:
    """Grouped matmul: rows [start_g, end_g) of lhs [M, K] times rhs[g]; returns [M, N].

    rhs is [G, K, N], or [G, N, K] with transpose_rhs=True (then out = lhs @ rhs[g].T, contracted
    in place, no transpose materialised). Rows past sum(group_sizes) come out zero, as with
    `jax.lax.ragged_dot`. Accumulates in fp32; the output dtype is `preferred_element_type`
    (default lhs.dtype). `tiling` = (tm, tk, tn) is clipped to the dims: tm is rounded up to a
    multiple of 8 (16 for bf16) and M padded to a multiple of tm; tk, tn become the largest
    multiple of 128 up to the tile that divides K, N, else the whole dim. Differentiable in lhs and
    rhs (custom VJP: dlhs by `gmm` with the rhs orientation flipped, drhs by `tgmm`).
    `interpret`: False, True, or `pltpu.InterpretParams()`, passed to `pallas_call`.

    FP8 weights: rhs [G, K, N] of e4m3 values with `rhs_scale` [G, ceil(K / 128), N], the scale of
    each 128-row block of K per output column (`mimo_jax.fp8_resident.Fp8Weight`). Each rhs block
    is dequantised in VMEM (fp8 -> fp32 x scale -> lhs.dtype), so the weights are read from HBM as
    FP8 and no dequantised copy exists. Forward only (inference): not differentiable.

    Stacked weights: with `rhs_layer` (int32 [L]), rhs (and rhs_scale) carry L leading axes, e.g.
    [periods, layers, G, K, N], and the kernel reads the groups of rhs[*rhs_layer] where they lie in
    the stack, so a layer loop does not first copy its layer's slice out. Forward only.
    """
    stack_dims = 0 if rhs_layer is None else rhs_layer.shape[0]
    if rhs_layer is not None and (rhs_layer.ndim != 1 or not jnp.issubdtype(rhs_layer.dtype, jnp.integer)):
        raise ValueError(f"gmm: rhs_layer must be a 1-D integer array, got {rhs_layer.dtype}{rhs_layer.shape}")
    _check(lhs_MK, rhs, group_sizes_G, 3 + stack_dims, "gmm")
    k = lhs_MK.shape[1]
    layer_shape = rhs.shape[stack_dims:]
    rhs_k = layer_shape[2] if transpose_rhs else layer_shape[1]
    if rhs_k != k:
        raise ValueError(f"gmm: contraction mismatch, lhs {lhs_MK.shape} rhs {rhs.shape} transpose_rhs={transpose_rhs}")
    if group_sizes_G.shape[0] != layer_shape[0]:
        raise ValueError(f"gmm: {group_sizes_G.shape[0]} group sizes for {layer_shape[0]} rhs groups")
    out_dtype = jnp.dtype(preferred_element_type or lhs_MK.dtype)
    group_sizes_G = group_sizes_G.astype(jnp.int32)
    if rhs_scale is not None:
        want = rhs.shape[:stack_dims] + (layer_shape[0], pl.cdiv(k, FP8_BLOCK), layer_shape[2])
        if transpose_rhs or rhs_scale.shape != want:
            raise ValueError(f"gmm: rhs_scale {rhs_scale.shape} for rhs {rhs.shape} (transpose_rhs={transpose_rhs}); "
                             f"expected {want} with transpose_rhs=False")
    if rhs_scale is not None or rhs_layer is not None:
        return _gmm_call(lhs_MK, rhs, group_sizes_G, tuple(tiling), bool(transpose_rhs), out_dtype, interpret,
                         rhs_scale, rhs_layer)
    return _gmm_vjp(lhs_MK, rhs, group_sizes_G, tuple(tiling), bool(transpose_rhs), out_dtype, interpret)


def tgmm(
    lhs_MK: jax.Array,
    rhs_MN: jax.Array,
    group_sizes_G: jax.Array,
    *,
    tiling: tuple[int, int, int] = DEFAULT_TILING,
    num_groups: int | None = None,
    preferred_element_type: Any = None,
    interpret: Any = False,
) -> jax.Array:
    """Per-group lhs_g^T @ rhs_g -> [num_groups, K, N] (the weight gradient of `gmm`).

    Rows of group g are [start_g, end_g) as in `gmm`; rows past sum(group_sizes) are ignored and a
    group with no rows gives exact zeros. fp32 accumulation; output dtype `preferred_element_type`
    (default lhs.dtype). num_groups defaults to len(group_sizes) (a smaller value keeps the first
    num_groups groups). Not differentiable (it is itself a backward kernel).
    """
    _check(lhs_MK, rhs_MN, group_sizes_G, 2, "tgmm")
    if lhs_MK.shape[0] != rhs_MN.shape[0]:
        raise ValueError(f"tgmm: row mismatch, lhs {lhs_MK.shape} rhs {rhs_MN.shape}")
    num_groups = group_sizes_G.shape[0] if num_groups is None else num_groups
    if not 0 < num_groups <= group_sizes_G.shape[0]:
        raise ValueError(f"tgmm: num_groups={num_groups} for {group_sizes_G.shape[0]} group sizes")
    out_dtype = jnp.dtype(preferred_element_type or lhs_MK.dtype)
    return _tgmm_call(
        lhs_MK, rhs_MN, group_sizes_G.astype(jnp.int32), tuple(tiling), num_groups, out_dtype, interpret
    )
