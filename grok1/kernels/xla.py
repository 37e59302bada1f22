"""The XLA bodies of the products: what runs wherever the native kernels do not (accelerators,
prompts, float32 weights, any CPU without them), for the compute layout and for the official
tree alike. Each accumulates in float32 and returns float32, the rows rounded to the compute dtype
first (docs/ARCHITECTURE.md, "Where the model rounds to bfloat16")."""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from grok1.kernels.platform import one_row_products, precision, product_dtype
from grok1.mesh import whole_rows
from grok1.weights.layout import LinearWeight
from grok1.weights.quant import QuantizedWeight8bit, Weight


def linear_in_chunks(x: jax.Array, w: LinearWeight, dtype) -> jax.Array:
    """`x @ w` for a LinearWeight through XLA, one product per chunk of its input axis
    (layout.MAX_CHUNK), float32 [..., out].

    Each run of a LinearWeight lies inside one scale block. A weight whose input axis is whole
    (one device, or split along its output) has one run per chunk: its product is summed over
    the int8 values (converted inside the product) and scaled after, the same sum as the
    dequantised weight's up to float32 rounding without a multiply per weight element. A chunk
    holding runs of several devices' shares is dequantised first (a product per run, scaled
    after, made XLA hold twice the prompt temporaries on 2x4)."""
    w = w.resolved()
    one_row = one_row_products(w.dtype, math.prod(x.shape[:-1]))
    total = None
    for j in range(w.chunks):  # one product per chunk of the input axis (layout.MAX_CHUNK)
        values = w.values[..., j, :, :]                                       # [..., out, chunk]
        rows = w.rows_of_chunk(x, j)
        scales = w.chunk_scales(j)                                            # [..., groups, out]
        if w.groups == 1 or scales is None:
            part = rows_times_transposed(rows, values, dtype, one_row)
            if scales is not None:
                part = part * scales[..., 0, :]
        else:  # the chunk holds one run of each device's share, each run scaled on its own
            weight = values.reshape(*values.shape[:-1], w.groups, w.run).astype(jnp.float32)
            weight = weight * jnp.swapaxes(scales, -1, -2)[..., None]
            part = rows_times_transposed(rows, weight.reshape(values.shape), dtype, one_row)
        total = part if total is None else total + part
    return total


def rows_times_transposed(x: jax.Array, w: jax.Array, dtype,
                          one_row_at_a_time: Optional[bool] = None) -> jax.Array:
    """x [..., in] @ w.T for a weight w [out, in] (any float dtype): x rounded to `dtype`,
    products in float32, result float32 [..., out]. `one_row_at_a_time` defaults to
    `one_row_products` of w's dtype (pass it for a weight dequantised on the way in)."""
    n_in = x.shape[-1]
    rows = x.reshape(-1, n_in).astype(dtype)
    if one_row_at_a_time is None:
        one_row_at_a_time = one_row_products(w.dtype, rows.shape[0])
    weight = w.astype(product_dtype(w.dtype, dtype))
    exactly = precision(jnp.promote_types(rows.dtype, weight.dtype))
    if one_row_at_a_time:
        # A producer fused into the product slows it too; rows split over a mesh's data axis are
        # gathered first (a few rows), else slicing one out makes XLA gather the weight.
        rows = jax.lax.optimization_barrier(whole_rows(rows))
        y = jnp.concatenate([jax.lax.optimization_barrier(
            jnp.dot(rows[i:i + 1], weight.T, precision=exactly, preferred_element_type=jnp.float32))
            for i in range(rows.shape[0])])
    else:
        y = jnp.dot(rows, weight.T, precision=exactly, preferred_element_type=jnp.float32)
    return y.reshape(*x.shape[:-1], w.shape[0])


def take_bits(values: jax.Array, indices: jax.Array, axis: int) -> jax.Array:
    """values indexed by `indices` along `axis`, moved as raw bits of the same width.

    XLA:CPU computes a bfloat16 gather in float32: it converts the whole table first. Inside a
    loop of decode steps (several tokens per call) that conversion does not depend on the step,
    so XLA hoists it out of the loop and holds a float32 copy of the table (512 MiB for
    bench-1b). Gathering the bits as unsigned integers leaves no float operation to widen."""
    where = (slice(None),) * axis + (indices,)
    if not jnp.issubdtype(values.dtype, jnp.floating):
        return values[where]
    bits = jnp.dtype(f"uint{8 * values.dtype.itemsize}")
    return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(values, bits)[where], values.dtype)


def ragged_linear(xs: jax.Array, w: LinearWeight, group_sizes: jax.Array, row_expert: jax.Array,
                  dtype) -> jax.Array:
    """Rows xs [n, in] sorted by expert (`group_sizes` [E] rows each; row i's expert
    `row_expert[i]`) times their expert's matrix of the stack w [E, chunks, out, chunk]:
    float32 [n, out], one `ragged_dot_general` per chunk, each scaled after its product."""
    w = w.resolved()
    numbers = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((1,), (2,)), ((), ())),  # rows' `in` with each expert's [out, in]
        lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
    total = None
    for j in range(w.chunks):
        rows = w.rows_of_chunk(xs, j).astype(dtype)
        values = w.values[:, j].astype(product_dtype(w.dtype, dtype))               # [E, out, chunk]
        exactly = precision(jnp.promote_types(rows.dtype, values.dtype))
        part = jax.lax.ragged_dot_general(rows, values, group_sizes, numbers, precision=exactly,
                                          preferred_element_type=jnp.float32)
        scales = w.chunk_scales(j)                                                # [E, 1, out]
        if scales is not None:
            part = part * scales[row_expert, 0, :]
        total = part if total is None else total + part
    return total


def quantized_matmul(x: jax.Array, w: Weight, dtype=None, out_dtype=None) -> jax.Array:
    """`x @ w` over the last axis of x, for a weight of the official tree [in, out]: plain, or
    block-quantized as the release stores it.

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


def grouped_matmul(xs: jax.Array, w: Weight, group_sizes: jax.Array, row_expert: jax.Array,
                   dtype) -> jax.Array:
    """Rows of `xs` sorted by expert times their expert's [in, out] matrix (`jax.lax.ragged_dot`),
    operands in `dtype`, result float32.

    For int8 weights each scale block of the input axis is its own ragged_dot, and the block's
    scales (per expert and output column) multiply its partial product.
    """
    acc = jnp.float32
    xs = xs.astype(dtype)
    exactly = precision(dtype)
    if not isinstance(w, QuantizedWeight8bit):
        return jax.lax.ragged_dot(xs, w.astype(dtype), group_sizes, precision=exactly,
                                  preferred_element_type=acc)
    E, n_in, n_out = w.weight.shape
    blocks = w.num_blocks
    size = n_in // blocks
    out = None
    for b in range(blocks):
        part = jax.lax.ragged_dot(xs[:, b * size:(b + 1) * size],
                                  w.weight[:, b * size:(b + 1) * size, :].astype(dtype), group_sizes,
                                  precision=exactly, preferred_element_type=acc)
        part = part * w.scales[:, b, :].astype(acc)[row_expert]
        out = part if out is None else out + part
    return out


def blocked_grouped_matmul(xs: jax.Array, w, group_sizes: jax.Array, row_expert: jax.Array,
                           dtype, block: int = 128) -> jax.Array:
    """The same product as `grouped_matmul` for float weights, faster on CPU (training).

    On CPU `jax.lax.ragged_dot` computes every expert for every row (8x the work); here each
    expert's rows are padded to whole blocks of `block` rows, each block is multiplied by its
    expert's matrix in one batched matmul, and the padding is dropped again. Exact, no token dropped.
    """
    w = w.astype(dtype)
    rows, num_experts = xs.shape[0], w.shape[0]
    blocks = rows // block + num_experts
    padded = (group_sizes + block - 1) // block * block
    start = jnp.cumsum(group_sizes) - group_sizes
    padded_start = jnp.cumsum(padded) - padded
    dest = padded_start[row_expert] + jnp.arange(rows) - start[row_expert]          # [rows]
    x_blocks = jnp.zeros((blocks * block, xs.shape[1]), xs.dtype).at[dest].set(xs)
    block_expert = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(blocks) * block, side="right")
    block_expert = jnp.minimum(block_expert, num_experts - 1)
    out = jnp.einsum("nbi,nio->nbo", x_blocks.reshape(blocks, block, -1), w[block_expert])
    return out.reshape(blocks * block, -1)[dest]
