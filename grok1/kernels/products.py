"""How rows are multiplied by a weight, whatever form it has: the product the model calls.

A product is computed as the official model defines it, up to float32 rounding: the rows
rounded to the operand dtype (`platform.operand_dtype`: the compute dtype on accelerators,
float32 on CPU), int8 values (exact in float32) times their block scale, products accumulated in
float32 and returned in float32 (docs/ARCHITECTURE.md, "Where the model rounds to bfloat16"); a
run of the input axis inside one scale block is scaled after its product.

`linear` picks the kernel (grok1/kernels/platform.py says which, and why): a few rows of an int8
or bfloat16 weight through the native CPU kernel (grok1/kernels/native.py), on a mesh each
device on its own shard (`shard_map`); everything else through XLA (grok1/kernels/xla.py).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from grok1.kernels import native
from grok1.kernels.platform import native_products, operand_dtype, threads_per_device
from grok1.kernels.xla import linear_in_chunks, quantized_matmul, rows_times_transposed, take_bits
from grok1.weights.layout import LinearWeight
from grok1.weights.quant import Weight


def linear(x: jax.Array, w: Weight | LinearWeight, dtype) -> jax.Array:
    """`x @ w` over the last axis of x, float32 result, for any weight the model may hold: a
    LinearWeight (loaded for inference), or the official [in, out] tree (training, `init`)."""
    dtype = operand_dtype(dtype)
    if not isinstance(w, LinearWeight):
        return quantized_matmul(x, w, dtype, out_dtype=jnp.float32)
    if native_products(w, math.prod(x.shape[:-1])):
        return native_linear(x, w, dtype)
    return linear_in_chunks(x, w, dtype)


def native_linear(x: jax.Array, w: LinearWeight, dtype, entries: Optional[jax.Array] = None
                  ) -> jax.Array:
    """`x @ w` through the native kernel, float32 [..., out]: the rows rounded to `dtype` as in
    every product. With `entries` [rows] (ints), row i multiplies entry entries[i] of the leading
    axis left after `w.picked` (e.g. its expert); the kernel reads each entry from the stack.
    On a mesh, each device multiplies the rows (its share of their input axis) by its own shard
    (a custom call has no rule for partitioning it: `shard_map`), and the devices sharing the
    input axis add up their parts (`LinearWeight.device_split`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return _native_linear_here(x, w, dtype, entries)
    out_axes, in_axes = w.device_split()
    values_spec, scales_spec = w.mesh_split
    picks = tuple(jnp.asarray(p, jnp.int32) for p in w.picked)
    lead = (None,) * (x.ndim - 1)

    threads = threads_per_device(mesh)

    def on_device(x, values, scales, picks, entries):
        shard = LinearWeight(values, scales, picked=picks)
        y = _native_linear_here(x, shard, dtype, entries, threads)
        return jax.lax.psum(y, in_axes) if in_axes else y

    return jax.shard_map(
        on_device, mesh=mesh, check_vma=False,
        in_specs=(P(*lead, in_axes or None), P(*values_spec),
                  None if scales_spec is None else P(*scales_spec), P(), P()),
        out_specs=P(*lead, out_axes or None))(x, w.values, w.scales, picks, entries)


def _native_linear_here(x: jax.Array, w: LinearWeight, dtype, entries: Optional[jax.Array],
                        threads: int = 0) -> jax.Array:
    """`native_linear` of a weight all on this device (or of one device's own shard)."""
    n_in, n_out = w.chunks * w.chunk_size, w.values.shape[-2]  # (the table's `shape` is [V, d])
    rows = x.reshape(-1, n_in).astype(dtype).astype(jnp.float32)
    lead = w.values.shape[:-3]
    picks = [*w.picked, *([] if entries is None else [entries])]
    if len(picks) != len(lead):
        raise ValueError(f"weight of stack shape {lead} picked by {len(picks)} indices")
    flat = jnp.zeros((rows.shape[0],), jnp.int32)
    for size, pick in zip(lead, picks):
        flat = flat * size + jnp.asarray(pick, jnp.int32)
    stack = math.prod(lead)
    values = w.values.reshape(stack, *w.values.shape[-3:])
    scales = None if w.scales is None else w.scales.reshape(stack, *w.scales.shape[-2:])
    y = native.rows_times(rows, flat, values, scales, threads)
    return y.reshape(*x.shape[:-1], n_out)


def times_table(x: jax.Array, table: jax.Array | LinearWeight, dtype) -> jax.Array:
    """x [..., d] @ table.T for the [V, d] embedding table (the output projection), as stored
    (training) or in the compute layout; float32 [..., V]."""
    if isinstance(table, LinearWeight):
        return linear(x, table, dtype)
    return rows_times_transposed(x, table, operand_dtype(dtype))


def table_rows(table: jax.Array | LinearWeight, tokens: jax.Array) -> jax.Array:
    """The embedding rows [..., d] of `tokens`, in the table's dtype (a table as stored is
    indexed plainly: training differentiates through it, and raw bits carry no gradient)."""
    if not isinstance(table, LinearWeight):
        return table[tokens]
    rows = take_bits(table.values, tokens, axis=1)                      # [chunks, ..., chunk]
    rows = rows.reshape(table.chunks, *tokens.shape, table.groups, table.run)  # [j, ..., g, u]
    return jnp.moveaxis(rows, 0, -2).reshape(*tokens.shape, table.shape[-1])  # [..., g, j, u]
