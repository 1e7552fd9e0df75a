"""FP8 e4m3 weights with 128x128 block scales (`W = fp8 * scale_inv`, DeepSeek-V3 style).

Dequantising goes row by row: `row_scales` / `fused_kv_row_scales` give each row the scales of
its blocks and `dequantize_rows` applies them (FP8-resident weights keep that per-row form).

The release quantised each attention-TP shard of the fused [Q | K | V] projection. For q and the
sliding-window layers' k/v that equals uniform blocks, but a global layer has one kv head per shard:
its rows run [K_h (192) | V_h (128)], so the 128-row block that starts at K_h row 128 carries on into
V_h rows 0-63. The k scale then has 2 rows per head and the v scale 1 (spec section 2.3);
dequantising k and v on their own grids puts the wrong scale on half of every V head.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

BLOCK = 128
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)


def _blocks(n: int) -> int:
    return math.ceil(n / BLOCK)


def row_scales(scale_inv: np.ndarray, rows: int) -> np.ndarray:
    """Each row's block scales, [rows, column blocks], of a uniform 128x128 grid."""
    return np.repeat(scale_inv.astype(np.float32), BLOCK, 0)[:rows]


def dequantize_rows(q: np.ndarray, scales_RC: np.ndarray) -> np.ndarray:
    """`q` [rows, cols] times its per-row block scales [rows, column blocks]."""
    return q.astype(np.float32) * np.repeat(scales_RC, BLOCK, 1)[:, : q.shape[1]]


def check_grid(shape: tuple[int, int], scale_inv: np.ndarray) -> None:
    rows, cols = shape
    if scale_inv.shape != (_blocks(rows), _blocks(cols)):
        raise ValueError(f"scale shape {scale_inv.shape} does not tile a {tuple(shape)} weight in {BLOCK}x{BLOCK} blocks")


def quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-block amax scaling onto the e4m3 range; an all-zero block gets scale 1."""
    rows, cols = w.shape
    padded = np.zeros((_blocks(rows) * BLOCK, _blocks(cols) * BLOCK), np.float32)
    padded[:rows, :cols] = w
    tiles = padded.reshape(_blocks(rows), BLOCK, _blocks(cols), BLOCK)
    amax = np.abs(tiles).max(axis=(1, 3))
    scale = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
    q = (tiles / scale[:, None, :, None]).reshape(padded.shape)[:rows, :cols]
    return q.astype(FP8), scale


def kv_shards(k_rows: int, v_rows: int, num_kv: int, k_dim: int, v_dim: int) -> int | None:
    """How many fused [K | V] shards the k/v scale grids describe; None for independent uniform grids."""
    if (k_rows, v_rows) == (_blocks(num_kv * k_dim), _blocks(num_kv * v_dim)):
        return None
    for shards in range(1, num_kv + 1):
        if num_kv % shards:
            continue
        k_shard, v_shard = num_kv // shards * k_dim, num_kv // shards * v_dim
        kb = _blocks(k_shard)
        if (k_rows, v_rows) == (shards * kb, shards * (_blocks(k_shard + v_shard) - kb)):
            return shards
    raise ValueError(
        f"k/v scale rows ({k_rows}, {v_rows}) fit neither uniform blocks nor fused per-shard [K|V] blocks "
        f"for {num_kv} kv heads of dims {k_dim}/{v_dim}"
    )


def fused_kv_row_scales(k_scale, v_scale, k_rows: int, v_rows: int, shards: int):
    """(k, v) per-row block scales when the blocks run over each shard's concatenated [K_s | V_s] rows."""
    k_shard, v_shard = k_rows // shards, v_rows // shards
    kb, vb = k_scale.shape[0] // shards, v_scale.shape[0] // shards
    ks, vs = [], []
    for s in range(shards):
        fused = row_scales(np.concatenate([k_scale[s * kb : (s + 1) * kb], v_scale[s * vb : (s + 1) * vb]]), k_shard + v_shard)
        ks.append(fused[:k_shard])
        vs.append(fused[k_shard:])
    return np.concatenate(ks), np.concatenate(vs)


def quantize_fused_kv(k: np.ndarray, v: np.ndarray, shards: int):
    """k and v quantised in blocks over each shard's [K_s | V_s] rows: (k_q, k_scale, v_q, v_scale)."""
    k_shard, v_shard = k.shape[0] // shards, v.shape[0] // shards
    kb = _blocks(k_shard)
    parts = []
    for s in range(shards):
        q, scale = quantize(np.concatenate([k[s * k_shard : (s + 1) * k_shard], v[s * v_shard : (s + 1) * v_shard]]))
        parts.append((q[:k_shard], scale[:kb], q[k_shard:], scale[kb:]))
    return tuple(np.concatenate(p) for p in zip(*parts))
