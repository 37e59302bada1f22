"""int8 weights with block scales, as in the Grok-1 release (the official tree), and the matmul
that reads them in that form.

A `QuantizedWeight8bit` keeps the full logical shape of the weight in int8; `scales` has shape
`[..., num_blocks, out]`: the input axis (second to last) is split into `num_blocks` equal blocks
and block b is scaled by `scales[..., b, :]`. Loaded models hold their weights in the compute
layout instead (grok1/layout.py); `matmul` serves the official tree (training, `init`), through
`kernels.linear`, which model code calls whatever the weight's form.
"""

from __future__ import annotations

import dataclasses
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight8bit:
    """int8 `weight` [..., in, out] with float `scales` [..., num_blocks, out]."""

    weight: jax.Array
    scales: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    @property
    def dtype(self):
        return self.scales.dtype

    @property
    def num_blocks(self) -> int:
        return self.scales.shape[-2]

    @property
    def nbytes(self) -> int:
        return int(self.weight.nbytes) + int(self.scales.nbytes)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The float weight, materialised (tests, conversion; the model uses `matmul`)."""
        xp = np if isinstance(self.weight, np.ndarray) else jnp
        *lead, n_in, n_out = self.weight.shape
        blocks = self.weight.reshape(*lead, self.num_blocks, n_in // self.num_blocks, n_out)
        w = blocks.astype(dtype) * self.scales.astype(dtype)[..., :, None, :]
        return xp.reshape(w, self.weight.shape)


Weight = Union[jax.Array, np.ndarray, QuantizedWeight8bit]


def check_block_layout(shape: tuple[int, ...], scales_shape: tuple[int, ...]) -> str | None:
    """Why `scales_shape` cannot scale a weight of `shape`, or None when it can."""
    if len(scales_shape) != len(shape):
        return f"scales must have rank {len(shape)} like the weight, got shape {scales_shape}"
    if tuple(scales_shape[:-2]) != tuple(shape[:-2]) or scales_shape[-1] != shape[-1]:
        return f"scales shape {scales_shape} does not match weight shape {shape} as [..., blocks, out]"
    if scales_shape[-2] < 1 or shape[-2] % scales_shape[-2]:
        return f"{scales_shape[-2]} scale blocks do not divide the input axis of size {shape[-2]}"
    return None


def quantize(w: np.ndarray | jax.Array, num_blocks: int = 1, scale_dtype=None) -> QuantizedWeight8bit:
    """Symmetric int8 quantisation of a float weight [..., in, out] with `num_blocks` input blocks.

    Each (block, output column) gets scale = max|w| / 127, so dequantising is within scale/2.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim < 2:
        raise ValueError(f"quantize needs a weight of rank >= 2 ([..., in, out]), got shape {w.shape}")
    *lead, n_in, n_out = w.shape
    if num_blocks < 1 or n_in % num_blocks:
        raise ValueError(f"num_blocks must be a positive divisor of the input axis ({n_in}), got {num_blocks}")
    blocks = w.reshape(*lead, num_blocks, n_in // num_blocks, n_out)
    scales = np.abs(blocks).max(axis=-2) / 127.0  # [..., num_blocks, out]
    scales = np.where(scales == 0, 1.0, scales).astype(np.float32)
    if scale_dtype is not None:
        scales = scales.astype(scale_dtype)
    q = np.rint(blocks / scales.astype(np.float32)[..., :, None, :])
    weight = np.clip(q, -127, 127).astype(np.int8).reshape(w.shape)
    return QuantizedWeight8bit(weight=weight, scales=scales)


def precision(dtype) -> jax.lax.Precision:
    """The precision of a product whose operands are `dtype`: on accelerators float32 operands
    in full float32 (HIGHEST), which they otherwise multiply as TensorFloat-32 (10-bit
    mantissas: on an H200 that broke the golden and equivalence tests in float32 and the float32
    attention of bfloat16 compute). CPUs multiply float32 in float32 anyway: DEFAULT there, so
    their compiled programs stay exactly what they were."""
    if jnp.dtype(dtype) == jnp.dtype(jnp.float32) and jax.default_backend() != "cpu":
        return jax.lax.Precision.HIGHEST
    return jax.lax.Precision.DEFAULT


def matmul(x: jax.Array, w: Weight, dtype=None, out_dtype=None) -> jax.Array:
    """`x @ w` over the last axis of x, for a plain or block-quantized weight [in, out].

    The operands are cast to `dtype` (default x's), the products accumulate in float32 and the
    result is returned in `out_dtype` (default `dtype`): the model asks for float32, so a
    bfloat16 matmul rounds its inputs but not its output (docs/ARCHITECTURE.md, "Where the model
    rounds to bfloat16").
    For int8 weights the block scales are applied to the partial products of each block, so the
    float weight is never materialised: `sum_b (x_b @ int8_b) * scales_b`.
    """
    dtype = dtype or x.dtype
    out_dtype = out_dtype or dtype
    x = x.astype(dtype)
    acc = jnp.float32  # the same result for float32, the fast CPU kernels for bfloat16
    if not isinstance(w, QuantizedWeight8bit):
        return jnp.matmul(x, w, precision=precision(jnp.promote_types(x.dtype, w.dtype)),
                          preferred_element_type=acc).astype(out_dtype)
    n_in, n_out = w.weight.shape
    blocks = w.num_blocks
    if blocks == 1:
        y = jnp.matmul(x, w.weight.astype(dtype), precision=precision(dtype), preferred_element_type=acc)
        return (y * w.scales[0].astype(acc)).astype(out_dtype)
    # One plain matmul per block (XLA:CPU has no batched bfloat16 dot with a float32 result).
    size = n_in // blocks
    out = None
    for b in range(blocks):
        part = jnp.matmul(x[..., b * size:(b + 1) * size], w.weight[b * size:(b + 1) * size].astype(dtype),
                          precision=precision(dtype), preferred_element_type=acc) * w.scales[b].astype(acc)
        out = part if out is None else out + part
    return out.astype(out_dtype)
