"""How the chosen experts are computed, for each parameter layout (the routing is in model.py).

- The official layout (experts stacked [E, in, out], int8 or float): token copies sorted by
  expert go through `grouped_matmul` (`jax.lax.ragged_dot`), the accelerator path.
- The CPU layout of grok1/layout.py (`ExpertWeights`, one float [out, in] array per expert):
  `per_expert_moe` picks experts by branch so no weight is copied; the constants below were
  measured on a 2-core CPU with bench-1b (BENCHMARKS.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from grok1.layout import ExpertWeights
from grok1.quant import QuantizedWeight8bit, Weight


def grouped_matmul(xs: jax.Array, w: Weight, group_sizes: jax.Array, row_expert: jax.Array,
                   dtype) -> jax.Array:
    """Rows of `xs` sorted by expert times their expert's [in, out] matrix (`jax.lax.ragged_dot`).

    For int8 weights each scale block of the input axis is its own ragged_dot, and the block's
    scales (per expert and output column) multiply its partial product.
    """
    if not isinstance(w, QuantizedWeight8bit):
        return jax.lax.ragged_dot(xs, w.astype(dtype), group_sizes)
    E, n_in, n_out = w.weight.shape
    blocks = w.num_blocks
    size = n_in // blocks
    out = None
    for b in range(blocks):
        part = jax.lax.ragged_dot(xs[:, b * size:(b + 1) * size],
                                  w.weight[:, b * size:(b + 1) * size, :].astype(dtype), group_sizes)
        part = part * w.scales[:, b, :].astype(dtype)[row_expert]
        out = part if out is None else out + part
    return out


# Up to this many tokens (decoding), every chosen expert runs on all of them; more go in tiles
# of about the expected rows per expert (a power of two, at most MAX_MOE_TILE).
DENSE_MOE_TOKENS = 16
MAX_MOE_TILE = 32  # prefill 512 on bench-1b: 16 -> 406, 32 -> 412, 64 -> 375, 128 -> 294 tokens/s


# Output panels of the CPU dots below: XLA runs a dot with a leading panel axis as separate
# smaller dots, measured 1.5-2x faster than one dot for 1-32 rows on 2 cores.
EXPERT_PANELS = 2
UNEMBED_PANELS = 8


def panel_dot(x: jax.Array, w_t: jax.Array, panels: int) -> jax.Array:
    """x [n, in] @ w_t.T for a weight stored [out, in], as `panels` dots over slices of `out`."""
    out_size, in_size = w_t.shape
    acc = jnp.float32  # bfloat16 dots accumulating in float32 run on the fast CPU kernels
    if x.shape[0] == 1 and x.dtype == jnp.bfloat16:  # one bfloat16 row: the form XLA ran fastest
        if out_size >= in_size:
            return jnp.dot(x, w_t.T, preferred_element_type=acc).astype(x.dtype)
        panels = 1
    if out_size % panels:
        panels = 1
    y = jnp.einsum("ni,poi->pno", x, w_t.reshape(panels, out_size // panels, in_size),
                   preferred_element_type=acc).astype(x.dtype)
    return jnp.transpose(y, (1, 0, 2)).reshape(x.shape[0], out_size)


def expert_ffn(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, dtype) -> jax.Array:
    """One expert on rows x [n, d], its weights transposed as [out, in] (ExpertWeights):
    (gelu(x @ linear) * (x @ linear_v)) @ linear_1."""
    dot = lambda a, w_t: panel_dot(a, w_t.astype(dtype), EXPERT_PANELS)
    h = jax.nn.gelu(dot(x, w_gate)) * dot(x, w_up)
    return dot(h, w_down)


def per_expert_moe(x: jax.Array, gates: jax.Array, experts: jax.Array,
                   weights: tuple[ExpertWeights, ExpertWeights, ExpertWeights], dtype) -> jax.Array:
    """The MoE sum over ExpertWeights (one array per expert) for tokens x [N, d] with their top-k
    `gates` and `experts` [N, k]; experts are picked by branch, so no weight is ever copied."""
    per_expert = list(zip(*(w.transposed for w in weights)))       # E x (gate, up, down)
    if x.shape[0] <= DENSE_MOE_TOKENS:
        return chosen_experts_dense(x, gates, experts, per_expert, dtype)
    rows_per_expert = x.shape[0] * experts.shape[1] // len(per_expert)
    tile = min(MAX_MOE_TILE, 1 << max(3, (rows_per_expert - 1).bit_length()))
    return tiled_experts(x, gates, experts, per_expert, dtype, tile)


def chosen_experts_dense(x, gates, experts, per_expert, dtype) -> jax.Array:
    """Every expert that some token chose runs on all N rows (`lax.cond` skips the others), its
    output weighted by each row's gate for it (0 where the row did not choose it). For the few
    rows of a decode step, reading an expert's weights costs far more than the extra rows."""
    out = jnp.zeros(x.shape, dtype)
    for e, w in enumerate(per_expert):
        chosen = experts == e                                               # [N, k]
        gate = jnp.sum(jnp.where(chosen, gates, 0.0), axis=-1).astype(dtype)
        out = out + jax.lax.cond(
            jnp.any(chosen), lambda x, g, w=w: expert_ffn(x, *w, dtype) * g[:, None],
            lambda x, g: jnp.zeros_like(x), x, gate)
    return out


def tiled_experts(x, gates, experts, per_expert, dtype, tile: int) -> jax.Array:
    """Sparse top-k for many rows: the (row, expert) pairs sorted by expert, each expert's group
    padded to a multiple of `tile` rows, and every tile run through its own expert's matrices
    (`lax.switch`); tiles past the last group run nothing."""
    N, d = x.shape
    k, E = experts.shape[1], len(per_expert)
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sorted_experts = flat[order]
    sizes = jnp.bincount(flat, length=E)
    padded = (sizes + tile - 1) // tile * tile
    padded_end = jnp.cumsum(padded)
    rank = jnp.arange(N * k) - (jnp.cumsum(sizes) - sizes)[sorted_experts]
    dest = (padded_end - padded)[sorted_experts] + rank                   # row of each pair
    num_tiles = -(-(N * k + E * (tile - 1)) // tile)
    xs = jnp.zeros((num_tiles * tile, d), dtype).at[dest].set(x[order // k])
    tile_expert = jnp.searchsorted(padded_end, jnp.arange(num_tiles) * tile, side="right")
    branches = [lambda rows, w=w: expert_ffn(rows, *w, dtype) for w in per_expert]
    branches.append(jnp.zeros_like)                                     # index E: unused tile
    ys = jax.lax.map(lambda args: jax.lax.switch(args[1], branches, args[0]),
                     (xs.reshape(num_tiles, tile, d), tile_expert)).reshape(-1, d)
    y = ys[dest] * gates.reshape(-1)[order][:, None].astype(dtype)
    return jnp.zeros((N, d), dtype).at[order // k].add(y)
