"""How the chosen experts are computed, for each parameter layout (the routing is in model.py).

- The official layout (experts stacked [E, in, out], int8 or float): token copies sorted by
  expert go through `grouped_matmul` (`jax.lax.ragged_dot`), the accelerator path.
- The CPU layout of grok1/layout.py (`ExpertWeights`, one float [out, in] array per expert,
  and optionally a bfloat16 [in, out] copy for prefill): `per_expert_moe` reaches each expert's
  own arrays (by branch or in per-expert code), so no weight is copied; the constants below
  were measured on a 2-core CPU with bench-1b (BENCHMARKS.md).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from grok1.layout import ExpertWeights
from grok1.quant import QuantizedWeight8bit, Weight


def grouped_matmul(xs: jax.Array, w: Weight, group_sizes: jax.Array, row_expert: jax.Array,
                   dtype) -> jax.Array:
    """Rows of `xs` sorted by expert times their expert's [in, out] matrix (`jax.lax.ragged_dot`),
    operands in `dtype`, result float32.

    For int8 weights each scale block of the input axis is its own ragged_dot, and the block's
    scales (per expert and output column) multiply its partial product.
    """
    acc = jnp.float32
    xs = xs.astype(dtype)
    if not isinstance(w, QuantizedWeight8bit):
        return jax.lax.ragged_dot(xs, w.astype(dtype), group_sizes, preferred_element_type=acc)
    E, n_in, n_out = w.weight.shape
    blocks = w.num_blocks
    size = n_in // blocks
    out = None
    for b in range(blocks):
        part = jax.lax.ragged_dot(xs[:, b * size:(b + 1) * size],
                                  w.weight[:, b * size:(b + 1) * size, :].astype(dtype), group_sizes,
                                  preferred_element_type=acc)
        part = part * w.scales[:, b, :].astype(acc)[row_expert]
        out = part if out is None else out + part
    return out


def sort_pairs_by_expert(experts: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """The B*k (token, expert) pairs of `experts` [B, k] in expert order, so each expert sees one
    contiguous group: (order, the flat index of each sorted pair, whose token is order // k;
    group sizes [num_experts])."""
    flat = experts.reshape(-1)
    return jnp.argsort(flat, stable=True), jnp.bincount(flat, length=num_experts)


def combine_pairs(y: jax.Array, gates: jax.Array, order: jax.Array, k: int) -> jax.Array:
    """Each token's sum of its sorted pairs' outputs `y` [B*k, d] weighted by their `gates`
    [B, k] (as is, not renormalised) -> [B, d]."""
    y = y * gates.reshape(-1)[order][:, None].astype(y.dtype)
    return jnp.zeros((gates.shape[0], y.shape[-1]), y.dtype).at[order // k].add(y)


# Up to this many tokens (decoding), every chosen expert runs on all of them; more are grouped by
# expert, each expert reading a window of CAPACITY_FACTOR x its expected rows (a multiple of 16).
DENSE_MOE_TOKENS = 16
CAPACITY_FACTOR = 1.25
# The bfloat16 prefill copy wins from this many rows per expert window (one bench-1b MoE layer
# against float32 [out, in]: 16 rows 1.5x slower, 32 rows 1.0-1.1x slower, 48 rows 1.9x faster,
# 64-80 rows 1.3-1.6x faster).
MIN_PREFILL_COPY_ROWS = 48


def group_capacity(tokens: int, num_experts: int, k: int) -> int:
    """Rows of each expert's window for `tokens` tokens choosing k of `num_experts`: the
    balanced share with a margin (a group rarely overflows into a second round)."""
    expected = tokens * k / num_experts
    return min(tokens, -(-math.ceil(CAPACITY_FACTOR * expected) // 16) * 16)


# Output panels of the CPU dots below: XLA runs a dot with a leading panel axis as separate
# smaller dots, measured 1.5-2x faster than one dot for 1-32 rows on 2 cores.
EXPERT_PANELS = 2
UNEMBED_PANELS = 8


def panel_dot(x: jax.Array, w_t: jax.Array, panels: int, out_dtype=None) -> jax.Array:
    """x [n, in] @ w_t.T for a weight stored [out, in], as `panels` dots over slices of `out`;
    the result in `out_dtype` (default x's)."""
    out_size, in_size = w_t.shape
    out_dtype = out_dtype or x.dtype
    acc = jnp.float32  # bfloat16 dots accumulating in float32 run on the fast CPU kernels
    if x.shape[0] == 1 and x.dtype == jnp.bfloat16:  # one bfloat16 row: the form XLA ran fastest
        if out_size >= in_size:
            return jnp.dot(x, w_t.T, preferred_element_type=acc).astype(out_dtype)
        panels = 1
    if out_size % panels:
        panels = 1
    y = jnp.einsum("ni,poi->pno", x, w_t.reshape(panels, out_size // panels, in_size),
                   preferred_element_type=acc).astype(out_dtype)
    return jnp.transpose(y, (1, 0, 2)).reshape(x.shape[0], out_size)


def expert_ffn(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, dtype) -> jax.Array:
    """One expert on rows x [n, d], its weights transposed as [out, in] (ExpertWeights):
    (gelu(x @ linear) * (x @ linear_v)) @ linear_1, matmul operands in `dtype`, the rest and the
    result in float32 (docs/ARCHITECTURE.md, "Where the model rounds to bfloat16")."""
    dot = lambda a, w_t: panel_dot(a.astype(dtype), w_t, EXPERT_PANELS, jnp.float32)
    h = jax.nn.gelu(dot(x, w_gate)) * dot(x, w_up)
    return dot(h, w_down)


def prefill_expert_ffn(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """One expert on many rows x [n, d] with its prefill copy (weights [in, out], their dtype
    the matmul dtype, products accumulated in float32); the result in float32."""
    dtype = w_gate.dtype
    dot = lambda a, w: jnp.dot(a.astype(dtype), w, preferred_element_type=jnp.float32)
    h = jax.nn.gelu(dot(x, w_gate)) * dot(x, w_up)
    return dot(h, w_down)


def per_expert_moe(x: jax.Array, gates: jax.Array, experts: jax.Array,
                   weights: tuple[ExpertWeights, ExpertWeights, ExpertWeights], dtype) -> jax.Array:
    """The MoE sum over ExpertWeights (one array per expert) for tokens x [N, d] with their top-k
    `gates` and `experts` [N, k]; no weight is ever copied. Tokens enough to give each expert
    MIN_PREFILL_COPY_ROWS rows use the experts' prefill copy when the layout kept one. The sum
    is float32 (the official model adds its experts' outputs before rounding)."""
    per_expert = list(zip(*(w.transposed for w in weights)))        # E x (gate, up, down)
    if x.shape[0] <= DENSE_MOE_TOKENS:
        return chosen_experts_dense(x, gates, experts, per_expert, dtype)
    capacity = group_capacity(x.shape[0], len(per_expert), experts.shape[1])
    if weights[0].for_prefill is not None and capacity >= MIN_PREFILL_COPY_ROWS:
        prefill_copy = list(zip(*(w.for_prefill for w in weights)))
        return grouped_experts(x, gates, experts, prefill_copy, prefill_expert_ffn, capacity)
    return grouped_experts(x, gates, experts, per_expert,
                           lambda rows, *w: expert_ffn(rows, *w, dtype), capacity)


def chosen_experts_dense(x, gates, experts, per_expert, dtype) -> jax.Array:
    """Every expert that some token chose runs on all N rows (`lax.cond` skips the others), its
    output weighted by each row's gate for it (0 where the row did not choose it). For the few
    rows of a decode step, reading an expert's weights costs far more than the extra rows."""
    out = jnp.zeros(x.shape, jnp.float32)
    for e, w in enumerate(per_expert):
        chosen = experts == e                                               # [N, k]
        gate = jnp.sum(jnp.where(chosen, gates, 0.0), axis=-1).astype(jnp.float32)
        out = out + jax.lax.cond(
            jnp.any(chosen), lambda x, g, w=w: expert_ffn(x, *w, dtype) * g[:, None],
            lambda x, g: jnp.zeros(x.shape, jnp.float32), x, gate)
    return out


def grouped_experts(x, gates, experts, per_expert, ffn: Callable[..., jax.Array],
                    capacity: int) -> jax.Array:
    """Sparse top-k for many rows: the (row, expert) pairs sorted by expert, then each expert runs
    `ffn(rows, *its matrices)` on a window of `capacity` rows at the start of its group. The
    window is sized to hold a whole group under balanced routing, so normally that is all: E
    straight-line matmuls, which XLA's CPU runtime runs far faster than tiles in a loop of
    `lax.switch` (one bench-1b MoE layer on 512 tokens with the bfloat16 copy: 108-135 ms
    against 192-215 ms). Groups longer than `capacity` continue in further rounds, so no token
    is ever dropped. Rows of a window past its group belong to the next expert and are masked
    out."""
    N, d = x.shape
    k, E = experts.shape[1], len(per_expert)
    order, sizes = sort_pairs_by_expert(experts, E)
    starts = jnp.cumsum(sizes) - sizes
    xs = jnp.zeros((N * k + capacity, d), x.dtype).at[:N * k].set(x[order // k])

    def run(ys, e: int, offset):
        start = starts[e] + offset
        rows = jax.lax.dynamic_slice_in_dim(xs, start, capacity)
        inside = (jnp.arange(capacity) < sizes[e] - offset)[:, None]
        y = jnp.where(inside, ffn(rows, *per_expert[e]), 0).astype(ys.dtype)
        window = jax.lax.dynamic_slice_in_dim(ys, start, capacity)
        return jax.lax.dynamic_update_slice_in_dim(ys, window + y, start, 0)

    ys = jnp.zeros(xs.shape, jnp.float32)
    for e in range(E):
        ys = run(ys, e, 0)

    def next_round(state):
        r, ys = state
        for e in range(E):
            ys = jax.lax.cond(sizes[e] > r * capacity, lambda ys, e=e: run(ys, e, r * capacity),
                              lambda ys: ys, ys)
        return r + 1, ys

    _, ys = jax.lax.while_loop(lambda state: state[0] * capacity < jnp.max(sizes), next_round,
                               (jnp.int32(1), ys))
    return combine_pairs(ys[:N * k], gates, order, k)
