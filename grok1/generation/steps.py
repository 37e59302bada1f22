"""The device side of generation: the state of every slot (a row of one KV cache, the request's
last token, random stream, settings and token counts) and the jitted steps over it. The state is
donated to each step and returned, so the cache is updated in place, never copied."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from grok1.config import ModelConfig
from grok1.generation.sampling import penalize, request_keys, sample
from grok1.mesh import spread_rows
from grok1.model import KVCache

MIN_BUCKET = 32
BUCKET_GROWTH = 4


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotState:
    """Everything the decode step needs, one row per slot."""

    cache: KVCache
    tokens: jax.Array        # [B] int32: the last sampled token, input of the next step
    steps: jax.Array         # [B] int32: tokens the slot's request has sampled (its random-stream index)
    seeds: jax.Array         # [B] uint32
    temperature: jax.Array   # [B] float32
    top_p: jax.Array         # [B] float32
    top_k: jax.Array         # [B] int32
    frequency_penalty: jax.Array  # [B] float32
    presence_penalty: jax.Array   # [B] float32
    counts: jax.Array        # [B, V] int32: how often the slot's request generated each token


def empty_state(config: ModelConfig, dtype, slots: int) -> SlotState:
    zeros = lambda dt: jnp.zeros((slots,), dt)
    return SlotState(cache=KVCache.zeros(config, slots, config.sequence_len, dtype),
                     tokens=zeros(jnp.int32), steps=zeros(jnp.int32), seeds=zeros(jnp.uint32),
                     temperature=zeros(jnp.float32), top_p=jnp.ones((slots,), jnp.float32),
                     top_k=zeros(jnp.int32), frequency_penalty=zeros(jnp.float32),
                     presence_penalty=zeros(jnp.float32),
                     counts=jnp.zeros((slots, config.vocab_size), jnp.int32))


def decode_steps(apply, constrain, num_steps: int, params: dict, state: SlotState
                 ) -> tuple[SlotState, jax.Array, jax.Array]:
    """`num_steps` decode steps of every slot -> (state, tokens [num_steps, B], logprobs [...])."""
    def step(state: SlotState, _):
        logits, cache = apply(params, state.tokens[:, None], state.cache,
                              jnp.zeros_like(state.tokens))
        logits = penalize(spread_rows(logits), state.counts, state.frequency_penalty,
                          state.presence_penalty)
        tokens, logprobs = sample(logits, request_keys(state.seeds, state.steps),
                                  state.temperature, state.top_p, state.top_k)
        counts = state.counts.at[jnp.arange(tokens.shape[0]), tokens].add(1)
        state = dataclasses.replace(state, cache=cache, tokens=tokens, steps=state.steps + 1,
                                    counts=counts)
        return constrain(state), (tokens, logprobs)

    state, (tokens, logprobs) = jax.lax.scan(step, state, None, length=num_steps)
    return state, tokens, logprobs


def slot_started(state: SlotState, cache: KVCache, slot: jax.Array, first_token: jax.Array,
                 seed: jax.Array, temperature: jax.Array, top_p: jax.Array, top_k: jax.Array,
                 frequency_penalty: jax.Array, presence_penalty: jax.Array) -> SlotState:
    """`state` with `cache` and row `slot` set to a request that has just sampled `first_token`
    from its prompt: its settings, step 1, and that token alone in its counts."""
    return SlotState(cache=cache, tokens=state.tokens.at[slot].set(first_token),
                     steps=state.steps.at[slot].set(1), seeds=state.seeds.at[slot].set(seed),
                     temperature=state.temperature.at[slot].set(temperature),
                     top_p=state.top_p.at[slot].set(top_p), top_k=state.top_k.at[slot].set(top_k),
                     frequency_penalty=state.frequency_penalty.at[slot].set(frequency_penalty),
                     presence_penalty=state.presence_penalty.at[slot].set(presence_penalty),
                     counts=state.counts.at[slot].set(0).at[slot, first_token].add(1))


def prefill_slot(apply, config: ModelConfig, dtype, constrain, params: dict, state: SlotState,
                 prompt: jax.Array, length: jax.Array, slot: jax.Array) -> tuple[SlotState, jax.Array]:
    """Run a right-padded prompt [1, L] through a fresh batch-1 cache of L positions and write
    that cache into row `slot` (other rows untouched): (state, the last position's logits [1, V]),
    for `start_slot` to sample the request's first token from."""
    small = KVCache.zeros(config, 1, prompt.shape[1], dtype)
    logits, small = apply(params, prompt, small, (length - 1)[None])
    big = state.cache
    put = lambda rows, new, axis: jax.lax.dynamic_update_slice_in_dim(rows, new.astype(rows.dtype), slot, axis)
    valid_row = jnp.zeros((1, big.valid.shape[1]), bool).at[:, :prompt.shape[1]].set(small.valid)
    # keys and values are [L, B, S, N, K]: rows on axis 1, the prompt's positions from 0
    cache = KVCache(keys=put(big.keys, small.keys, 1), values=put(big.values, small.values, 1),
                    valid=put(big.valid, valid_row, 0), length=big.length.at[slot].set(length))
    return constrain(dataclasses.replace(state, cache=cache)), logits


def prefill_chunk(apply, constrain, params: dict, state: SlotState, chunk: jax.Array,
                  start: jax.Array, length: jax.Array, slot: jax.Array) -> tuple[SlotState, jax.Array]:
    """Prefill positions [start, start + C) of a `length`-token prompt into row `slot`, on top of
    the positions before `start` that earlier chunks wrote (chunk [1, C], right-padded past the
    prompt's end; start + C must not pass the cache's end): (state, the logits [1, V] at the
    prompt's last position within the chunk). Long prompts go in such chunks across engine
    steps, so that a newcomer holds up the decoding requests by one chunk at a time.

    The row's positions from `start` on are cleared first: whatever a previous request or a
    decode step of the other slots left there is not seen. Only the final chunk's logits
    (start + C >= length) are the prompt's; the slot's decode results are ignored until then.
    """
    big = state.cache
    width = chunk.shape[1]
    # keys and values are [L, B, S, N, K] (rows on axis 1), valid [B, S]
    take = lambda rows, axis: jax.lax.dynamic_slice_in_dim(rows, slot, 1, axis)
    put = lambda rows, row, axis: jax.lax.dynamic_update_slice_in_dim(rows, row.astype(rows.dtype), slot, axis)
    before_start = jnp.arange(big.valid.shape[1]) < start
    row = KVCache(keys=take(big.keys, 1), values=take(big.values, 1),
                  valid=take(big.valid, 0) & before_start[None, :], length=start[None])
    last = jnp.clip(length - 1 - start, 0, width - 1)
    logits, row = apply(params, chunk, row, last[None])
    cache = KVCache(keys=put(big.keys, row.keys, 1), values=put(big.values, row.values, 1),
                    valid=put(big.valid, row.valid, 0),
                    length=big.length.at[slot].set(jnp.minimum(start + width, length)))
    return constrain(dataclasses.replace(state, cache=cache)), logits


def start_slot(constrain, state: SlotState, logits: jax.Array, slot: jax.Array, seed: jax.Array,
               temperature: jax.Array, top_p: jax.Array, top_k: jax.Array,
               frequency_penalty: jax.Array, presence_penalty: jax.Array
               ) -> tuple[SlotState, jax.Array, jax.Array]:
    """Sample a request's first token from its prompt's last logits [1, V] and set row `slot` to
    the request (`slot_started`): (state, token, logprob). A program of its own, shared by every
    prompt length: the sampler compiles once, not once per prefill bucket."""
    settings = [x[None] for x in (temperature, top_p, top_k)]
    token, logprob = sample(logits, request_keys(seed[None], jnp.zeros((1,), jnp.int32)), *settings)
    state = slot_started(state, state.cache, slot, token[0], seed, temperature, top_p, top_k,
                         frequency_penalty, presence_penalty)
    return constrain(state), token[0], logprob[0]


def prefill_buckets(sequence_len: int) -> tuple[int, ...]:
    """Prompt lengths prefill compiles for: 32, 128, 512 ... and sequence_len itself (a few
    compilations; padding at most quadruples a prompt's prefill work)."""
    buckets, size = [], MIN_BUCKET
    while size < sequence_len:
        buckets.append(size)
        size *= BUCKET_GROWTH
    return tuple(buckets) + (sequence_len,)


# ---- scoring: the log-probabilities of given tokens, prefill only ---------------------------------

SCORE_TOKEN_CHUNK = 128   # positions (of all rows) whose logits are live at once while scoring


def score_rows(apply, top_n: int, params: dict, tokens: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Log-probabilities of right-padded prompts [B, L] (no cache, nothing kept): (logprobs [B, L],
    top_ids [B, L, top_n], top_logprobs [B, L, top_n]), where position t scores token t + 1
    given tokens 0..t (the last column scores nothing) and holds the `top_n` likeliest tokens
    there. Log-softmax and gather run beside the output projection, SCORE_TOKEN_CHUNK positions
    at a time, so only that many rows of logits ever exist."""
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    head = lambda h, unembed: logprobs_of(h, unembed, targets, top_n)
    scores, _ = apply(params, tokens, None, None, head=head)
    return scores


def logprobs_of(h: jax.Array, unembed, targets: jax.Array, top_n: int
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`score_rows`'s outputs from the final hidden states h [B, T, d] and `unembed` (h -> logits)."""
    B, T, _ = h.shape
    positions = min(T, max(1, SCORE_TOKEN_CHUNK // B))
    count = -(-T // positions)

    def blocks(x: jax.Array) -> jax.Array:  # [B, T, ...] -> [count, B, positions, ...], zero-padded
        x = jnp.pad(x, [(0, count * positions - T if i == 1 else 0) for i in range(x.ndim)])
        return jnp.moveaxis(x.reshape((B, count, positions) + x.shape[2:]), 1, 0)

    def one_block(parts):
        h, targets = parts
        logits = unembed(h)                                             # [B, positions, V] float32
        norm = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        chosen = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - norm[..., 0]
        top_logits, top_ids = jax.lax.top_k(logits, top_n)
        return chosen, top_ids.astype(jnp.int32), top_logits - norm

    out = jax.lax.map(one_block, (blocks(h), blocks(targets)))
    return tuple(jnp.moveaxis(x, 0, 1).reshape((B, count * positions) + x.shape[3:])[:, :T] for x in out)
