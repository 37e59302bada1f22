"""How the chosen experts are computed (the routing itself is in grok1/model.py).

- The compute layout (grok1/weights/layout.py: each expert stack a LinearWeight [E, out, in], int8 as
  stored): where the native CPU kernel runs (grok1/kernels/platform.py), a decode step's (token, expert)
  pairs are the rows of one native product per matrix, each reading its own expert. On one
  accelerator, a decode step of several tokens sorts its pairs by expert and runs one grouped
  product per matrix over the layer's stack (`sorted_ragged`). Otherwise a
  few tokens (a decode step) run each (token, expert) pair on its own, the expert's
  matrices picked by index, so only the chosen experts are read or computed, on one device and
  on a mesh alike; many tokens (a prompt) are grouped by expert, each expert running once on a
  window of its rows (`grouped_experts`).
- On one GPU with GROK1_PALLAS=1 (opt-in until a GPU has timed it), any number of tokens: the
  pairs sorted by expert, each expert's group padded to whole blocks of rows, each matrix one
  Pallas grouped kernel (grok1/kernels/ragged.py) that reads only the chosen experts, once per
  block of their rows (`pallas_pairs`). The expert product PALLAS forces it on any backend
  (interpret mode on CPU: the tests).
- The official tree (training, `init`: experts stacked [E, in, out]): token copies sorted by
  expert go through one of GROUPED_PRODUCTS (`jax.lax.ragged_dot` by default), in
  `sorted_ragged` as well.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from grok1.kernels.platform import (native_products, one_row_products, operand_dtype, pallas_experts,
                                    ragged_products)
from grok1.kernels.products import linear, native_linear
from grok1.kernels.ragged import block_rows_for, blocked_linear, from_blocks, row_blocks, to_blocks
from grok1.kernels.xla import blocked_grouped_matmul, grouped_matmul, ragged_linear
from grok1.weights.layout import LinearWeight
from grok1.weights.quant import Weight

# How the official tree's experts multiply their rows sorted by expert (`sorted_ragged`), by
# name: the model's `expert_product` option picks one (grok1.model.transformed). "ragged_dot" is
# jax.lax.ragged_dot, the reference; "blocked" pads each expert's rows to blocks of 128 and runs
# one batched product (the same result; on CPU, where ragged_dot computes every expert for every
# row, training is several times faster with it).
GROUPED_PRODUCTS = {"ragged_dot": grouped_matmul, "blocked": blocked_grouped_matmul}
# The expert product that runs the compute layout's experts through the Pallas grouped kernel on
# every backend (`pallas_pairs`; on CPU in interpret mode, as the tests run the GPU path).
PALLAS = "pallas"


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


# Up to this many (token, expert) pairs (a decode step of up to 16 rows, top-2), each pair runs
# on its own; more are grouped by expert, each expert reading a window of CAPACITY_FACTOR x its
# expected rows (a multiple of 16).
PAIRS_UP_TO = 32
CAPACITY_FACTOR = 1.25


def group_capacity(tokens: int, num_experts: int, k: int) -> int:
    """Rows of each expert's window for `tokens` tokens choosing k of `num_experts`: the
    balanced share with a margin (a group rarely overflows into a second round)."""
    expected = tokens * k / num_experts
    return min(tokens, -(-math.ceil(CAPACITY_FACTOR * expected) // 16) * 16)


def moe(x: jax.Array, gates: jax.Array, experts: jax.Array,
        weights: tuple[Weight | LinearWeight, Weight | LinearWeight, Weight | LinearWeight],
        dtype, grouped_product: str = "ragged_dot") -> jax.Array:
    """The MoE sum for tokens x [N, d] with their top-k `gates` and `experts` [N, k]: each chosen
    expert's (gelu(x @ linear) * (x @ linear_v)) @ linear_1 weighted by its gate as is, summed in
    float32 (the official model adds its experts' outputs before rounding). `weights` are the
    stacked (linear, linear_v, linear_1) of all experts, in either layout; `grouped_product`
    names the official tree's product (GROUPED_PRODUCTS), or PALLAS for the compute layout.
    Rows enter each product rounded to `platform.operand_dtype(dtype)`."""
    dtype = operand_dtype(dtype)
    if not isinstance(weights[0], LinearWeight):
        if grouped_product not in GROUPED_PRODUCTS:
            raise ValueError(f"unknown grouped product {grouped_product!r} for the official tree; "
                             f"known: {', '.join(GROUPED_PRODUCTS)} ({PALLAS!r} takes the compute layout)")
        return sorted_ragged(x, gates, experts, weights, dtype, GROUPED_PRODUCTS[grouped_product])
    N, k = experts.shape
    E = weights[0].shape[0]
    ffn = lambda rows, e: expert_ffn(rows, *(w[e] for w in weights), dtype=dtype)  # noqa: E731
    if grouped_product == PALLAS or all(pallas_experts(w) for w in weights):
        return pallas_pairs(x, gates, experts, weights, dtype)
    if all(native_products(w, N * k) for w in weights):
        return native_pairs(x, gates, experts, weights, dtype)
    if ragged_products(N, N * k):
        return sorted_ragged(x, gates, experts, weights, dtype)
    if N * k <= PAIRS_UP_TO:
        if one_row_products(weights[0].dtype, N):
            return chosen_pairs(x, gates, experts, weights, dtype)
        return chosen_experts_dense(x, gates, experts, ffn, E)
    return grouped_experts(x, gates, experts, ffn, E, group_capacity(N, E, k))


def expert_ffn(x: jax.Array, w_gate: LinearWeight, w_up: LinearWeight, w_down: LinearWeight,
               dtype) -> jax.Array:
    """One expert on rows x [n, d]: (gelu(x @ linear) * (x @ linear_v)) @ linear_1, products as
    kernels.linear computes them (operands in `dtype`, float32 results)."""
    h = jax.nn.gelu(linear(x, w_gate, dtype)) * linear(x, w_up, dtype)
    return linear(h, w_down, dtype)


def native_pairs(x: jax.Array, gates: jax.Array, experts: jax.Array,
                 weights: tuple[LinearWeight, LinearWeight, LinearWeight], dtype) -> jax.Array:
    """The N*k (token, expert) pairs as rows of one native product per matrix, each row reading
    its own expert's matrices out of the stack (grok1/kernels/products.py, `native_linear`): each chosen
    expert is read once per step, whatever the number of rows that chose it."""
    N, k = experts.shape
    pairs = experts.reshape(-1)                                             # [N*k]
    rows = jnp.repeat(x, k, axis=0)                                         # pair i: token i // k
    w_gate, w_up, w_down = weights
    h = (jax.nn.gelu(native_linear(rows, w_gate, dtype, pairs))
         * native_linear(rows, w_up, dtype, pairs))
    y = native_linear(h, w_down, dtype, pairs)                              # [N*k, d]
    return jnp.sum(y.reshape(N, k, -1) * gates.astype(jnp.float32)[..., None], axis=1)


def pallas_pairs(x: jax.Array, gates: jax.Array, experts: jax.Array,
                 weights: tuple[LinearWeight, LinearWeight, LinearWeight], dtype) -> jax.Array:
    """The N*k (token, expert) pairs sorted by expert and laid out in blocks of rows, one expert
    per block (grok1/kernels/ragged.py), each matrix one Pallas grouped kernel over the layer's
    stack: a chosen expert is read once per block of its rows, an expert without rows not at
    all, and only the chosen experts are computed. The hidden rows stay in blocks between the
    products."""
    N, k = experts.shape
    w_gate, w_up, w_down = weights
    order, group_sizes = sort_pairs_by_expert(experts, w_gate.shape[0])
    blocks = row_blocks(group_sizes, N * k, block_rows_for(N * k))
    xs = to_blocks(x.astype(dtype)[order // k], blocks)                    # [blocks * rows, d]
    h = (jax.nn.gelu(blocked_linear(xs, w_gate, blocks, dtype))
         * blocked_linear(xs, w_up, blocks, dtype))
    y = from_blocks(blocked_linear(h.astype(dtype), w_down, blocks, dtype), blocks)
    return combine_pairs(y, gates, order, k)


def chosen_pairs(x: jax.Array, gates: jax.Array, experts: jax.Array,
                 weights: tuple[LinearWeight, LinearWeight, LinearWeight], dtype) -> jax.Array:
    """Each token's k experts one by one, the expert's matrices selected by its traced index:
    for the few rows of a decode step, a matrix-vector product per pair reads just the chosen
    experts' int8 weights (no expert is computed for rows that did not choose it)."""
    N, k = experts.shape
    rows = []
    for t in range(N):
        row = x[t:t + 1]
        total = jnp.zeros((1, x.shape[-1]), jnp.float32)
        for j in range(k):
            e = experts[t, j]
            total = total + expert_ffn(row, *(w[e] for w in weights), dtype=dtype) * gates[t, j]
        rows.append(total)
    return jnp.concatenate(rows)


def chosen_experts_dense(x: jax.Array, gates: jax.Array, experts: jax.Array,
                         ffn: Callable[[jax.Array, int], jax.Array], num_experts: int) -> jax.Array:
    """Every expert that some token chose runs on all N rows (`lax.cond` skips the others), its
    output weighted by each row's gate for it (0 where the row did not choose it): for a few
    rows and weights multiplied by all rows at once (float32), reading an expert costs far more
    than the extra rows."""
    out = jnp.zeros(x.shape, jnp.float32)
    for e in range(num_experts):
        chosen = experts == e                                               # [N, k]
        gate = jnp.sum(jnp.where(chosen, gates, 0.0), axis=-1).astype(jnp.float32)
        out = out + jax.lax.cond(
            jnp.any(chosen), lambda x, g, e=e: ffn(x, e) * g[:, None],
            lambda x, g: jnp.zeros(x.shape, jnp.float32), x, gate)
    return out


def sorted_ragged(x: jax.Array, gates: jax.Array, experts: jax.Array,
                  weights: tuple[Weight | LinearWeight, Weight | LinearWeight, Weight | LinearWeight],
                  dtype, grouped_product: Callable[..., jax.Array] = grouped_matmul) -> jax.Array:
    """The N*k (token, expert) pairs sorted by expert, so each expert sees one contiguous group
    of rows, each matrix one grouped product over the whole stack: `grouped_product` for the
    official tree, `ragged_linear` for the compute layout (a decode step's few rows on an
    accelerator)."""
    N, k = experts.shape
    w_gate, w_up, w_down = weights
    product = ragged_linear if isinstance(w_gate, LinearWeight) else grouped_product
    order, group_sizes = sort_pairs_by_expert(experts, w_gate.shape[0])
    group_sizes = group_sizes.astype(jnp.int32)
    sorted_experts = experts.reshape(-1)[order]
    xs = x.astype(dtype)[order // k]                                        # [N*k, d]
    h = jax.nn.gelu(product(xs, w_gate, group_sizes, sorted_experts, dtype))
    h = h * product(xs, w_up, group_sizes, sorted_experts, dtype)
    y = product(h.astype(dtype), w_down, group_sizes, sorted_experts, dtype)
    return combine_pairs(y, gates, order, k)


def grouped_experts(x: jax.Array, gates: jax.Array, experts: jax.Array,
                    ffn: Callable[[jax.Array, int], jax.Array], num_experts: int,
                    capacity: int) -> jax.Array:
    """Sparse top-k for many rows: the (row, expert) pairs sorted by expert, then each expert e
    runs `ffn(rows, e)` on a window of `capacity` rows at the start of its group, one expert
    after another in a loop. The window is sized to hold a whole group under balanced routing,
    so normally that is all; groups longer than `capacity` continue in further rounds, so no
    token is ever dropped. Rows of a window past its group belong to the next expert and are
    masked out."""
    N, d = x.shape
    k, E = experts.shape[1], num_experts
    order, sizes = sort_pairs_by_expert(experts, E)
    starts = jnp.cumsum(sizes) - sizes
    xs = jnp.zeros((N * k + capacity, d), x.dtype).at[:N * k].set(x[order // k])

    def run(ys, e: int, offset):
        start = starts[e] + offset
        rows = jax.lax.dynamic_slice_in_dim(xs, start, capacity)
        inside = (jnp.arange(capacity) < sizes[e] - offset)[:, None]
        y = jnp.where(inside, ffn(rows, e), 0).astype(ys.dtype)
        window = jax.lax.dynamic_slice_in_dim(ys, start, capacity)
        return jax.lax.dynamic_update_slice_in_dim(ys, window + y, start, 0)

    # One expert at a time (a loop, not straight-line code): only one expert's dequantised
    # matrices are live, whatever the number of experts.
    ys = jax.lax.fori_loop(0, E, lambda e, ys: run(ys, e, 0), jnp.zeros(xs.shape, jnp.float32))

    def next_round(state):
        r, ys = state
        ys = jax.lax.fori_loop(0, E, lambda e, ys: jax.lax.cond(
            sizes[e] > r * capacity, lambda ys: run(ys, e, r * capacity), lambda ys: ys, ys), ys)
        return r + 1, ys

    _, ys = jax.lax.while_loop(lambda state: state[0] * capacity < jnp.max(sizes), next_round,
                               (jnp.int32(1), ys))
    return combine_pairs(ys[:N * k], gates, order, k)
