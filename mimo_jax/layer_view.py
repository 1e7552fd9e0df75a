"""One layer of a stacked parameter, left in its stack: `LayerView(stack, index)`.

The model stacks each run of identical layers' parameters [periods, layers, ...]. A layer loop that
slices `stack[p, j]` makes XLA copy the slice before a custom kernel can read it (a kernel's
operand must be a whole array). A consumer that can index the stack itself, as the Pallas grouped
matmul does through its scalar prefetch, takes the view instead and reads the layer where it lies;
every other consumer gets the slice (`materialize`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerView:
    """stack: an array or an `Fp8Weight` with leading stack axes; index: int32 [stack axes]."""

    stack: Any
    index: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stack.shape[self.index.shape[0]:]

    @property
    def dtype(self):
        return self.stack.dtype

    def materialize(self):
        """The layer's own parameter: the slice of every array in the stack."""
        index = tuple(self.index[i] for i in range(self.index.shape[0]))
        return jax.tree.map(lambda a: a[index], self.stack)
