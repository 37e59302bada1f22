"""int8 weights with block scales, as in the Grok-1 release (the official tree): the format, its
sharding on a mesh, and quantising a float weight into it.

A `QuantizedWeight8bit` keeps the full logical shape of the weight in int8; `scales` has shape
`[..., num_blocks, out]`: the input axis (second to last) is split into `num_blocks` equal blocks
and block b is scaled by `scales[..., b, :]`. Loaded models hold their weights in the compute
layout instead (grok1/weights/layout.py); the official tree (training, `init`, checkpoints) holds
this form, and grok1/kernels multiplies by it without materialising the float weight.
"""

from __future__ import annotations

import dataclasses
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from grok1.mesh import partition_spec


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

    def sharding(self, mesh: jax.sharding.Mesh, axes: tuple) -> "QuantizedWeight8bit":
        """NamedShardings of the weight and its scales for a parameter with logical `axes`: the
        scales [..., blocks, out] follow the weight, the same split of the leading and output
        axes, and the blocks axis split like the weight's input axis where the count allows."""
        return QuantizedWeight8bit(weight=NamedSharding(mesh, partition_spec(axes, self.weight.shape, mesh)),
                                   scales=NamedSharding(mesh, partition_spec(axes, self.scales.shape, mesh)))

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The float weight, materialised (tests, conversion; the model multiplies by the int8
        values, grok1/kernels)."""
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
