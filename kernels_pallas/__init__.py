"""Pallas TPU kernels for MiMo-V2-Flash, each beside its pure-JAX reference and its tests.

- `swa_attention`: block-sparse flash attention for sliding windows (and causal global layers)
  with learned sinks, GQA-shared K/V loads, packed segments and arbitrary positions (prefill,
  chunked prefill, decode and speculative verification over a ring-buffer cache).
- `gmm` / `tgmm`: grouped matmuls over expert-sorted tokens, and the weight gradient.

The model reaches them through `mimo_jax.attention.attention` and `mimo_jax.moe.grouped_matmul`
(`model.attention_impl: pallas`, `model.moe_impl: pallas`). `tpu_aot` compiles for TPU chips
ahead of time from a machine without one.
"""

from kernels_pallas.gmm import gmm, tgmm
from kernels_pallas.gmm_reference import gmm_reference, tgmm_reference
from kernels_pallas.swa_attention import swa_attention
from kernels_pallas.swa_attention_reference import swa_attention_reference

__all__ = ["gmm", "tgmm", "gmm_reference", "tgmm_reference", "swa_attention", "swa_attention_reference"]
