"""Sampling one token per row on the device: penalties, temperature, top-k and top-p per row,
each row from its own random stream, key = fold_in(key(seed), index of the token), so a request's
tokens depend on its prompt, settings and seed only, never on its neighbours."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from grok1.mesh import each_row_whole

# A filtered row draws among its 256 most likely tokens when its filters keep no others (run.py's
# top-k 40 always does), else among its 4096 most likely: partial sorts of the logits [B, V].
# The whole vocabulary, the last tier for wider nuclei, costs a full sort: 35 ms per row of
# 131072 tokens on CPU, more than bench-1b's whole decode step (20 ms).
FILTER_CANDIDATES = (256, 4096)
DRAW_BLOCK = 4096     # entries per block of the inverse-CDF draw: 131072 are 32 blocks, a tier one


def request_keys(seeds: jax.Array, steps: jax.Array) -> jax.Array:
    """Per-row random keys: fold_in(key(seed), index of the token in its request)."""
    return jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(seeds, steps)


def penalize(logits: jax.Array, counts: jax.Array, frequency_penalty: jax.Array,
             presence_penalty: jax.Array) -> jax.Array:
    """logits [B, V] less each row's penalties for the tokens its request generated so far
    (counts [B, V]), as the OpenAI API defines them:
    logit - count * frequency_penalty - (count > 0) * presence_penalty."""
    counts = counts.astype(jnp.float32)
    return (logits.astype(jnp.float32) - counts * frequency_penalty[:, None]
            - (counts > 0) * presence_penalty[:, None])


def sample(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array,
           top_k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One token per row of logits [B, V] under that row's settings -> (tokens [B], logprobs [B]).

    Rows with temperature 0 take the argmax. Others sample softmax(logits / temperature) restricted
    to the top_k most likely tokens (0: all), then to the smallest set whose probability reaches
    top_p. The filters become a per-row logit threshold; the row draws among its most likely
    tokens when the threshold keeps no others, else over the whole vocabulary, as the row alone
    decides, so it draws the same token whether or not another row in the batch uses a filter
    (see `_draw`). logprobs are log_softmax of the unscaled logits at the chosen token.
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # The draw (one random variate per vocabulary entry and row) costs as much as a small
    # model's decode step on CPU: skip it when every row is greedy.
    tokens = jax.lax.cond(jnp.any(temperature > 0), _draw, lambda *args: args[-1],
                          logits, keys, temperature, top_p, top_k, greedy)
    logprobs = (jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
                - jax.nn.logsumexp(logits, axis=-1))
    return tokens, logprobs


def _draw(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array,
          top_k: jax.Array, greedy: jax.Array) -> jax.Array:
    """Sampled tokens for rows with temperature > 0, `greedy` for the others.

    A filtered row draws among its most likely tokens, FILTER_CANDIDATES of them (a partial
    sort), in the first tier that holds every token its filters keep, the whole vocabulary (a
    full sort) last; an unfiltered row draws over the vocabulary unsorted. Which way a row goes
    depends on its own logits and settings only, and every way draws from the same distribution."""
    scaled = each_row_whole(logits / jnp.where(temperature > 0, temperature, 1.0)[:, None])
    filtered = (temperature > 0) & ((top_k > 0) | (top_p < 1))
    uniform = jax.vmap(lambda key: jax.random.uniform(key, ()))(keys)    # one variate per row
    vocabulary = scaled.shape[-1]
    tokens, pending = greedy, filtered                      # pending: filtered, not drawn yet
    for count in sorted({min(count, vocabulary) for count in FILTER_CANDIDATES} | {vocabulary}):
        drawn, fits = jax.lax.cond(jnp.any(pending), functools.partial(_draw_among_candidates, count),
                                   lambda *args: (greedy, jnp.zeros_like(pending)),
                                   scaled, uniform, top_p, top_k)
        tokens = jnp.where(pending & fits, drawn, tokens)
        pending &= ~fits
    unfiltered = (temperature > 0) & ~filtered
    drawn = jax.lax.cond(jnp.any(unfiltered), lambda s, u: _draw_from(u, s), lambda *args: greedy,
                         scaled, uniform)
    return jnp.where(unfiltered, drawn, tokens).astype(jnp.int32)


def _draw_among_candidates(count: int, scaled: jax.Array, uniform: jax.Array, top_p: jax.Array,
                           top_k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(tokens [B], fits [B]): each row's draw under its filters among its `count` most likely
    tokens, and whether everything its filters keep is among them (only then is the draw the
    row's: a top-k beyond them, a nucleus reaching past them or a tie at the last of them send
    the row on; with `count` the whole vocabulary it always fits)."""
    values, indices = jax.lax.top_k(scaled, count)                      # [B, count] descending
    rank = jnp.arange(count)
    by_k = jnp.where((top_k > 0)[:, None], rank[None, :] < top_k[:, None], True)
    ranked = jnp.where(by_k, values, -jnp.inf)
    # top-p's probabilities: among the top-k when it is on, else over the whole vocabulary
    total = jnp.where(top_k > 0, jax.nn.logsumexp(ranked, axis=-1), jax.nn.logsumexp(scaled, axis=-1))
    probs = jnp.exp(ranked - total[:, None])
    keep = by_k & (jnp.cumsum(probs, axis=-1) - probs < top_p[:, None])
    threshold = jnp.take_along_axis(values, (jnp.sum(keep, axis=-1) - 1)[:, None], axis=-1)[:, 0]
    # the last candidate as a reduction, not a slice: XLA folds a slice of top_k's values into
    # the top-k's own slice and then sorts the whole vocabulary
    fits = ((top_k <= count) & (threshold > jnp.min(values, axis=-1))) | (count == scaled.shape[-1])
    choice = _draw_from(uniform, jnp.where(values >= threshold[:, None], values, -jnp.inf))
    return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0].astype(jnp.int32), fits


def _draw_from(uniform: jax.Array, logits: jax.Array) -> jax.Array:
    """One index per row of logits [B, n] (-inf: never drawn), with probability softmax(logits):
    the cumulative distribution inverted at the row's `uniform` variate in [0, 1), over blocks of
    DRAW_BLOCK entries first when n is larger, then inside the chosen block.
    (jax.random.categorical draws a Gumbel variate per entry: 5.7 ms per row of 131072 on CPU
    against 0.4 for this.)"""
    rows, n = logits.shape
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))     # the largest is 1
    if n <= DRAW_BLOCK:
        return _first_past(weights, uniform * jnp.sum(weights, axis=-1))
    padded = -(-n // DRAW_BLOCK) * DRAW_BLOCK
    weights = jnp.pad(weights, ((0, 0), (0, padded - n))).reshape(rows, padded // DRAW_BLOCK, DRAW_BLOCK)
    block_weights = jnp.sum(weights, axis=-1)                                # [B, blocks]
    target = uniform * jnp.sum(block_weights, axis=-1)
    chosen = _first_past(block_weights, target)
    before = jnp.sum(jnp.where(jnp.arange(padded // DRAW_BLOCK) < chosen[:, None], block_weights, 0.0), axis=-1)
    inside = jnp.take_along_axis(weights, chosen[:, None, None], axis=1)[:, 0]    # [B, DRAW_BLOCK]
    return chosen * DRAW_BLOCK + _first_past(inside, target - before)


def _first_past(weights: jax.Array, target: jax.Array) -> jax.Array:
    """Per row of weights [B, n] (>= 0, some > 0), the first entry whose running sum passes
    `target`, kept to the weighted entries (sums rounded in another order can put the target a
    hair outside the row's own total)."""
    passed = jnp.sum(jnp.cumsum(weights, axis=-1) <= target[:, None], axis=-1)
    weighted = weights > 0
    first = jnp.argmax(weighted, axis=-1)
    last = weights.shape[-1] - 1 - jnp.argmax(weighted[:, ::-1], axis=-1)
    return jnp.clip(passed, first, last).astype(jnp.int32)
