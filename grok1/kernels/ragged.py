"""The grouped (ragged) expert product as a Pallas kernel: rows sorted by expert times their
expert's matrix of a stacked LinearWeight, each chosen expert's int8 (or bfloat16) values read
once per block of its rows, the block scales applied inside the kernel, experts without rows
never read.

Why a kernel of our own: XLA's grouped product (`jax.lax.ragged_dot`) reads all the experts of
the stack on GPUs (issue 30), and tokamax's Triton ragged_dot (0.0.12, the newest that installs
with jax 0.10.2) takes weights [E, in, out] (the compute layout's [E, out, in] it transposes as a
whole first), refuses CPU for its Triton path (no interpret-mode test of it here) and brings
flax, orbax and tensorstore with it.

How it runs: the sorted rows are laid out in blocks of 16 or 64 rows (`block_rows_for`), each
expert's group padded to whole blocks (`row_blocks`), so every block belongs to one expert. The
kernel's grid is (row block, tile of the output axis, share of the input axis); a program multiplies its block by its expert's tile of
the weight, converted in the kernel, over the input axis a tile at a time (float32
accumulation), scales the sum per chunk and writes its own output tile: no two programs write
the same rows (with the input axis split among programs, `split_count`, each writes its own
partial sum). Blocks past the used ones do nothing. The weight stack is passed whole with the
layer picked by the model's traced index (`LinearWeight.picked`) and the expert of each block
as scalars: nothing is sliced or copied out of it. On CPU it runs in Pallas interpret mode (the
tests); on GPUs it lowers through Triton.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pallas_triton

from grok1.kernels.platform import TRITON_TILE, pallas_interpret, pallas_tiles_fit, precision, product_dtype
from grok1.weights.layout import LinearWeight

# Tiles of the output and input axes a program multiplies at once (the largest power of two up
# to these that divides the axis): a 128 x 256 int8 tile is 32 KiB.
OUT_TILE = 128
IN_TILE = 256
# Triton's software pipelining depth over the input tiles (loads in flight while one multiplies).
TRITON_STAGES = 3
# A decode step has few row blocks: its input axis is split into shares, a program each (partial
# sums added after the kernel), until the grid has about this many programs, so that every core
# of a GPU streams weight tiles.
SPLIT_PROGRAMS = 1024


class RowBlocks(NamedTuple):
    """Where n rows sorted by expert go when each expert's group is padded to whole blocks of
    `rows` rows: `dest` [n] each row's position, `expert` [blocks] each block's expert (the last
    expert for unused blocks), `used` [1] how many blocks hold rows (they come first)."""

    dest: jax.Array
    expert: jax.Array
    used: jax.Array
    rows: int

    @property
    def count(self) -> int:
        return self.expert.shape[0]


def block_rows_for(pairs: int) -> int:
    """Rows per block for `pairs` sorted rows: 16 (the smallest GPU matrix tile) for a decode
    step's few rows, 64 for a prompt's many."""
    return 16 if pairs <= 256 else 64


def row_blocks(group_sizes: jax.Array, n: int, rows: int) -> RowBlocks:
    """The blocks of `rows` rows for n rows sorted into groups of `group_sizes` [E]: at most
    n // rows + min(E, n) blocks (each non-empty group wastes less than a block)."""
    E = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    padded = -(-sizes // rows) * rows
    start, padded_start = jnp.cumsum(sizes) - sizes, jnp.cumsum(padded) - padded
    row_expert = jnp.repeat(jnp.arange(E, dtype=jnp.int32), sizes, total_repeat_length=n)
    dest = padded_start[row_expert] + jnp.arange(n, dtype=jnp.int32) - start[row_expert]
    count = n // rows + min(E, n)
    ends = jnp.cumsum(padded) // rows                                       # [E] block ends
    expert = jnp.searchsorted(ends, jnp.arange(count, dtype=jnp.int32), side="right")
    return RowBlocks(dest=dest, expert=jnp.minimum(expert, E - 1).astype(jnp.int32),
                     used=ends[-1:].astype(jnp.int32), rows=rows)


def to_blocks(xs: jax.Array, blocks: RowBlocks) -> jax.Array:
    """Sorted rows xs [n, d] laid out in blocks: [blocks * rows, d], zeros where padded."""
    return jnp.zeros((blocks.count * blocks.rows, xs.shape[-1]), xs.dtype).at[blocks.dest].set(xs)


def from_blocks(y: jax.Array, blocks: RowBlocks) -> jax.Array:
    """The sorted rows [n, ...] back out of their blocks."""
    return y[blocks.dest]


def _tile(n: int, most: int) -> int:
    """The largest power of two up to `most` that divides n (n itself when none above 1 does)."""
    tile = 1 << (min(most, n).bit_length() - 1)
    while tile > 1 and n % tile:
        tile //= 2
    return tile if tile > 1 else n


def split_count(programs: int, in_tiles: int) -> int:
    """Into how many shares (a power of two dividing `in_tiles`) the input axis is split when
    the grid has `programs` programs otherwise: up to about SPLIT_PROGRAMS programs in all."""
    splits = 1
    while (programs * splits < SPLIT_PROGRAMS and in_tiles % (2 * splits) == 0):
        splits *= 2
    return splits


def blocked_linear(x_blocks: jax.Array, w: LinearWeight, blocks: RowBlocks, dtype,
                   interpret: bool | None = None) -> jax.Array:
    """Rows in blocks [blocks * rows, in] (`to_blocks`) times each block's expert's matrix of the
    stack w ([..., E, chunks, out, chunk], a layer possibly picked): float32
    [blocks * rows, out]. The rows are rounded to `dtype`, the weight converted to
    `product_dtype` in the kernel, products summed in float32 and scaled per chunk. Rows of
    unused blocks are left undefined. `interpret` defaults to `pallas_interpret()`."""
    if w.groups != 1:
        raise ValueError(f"the Pallas expert kernel takes a weight whose input axis is whole "
                         f"(groups 1), not split in {w.groups} device shares")
    *lead, E, chunks, n_out, chunk = w.values.shape
    interpret = pallas_interpret() if interpret is None else interpret
    if not interpret and not pallas_tiles_fit(w):
        raise ValueError(f"the Pallas expert kernel compiles weights whose output axis ({n_out}) and "
                         f"input chunks ({chunk}) are multiples of {TRITON_TILE}")
    if len(w.picked) != len(lead):
        raise ValueError(f"the Pallas expert kernel takes a stack of experts [..., E, ...] with its "
                         f"leading axes picked, got {len(w.picked)} picked of {len(lead)}")
    values = w.values.reshape(-1, chunks, n_out, chunk)                     # [L*E, ...]
    base = jnp.int32(0)
    for index, size in zip(w.picked, lead):
        base = base * size + jnp.asarray(index, jnp.int32)
    expert_row = (base * E + blocks.expert).astype(jnp.int32)               # [blocks]
    xs = jnp.stack([w.rows_of_chunk(x_blocks, j) for j in range(chunks)]).astype(dtype)
    if w.scales is None:
        scales, scale_block = None, None
    else:
        scales = w.scales.reshape(-1, *w.scales.shape[-2:])                 # [L*E, blocks, out]
        size = w.shape[-2] // w.scales.shape[-2]
        scale_block = [int(w.positions(j)[0]) // size for j in range(chunks)]
    to = product_dtype(w.dtype, dtype)
    exactly = precision(jnp.promote_types(dtype, to))
    rows, out_tile, in_tile = blocks.rows, _tile(n_out, OUT_TILE), _tile(chunk, IN_TILE)
    splits = split_count(blocks.count * (n_out // out_tile), chunk // in_tile)
    share = chunk // in_tile // splits                                      # input tiles per program

    def kernel(expert_ref, used_ref, x_ref, w_ref, *refs):
        s_ref, out_ref = refs if scales is not None else (None, refs[0])
        i, o, part_of = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        outs = pl.ds(o * out_tile, out_tile)

        @pl.when(i < used_ref[0])
        def _():
            e = expert_ref[i]                                # the block's expert's row of the stack
            total = jnp.zeros((rows, out_tile), jnp.float32)
            for j in range(chunks):
                def step(t, acc, j=j):
                    ins = pl.ds(t * in_tile, in_tile)
                    x = x_ref[j, pl.ds(i * rows, rows), ins].astype(to)           # [rows, in_tile]
                    v = w_ref[e, j, outs, ins].astype(to)                         # [out_tile, in_tile]
                    return acc + jax.lax.dot_general(x, v, (((1,), (1,)), ((), ())), precision=exactly,
                                                     preferred_element_type=jnp.float32)
                part = jax.lax.fori_loop(part_of * share, (part_of + 1) * share, step,
                                         jnp.zeros((rows, out_tile), jnp.float32))
                if s_ref is not None:
                    part = part * s_ref[e, scale_block[j], outs].astype(jnp.float32)[None, :]
                total = total + part
            out_ref[...] = total

    operands = [expert_row, blocks.used, xs, values] + ([scales] if scales is not None else [])
    partial_sums = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((splits, blocks.count * rows, n_out), jnp.float32),
        grid=(blocks.count, n_out // out_tile, splits),
        in_specs=[pl.no_block_spec] * len(operands),
        out_specs=pl.BlockSpec((None, rows, out_tile), lambda i, o, part_of: (part_of, i, o)),
        compiler_params=pallas_triton.CompilerParams(num_warps=4, num_stages=TRITON_STAGES),
        interpret=interpret,
        name="grok1_ragged_linear",
    )(*operands)
    return partial_sums[0] if splits == 1 else jnp.sum(partial_sums, axis=0)


def pallas_ragged_linear(xs: jax.Array, w: LinearWeight, group_sizes: jax.Array,
                         row_expert: jax.Array, dtype, interpret: bool | None = None) -> jax.Array:
    """`xla.ragged_linear` through the kernel: rows xs [n, in] sorted by expert (`group_sizes`
    [E] rows each) times their expert's matrix of the stack w: float32 [n, out]. (`row_expert`
    is implied by the group sizes; taken for the same signature.)"""
    del row_expert
    n = xs.shape[0]
    blocks = row_blocks(group_sizes, n, block_rows_for(n))
    return from_blocks(blocked_linear(to_blocks(xs, blocks), w, blocks, dtype, interpret), blocks)

