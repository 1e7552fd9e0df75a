"""FP8-resident weights: the checkpoint's e4m3 values and 128-wide block scales kept as the model's
weights (`load_hf(..., weights="fp8")`), dequantised inside each matmul's operand.

An `Fp8Weight` replaces the array of a quantised parameter (the attention q/k/v projections, the
dense FFN and the experts, in the main model and the MTP heads). It has the parameter's own shape
and logical axes, so the sharding rules, the layer scan and the expert slicing treat it like the
array it stands for. Its `scale` holds, for every output element, the scale of each 128-wide block
of the input axis: the release's 128x128 grid over the Hugging Face [out, in] matrix, read per
output row. That form holds the global layers' fused [K | V] blocks (`mimo_jax.fp8`) exactly,
where a grid over our [in, heads, dim] layout could not, at 4/128 bytes per weight.

Dequantisation (`weight`) computes fp8 -> fp32 times the scale, rounded to the compute dtype: the
same numbers `load_hf` gives when it dequantises on loading, so the logits agree to float rounding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mimo_jax.fp8 import BLOCK
from mimo_jax.layer_view import LayerView


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8Weight:
    """values: e4m3 in the parameter's shape; scale: float32, that shape with the input axis
    (`in_axis`, counted from the end) in blocks of 128."""

    values: jax.Array
    scale: jax.Array
    in_axis: int = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def nbytes(self) -> int:
        return self.values.size * self.values.dtype.itemsize + self.scale.size * self.scale.dtype.itemsize

    def dequantize(self, dtype) -> jax.Array:
        size = self.values.shape[self.in_axis]
        scale = jax.lax.slice_in_dim(jnp.repeat(self.scale, BLOCK, axis=self.in_axis), 0, size, axis=self.in_axis)
        return (self.values.astype(jnp.float32) * scale).astype(dtype)


def weight(variable, dtype, in_kernel: bool = False):
    """A parameter's value as a matmul operand in `dtype` (see `operand`)."""
    return operand(variable.get_value(), dtype, in_kernel)


def operand(value, dtype, in_kernel: bool = False):
    """`value` in `dtype`: dequantised if it is FP8-resident, sliced out of its stack if it is a
    `LayerView`. With `in_kernel` (a consumer that dequantises FP8 blocks and indexes stacks
    itself, as the Pallas grouped matmul does) an `Fp8Weight` or a `LayerView` of one, or of an
    array already in `dtype`, comes back as it is."""
    if isinstance(value, LayerView):
        if in_kernel and (isinstance(value.stack, Fp8Weight) or value.dtype == dtype):
            return value
        value = value.materialize()
    if isinstance(value, Fp8Weight):
        return value if in_kernel else value.dequantize(dtype)
    return value.astype(dtype)


def scale_shape(shape: tuple[int, ...], in_axis: int) -> tuple[int, ...]:
    shape = list(shape)
    shape[in_axis] = -(-shape[in_axis] // BLOCK)
    return tuple(shape)
