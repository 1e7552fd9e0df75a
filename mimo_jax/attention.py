"""The attention seam: every attention call in the model goes through `attention()`.

`impl="xla"` is the pure-JAX reference (`kernels_pallas.swa_attention_reference`); `impl="pallas"`
is the block-sparse flash kernel (`kernels_pallas.swa_attention`). Both take the same arguments,
so switching is a config change (`model.attention_impl`).
"""

from __future__ import annotations

from kernels_pallas.swa_attention import swa_attention
from kernels_pallas.swa_attention_reference import attention_mask, swa_attention_reference

__all__ = ["attention", "attention_mask"]


def attention(q_BTHD, k_BSKD, v_BSKV, sinks_H, *, window, q_positions, kv_positions, segment_ids=None, impl="xla",
              interpret=False):
    """Causal (window=None) or sliding-window attention.

    `window` is the number of previous positions each query sees besides itself. `segment_ids`
    is one [B, T] array when queries and keys are the same tokens, else a (q [B,T], kv [B,S]) pair.
    `interpret` only matters for the Pallas kernel (True on CPU, False when compiling for TPU).
    """
    kwargs = dict(window=window, q_positions=q_positions, kv_positions=kv_positions, segment_ids=segment_ids)
    if impl == "xla":
        return swa_attention_reference(q_BTHD, k_BSKD, v_BSKV, sinks_H, **kwargs)
    if impl == "pallas":
        return swa_attention(q_BTHD, k_BSKD, v_BSKV, sinks_H, interpret=interpret, **kwargs)
    raise ValueError(f"unknown attention impl {impl!r}")
