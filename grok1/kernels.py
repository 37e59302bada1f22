"""How rows are multiplied by a weight, and how a decode step attends over the KV cache: the one
place that knows the compute layout and the platform (model.py calls `linear`,
`rows_times_transposed` and `attention_over_cache`, and never branches on either).

A product is computed as the official model defines it, up to float32 rounding: the rows
rounded to the compute dtype, int8 values (exact in float32) times their block scale, products
accumulated in float32 and returned in float32 (docs/ARCHITECTURE.md, "Where the model rounds to
bfloat16"); a run of the input axis inside one scale block is scaled after its product.

What XLA:CPU runs fast, measured on this project's 2-core machines (benchmarks/products.py):
- One row times a weight stored [out, in] (`row @ w.T`) is a matrix-vector product that streams
  the weight at memory bandwidth, with the int8 -> float32 convert and the block scales fused
  into it: int8 moves 4x fewer bytes than float32.
- Two to about sixteen rows in one product fall off that path (the convert is no longer fused:
  10-50x slower for int8 and bfloat16 weights), so up to ONE_ROW_PRODUCTS_UP_TO rows run as
  one-row products, each reading the weight again.
- A product fused with what produces its rows or with what consumes its result (an add, a
  multiply) is emitted as a plain loop or reads a transposed copy of the weight (20-50x slower),
  so the rows and each one-row product are fenced by optimization barriers.
Where grok1/native.py's kernel is available (CPU with AVX2, a C++ compiler), up to
NATIVE_ROWS_UP_TO rows of an int8/bfloat16 weight run through it instead: all rows in one pass
over the weight, on all cores, and each row may pick its own entry of a stack (a layer, an
expert) straight out of the whole stack (`LinearWeight.picked`): nothing is sliced or copied.
Many rows (prompts) run one product with the dequantised weight, which XLA materialises once,
and so do any rows of a float32 weight (a float checkpoint: XLA's float32 product of a few rows
reads the weight once). Accelerators compile one product in every case (weights in one chunk
there, layout.max_chunk), and run a decode step's experts as grouped products over the whole
stack (`ragged_products`).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from grok1 import native
from grok1.layout import LinearWeight
from grok1.quant import Weight, matmul, precision
from grok1.rows import whole_rows

# Up to this many rows, a product on CPU runs as one-row products (see the module docstring).
ONE_ROW_PRODUCTS_UP_TO = 16
# Up to this many rows (a decode step's rows, or its (token, expert) pairs), a product runs
# through the native kernel where it is available.
NATIVE_ROWS_UP_TO = 64
# Up to this many queries per row and kv head (new tokens x query heads per kv head: a decode
# step), attention over the cache runs through the native kernel where it is available; a
# prompt's many queries are products XLA runs well, and its per-query logits would not fit.
NATIVE_QUERIES_UP_TO = 64
# Up to this many (token, expert) pairs, a MoE layer on one accelerator runs as grouped products
# over the whole expert stack (`ragged_products`); more (a prompt) group rows per expert.
RAGGED_PAIRS_UP_TO = 128


def native_products(w: LinearWeight, rows: int) -> bool:
    """Whether `rows` rows times `w` run through grok1/native.py's kernel: on CPU, an int8 or
    bfloat16 weight, at most NATIVE_ROWS_UP_TO rows, the kernel built and loaded; on one device
    a weight whose input axis is whole (`groups` 1), on a mesh a weight whose every device's
    shard is a weight of its own (`device_split`)."""
    if (jax.default_backend() != "cpu" or rows > NATIVE_ROWS_UP_TO
            or jnp.dtype(w.dtype) not in (jnp.dtype(jnp.int8), jnp.dtype(jnp.bfloat16))):
        return False
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        if device_split(w) is None:
            return False
    elif w.groups != 1:
        return False
    return native.available()


def device_split(w: LinearWeight) -> Optional[tuple[tuple[str, ...], tuple[str, ...]]]:
    """(mesh axes splitting w's output axis, mesh axes splitting its input axis) when each
    device's shard of `w` is a LinearWeight by itself (leading axes and chunks whole, the
    input share's scale blocks its own), as `mesh_split` records; else None."""
    if not w.mesh_split:
        return None
    values_spec, scales_spec = w.mesh_split
    if len(values_spec) != w.values.ndim:
        return None
    *lead, chunks, out_split, in_split = values_spec
    if any(lead) or chunks:
        return None
    out_axes, in_axes = _axes(out_split), _axes(in_split)
    if scales_spec is not None:
        if len(scales_spec) != w.scales.ndim:
            return None
        *scale_lead, blocks, scale_out = scales_spec
        whole_block = w.scales.shape[-2] == 1 and not blocks
        if any(scale_lead) or _axes(scale_out) != out_axes or not (whole_block or _axes(blocks) == in_axes):
            return None
    return out_axes, in_axes


def _axes(entry: Any) -> tuple[str, ...]:
    """A PartitionSpec entry as a tuple of mesh axis names."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def threads_per_device(mesh: Any) -> int:
    """Threads for each device's native kernel call on `mesh`: this process's cores shared among
    its devices of the mesh, whose programs run side by side (at least one each). Left to take
    all cores each, bench-1b's decode step on 8 forced devices over 2 cores (1x8, batch 1) spent
    72 ms of CPU time per step instead of 53 (wall 42 -> 34 ms; BENCHMARKS.md, session 9)."""
    devices = min(mesh.size // jax.process_count(), jax.local_device_count())
    return max(1, _cores() // max(1, devices))


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def native_linear(x: jax.Array, w: LinearWeight, dtype, entries: Optional[jax.Array] = None
                  ) -> jax.Array:
    """`x @ w` through the native kernel, float32 [..., out]: the rows rounded to `dtype` as in
    every product. With `entries` [rows] (ints), row i multiplies entry entries[i] of the leading
    axis left after `w.picked` (e.g. its expert); the kernel reads each entry from the stack.
    On a mesh, each device multiplies the rows (its share of their input axis) by its own shard
    (a custom call has no rule for partitioning it: `shard_map`), and the devices sharing the
    input axis add up their parts (`device_split`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return _native_linear_here(x, w, dtype, entries)
    out_axes, in_axes = device_split(w)
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


def attention_over_cache(q: jax.Array, keys: jax.Array, values: jax.Array, layer: jax.Array | int,
                         mask: jax.Array, attend: Callable[..., jax.Array], *, multiplier: float,
                         cap: float, masked_logit: float) -> jax.Array:
    """`attend(q, keys[layer], values[layer], mask)` for queries q [B, T, N, G, K] over the stacked
    cache [L, B, S, N, K]. On CPU, for a decode step's few queries, grok1/native.py's
    `cached_attention` computes the same softmax(masked(cap * tanh(multiplier * q.k / cap))) @ v
    (float32, up to rounding) from the cache in place; `multiplier`, `cap` and `masked_logit`
    are attend's constants, which it needs to know. On a mesh whose every device holds its own
    rows and kv heads of the cache, each runs it on those (`shard_map`): attention needs nothing
    from other rows or heads."""
    mesh = jax.sharding.get_abstract_mesh()
    on_mesh = not mesh.empty and mesh.size > 1
    kernel = native_attention(q, keys)
    cache_spec = _cache_split(mesh, keys.shape) if kernel and on_mesh else None
    if not kernel or (on_mesh and cache_spec is None):
        k, v = (jax.lax.dynamic_index_in_dim(stack, layer, keepdims=False) for stack in (keys, values))
        return attend(q, k, v, mask)

    threads = threads_per_device(mesh) if on_mesh else 0

    def here(q, keys, values, layer, mask):
        return native.cached_attention(q, keys, values, layer, mask, multiplier, cap, masked_logit,
                                       threads)

    layer = jnp.asarray(layer, jnp.int32)
    if not on_mesh:
        return here(q, keys, values, layer, mask)
    _, rows, _, heads, _ = cache_spec
    q_spec = P(rows, None, heads, None, None)
    return jax.shard_map(here, mesh=mesh, check_vma=False,
                         in_specs=(q_spec, cache_spec, cache_spec, P(), P(rows, None, None)),
                         out_specs=q_spec)(q, keys, values, layer, mask)


def split_like_cache(x: jax.Array) -> jax.Array:
    """New keys or values [B, T, N, K], straight from their projections, or the stacked cache
    [L, B, S, N, K] they were written into, held to the cache's split wherever the key/value
    projections split the kv heads over other mesh axes than the cache does (sharding.py): where
    they cut heads the cache keeps whole (bench-1b's 4 on 1x8, the shipped model's 2), or where
    a batch too small for the data axis leaves it to the cache's heads (bench-1b's batch 1 on
    2x4). Left to XLA, the projections' split spreads into the cache inside the layer loop and
    the cache is moved back at every step's end, and each layer's keys inside attention:
    bench-1b on 1x8, 47 / 246 ms per decode step (batch 1 / 8) -> 33 / 95-108 (one device
    16.6 / 61-66). Both places are needed (the stack alone: 72 / 428 ms). Holding the new
    entries so before RoPE, not only at the write, keeps RoPE's halves of a head on one device:
    two gathers of a row's keys and values instead of seven collectives per layer. Where both
    split the heads alike XLA's choice stays (the constraint made bench-1b's 2x4 batch 8
    slower there: 92-95 vs 81-84 ms)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    # imported here: sharding.py imports the model, which imports this module
    from grok1.sharding import ACTIVATION_AXES, PARAM_AXES, partition_spec
    *_, N, K = x.shape
    lead = 5 - x.ndim  # 1 for new entries (no layer axis), 0 for the stack
    spec = partition_spec(ACTIVATION_AXES["cache_kv"], (1,) * lead + x.shape, mesh)
    projection = partition_spec(PARAM_AXES["key"], (1, N * K), mesh)[-1]
    if _axes(projection) == _axes(spec[-2]):
        return x
    return jax.lax.with_sharding_constraint(x, P(*spec[lead:]))


def _cache_split(mesh: Any, shape: tuple[int, ...]) -> Optional[P]:
    """The split of a cache of `shape` on `mesh` (sharding.py: rows over data, kv heads over what
    divides them) when it uses every mesh axis, so that each device's shard is its own; else
    None: a cache replicated over some axis would have each of its devices repeat the whole
    attention (measured on bench-1b's 4 kv heads on 1x8: 1.7x slower than XLA's split of the
    query heads)."""
    # imported here: sharding.py imports the model, which imports this module
    from grok1.sharding import ACTIVATION_AXES, partition_spec
    spec = partition_spec(ACTIVATION_AXES["cache_kv"], shape, mesh)
    used = math.prod(mesh.shape[axis] for entry in spec for axis in _axes(entry))
    return spec if used == mesh.size else None


def native_attention(q: jax.Array, keys: jax.Array) -> bool:
    """Whether attention of q [B, T, N, G, K] over the cache `keys` runs through the native
    kernel: on CPU, at most NATIVE_QUERIES_UP_TO queries per row and kv head, a float32 or
    bfloat16 cache, the kernel built and loaded."""
    return (jax.default_backend() == "cpu" and q.shape[1] * q.shape[3] <= NATIVE_QUERIES_UP_TO
            and jnp.dtype(keys.dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
            and native.available())


def one_row_products(weight_dtype, rows: int) -> bool:
    """Whether `rows` rows times a weight of `weight_dtype` run as one-row products: on CPU, up
    to ONE_ROW_PRODUCTS_UP_TO rows of a weight that needs a convert (int8, bfloat16). A float32
    weight is multiplied by all rows in one product, which reads it once."""
    return (jax.default_backend() == "cpu" and rows <= ONE_ROW_PRODUCTS_UP_TO
            and jnp.dtype(weight_dtype) != jnp.dtype(jnp.float32))


def product_dtype(weight_dtype, dtype):
    """The dtype a weight of `weight_dtype` is converted to inside a product whose rows are in
    `dtype`. On CPU float32: XLA:CPU fuses that convert into its one-row products. On
    accelerators the compute dtype when it holds the weight's values exactly (int8 or bfloat16
    values into bfloat16): the products of two bfloat16 operands are exact in float32, so the
    float32-accumulated sum is the same, and it runs on the matrix units instead of as a float32
    product."""
    exact = jnp.dtype(weight_dtype) in (jnp.dtype(jnp.int8), jnp.dtype(jnp.bfloat16))
    if jax.default_backend() != "cpu" and jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16) and exact:
        return jnp.bfloat16
    return jnp.float32


def ragged_products(tokens: int, pairs: int) -> bool:
    """Whether a MoE layer's (token, expert) pairs run as one grouped product per matrix over
    the whole expert stack (`ragged_linear`): on one accelerator, for a decode step of several
    tokens (2 to RAGGED_PAIRS_UP_TO pairs). There XLA's grouped product reads the int8 stack
    once with the convert fused (an H200, one MoE layer: 5.2-5.3 ms at 8 tokens against 7.0-7.6
    for an expert at a time or windows per expert, 6.6-7.0 against 7.8-8.2 at 32;
    benchmarks/gpu_kernels.py), but computes every expert on every row (dense in arithmetic:
    prompts group their rows by expert instead, 12.5 against 20.7 ms at 512 tokens); one token
    reads just its own experts (2.4-2.6 against 7.0 ms). One device only, so each weight's input
    axis is whole (`groups` 1), as `ragged_linear` takes it."""
    mesh = jax.sharding.get_abstract_mesh()
    return (jax.default_backend() != "cpu" and (mesh.empty or mesh.size == 1)
            and 1 < tokens and pairs <= RAGGED_PAIRS_UP_TO)


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


def linear(x: jax.Array, w: Weight | LinearWeight, dtype) -> jax.Array:
    """`x @ w` over the last axis of x, float32 result, for any weight the model may hold: a
    LinearWeight (loaded for inference), or the official [in, out] tree (training, `init`).

    Each run of a LinearWeight lies inside one scale block. A weight whose input axis is whole
    (one device, or split along its output) has one run per chunk: its product is summed over
    the int8 values (converted inside the product) and scaled after, the same sum as the
    dequantised weight's up to float32 rounding without a multiply per weight element. A chunk
    holding runs of several devices' shares is dequantised first (a product per run, scaled
    after, made XLA hold twice the prompt temporaries on 2x4)."""
    if not isinstance(w, LinearWeight):
        return matmul(x, w, dtype, out_dtype=jnp.float32)
    if native_products(w, math.prod(x.shape[:-1])):
        return native_linear(x, w, dtype)
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


def times_table(x: jax.Array, table: jax.Array | LinearWeight, dtype) -> jax.Array:
    """x [..., d] @ table.T for the [V, d] embedding table (the output projection), as stored
    (training) or in the compute layout; float32 [..., V]."""
    if isinstance(table, LinearWeight):
        return linear(x, table, dtype)
    return rows_times_transposed(x, table, dtype)


def table_rows(table: jax.Array | LinearWeight, tokens: jax.Array) -> jax.Array:
    """The embedding rows [..., d] of `tokens`, in the table's dtype (a table as stored is
    indexed plainly: training differentiates through it, and raw bits carry no gradient)."""
    if not isinstance(table, LinearWeight):
        return table[tokens]
    rows = take_bits(table.values, tokens, axis=1)                      # [chunks, ..., chunk]
    rows = rows.reshape(table.chunks, *tokens.shape, table.groups, table.run)  # [j, ..., g, u]
    return jnp.moveaxis(rows, 0, -2).reshape(*tokens.shape, table.shape[-1])  # [..., g, j, u]


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
