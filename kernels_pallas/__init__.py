"""Pallas TPU kernels for MiMo-V2-Flash (sliding-window attention with sinks, grouped MoE matmuls).

Each kernel lives beside its pure-JAX reference; the model reaches them through the seams in
`mimo_jax.attention.attention` and `mimo_jax.moe.grouped_matmul`. The kernels arrive with the
Pallas issue; until then the XLA references are the only implementations.
"""
