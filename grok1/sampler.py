"""Text generation: a KV-cache runner with continuous batching, streaming and per-request sampling.

The runner owns a fixed number of *slots*, each a row of one KV cache of `sequence_len` positions.
A request is prefilled into a free slot (its prompt right-padded to a length bucket, so prefill
compiles once per bucket); one jitted decode step then advances every slot at once, and a slot whose
request finished takes the next waiting one. The cache lives inside `SlotState`, which every jitted
call donates and returns, so it is updated in place, never copied.

Each request samples from its own random stream, key = fold_in(key(seed), index of the token), and
its sampling settings travel with its slot, so its output depends neither on the slot it got nor
on its neighbours.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import warnings
from typing import Any, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grok1.config import ModelConfig
from grok1.model import KVCache, transformed
from grok1.rows import on_mesh
from grok1.sharding import to_host
from grok1.tokenizer import IncrementalDecoder

MAX_SEED = 2 ** 32
MIN_BUCKET = 32
BUCKET_GROWTH = 4


# ---- settings ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """How one request is sampled and when it stops.

    temperature 0 is greedy argmax; top_k 0 and top_p 1 switch those filters off. Generation stops
    at EOS (`config.eos_token`), at any `stop_token_ids` or `stop_strings` (none of which appear in
    the output), after `max_new_tokens` (None: no limit), or at the end of the context. A prompt
    longer than `sequence_len - max_new_tokens` (None: sequence_len - 1) loses its oldest tokens
    with a warning, or raises when `strict`.
    """

    max_new_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    logprobs: bool = False
    strict: bool = False


SETTING_NAMES = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "logprobs", "strict")


def sampling_settings(config: ModelConfig, tokenizer: Any = None, **settings: Any) -> SamplingSettings:
    """Checked SamplingSettings from keyword settings (`stop` is token ids and/or strings);
    ValueError names the bad argument and its allowed range."""
    unknown = sorted(set(settings) - set(SETTING_NAMES))
    if unknown:
        raise TypeError(f"unknown sampling setting(s) {', '.join(unknown)}; "
                        f"allowed: {', '.join(SETTING_NAMES)}")
    defaults = SamplingSettings()
    max_new_tokens = settings.get("max_new_tokens", defaults.max_new_tokens)
    if max_new_tokens is not None and (not _is_int(max_new_tokens) or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be an integer >= 1 (or None: up to the context end), "
                         f"got {max_new_tokens!r}")
    temperature = settings.get("temperature", defaults.temperature)
    if not _is_real(temperature) or not temperature >= 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    top_p = settings.get("top_p", defaults.top_p)
    if not _is_real(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")
    top_k = settings.get("top_k", defaults.top_k)
    if not _is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = no top-k filter), got {top_k!r}")
    seed = settings.get("seed", defaults.seed)
    if not _is_int(seed) or not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    stop_ids, stop_strings = _split_stop(settings.get("stop"), config, tokenizer)
    flags = {}
    for name in ("logprobs", "strict"):
        value = settings.get(name, getattr(defaults, name))
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False, got {value!r}")
        flags[name] = bool(value)
    return SamplingSettings(max_new_tokens=None if max_new_tokens is None else int(max_new_tokens),
                            temperature=float(temperature),
                            top_p=float(top_p), top_k=int(top_k), seed=int(seed),
                            stop_token_ids=stop_ids, stop_strings=stop_strings, **flags)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, (float, np.floating))) and math.isfinite(value)


def _split_stop(stop: Any, config: ModelConfig, tokenizer: Any) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """`stop` (None, a token id, a string, or a list of both) -> (token ids, strings)."""
    if stop is None:
        return (), ()
    items = [stop] if isinstance(stop, (str, int, np.integer)) else stop
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"stop must be a token id, a string, or a list of them, got {stop!r}")
    ids, strings = [], []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise ValueError("stop strings must not be empty")
            if tokenizer is None:
                raise ValueError(f"stop string {item!r} needs a tokenizer; this model has none "
                                 f"(give stop token ids instead)")
            strings.append(item)
        elif _is_int(item):
            if not 0 <= item < config.vocab_size:
                raise ValueError(f"stop token ids must lie in [0, {config.vocab_size}), got {item}")
            ids.append(int(item))
        else:
            raise ValueError(f"stop entries must be token ids or strings, got {item!r}")
    return tuple(ids), tuple(strings)


def prompt_token_ids(prompt: Any, config: ModelConfig, tokenizer: Any,
                     settings: SamplingSettings) -> list[int]:
    """A prompt (string or token ids) as checked ids that leave room for max_new_tokens.

    A prompt longer than `sequence_len - max_new_tokens` (at least 1 token is kept; without
    max_new_tokens, sequence_len - 1) loses its oldest tokens with a warning, or raises
    ValueError when `settings.strict`.
    """
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("prompt is a string but this model has no tokenizer; pass token ids "
                             "or load the model with tokenizer=...")
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple, np.ndarray)):
        array = np.asarray(prompt)
        if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
            raise ValueError(f"a token-id prompt must be a flat list of ints, got {prompt!r:.80}")
        ids = [int(t) for t in array]
    else:
        raise ValueError(f"each prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    if not ids:
        raise ValueError("prompt must hold at least one token")
    bad = [t for t in ids if not 0 <= t < config.vocab_size]
    if bad:
        raise ValueError(f"token ids must lie in [0, {config.vocab_size}), got {bad[:5]}")
    limit = max(1, config.sequence_len - (settings.max_new_tokens or 1))
    if len(ids) > limit:
        message = (f"prompt of {len(ids)} tokens does not fit sequence_len {config.sequence_len} "
                   f"with max_new_tokens {settings.max_new_tokens}")
        if settings.strict:
            raise ValueError(f"{message}; shorten it to at most {limit} tokens or lower max_new_tokens")
        warnings.warn(f"{message}: keeping its last {limit} tokens", stacklevel=3)
        ids = ids[-limit:]
    return ids


# ---- outputs ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Completion:
    """A finished request. `text` is "" without a tokenizer; `logprobs` (log-softmax of the model's
    logits at each chosen token) is None unless asked for."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_token_ids: list[int]
    logprobs: Optional[list[float]] = None


@dataclasses.dataclass(frozen=True)
class Delta:
    """What one step added to a request: new tokens and the text they complete. The last delta
    of a request carries its `finish_reason`."""

    text: str
    token_ids: list[int]
    logprobs: Optional[list[float]] = None
    finish_reason: Optional[str] = None


# ---- the sampling function --------------------------------------------------------------------

def request_keys(seeds: jax.Array, steps: jax.Array) -> jax.Array:
    """Per-row random keys: fold_in(key(seed), index of the token in its request)."""
    return jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(seeds, steps)


def sample(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array,
           top_k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One token per row of logits [B, V] under that row's settings -> (tokens [B], logprobs [B]).

    Rows with temperature 0 take the argmax. Others sample softmax(logits / temperature) restricted
    to the top_k most likely tokens (0: all), then to the smallest set whose probability reaches
    top_p. The filters become a per-row logit threshold, and the draw is over the unsorted logits,
    so a row draws the same token whether or not another row in the batch uses a filter (the sort
    is skipped when none does). logprobs are log_softmax of the unscaled logits at the chosen token.
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
    """Sampled tokens for rows with temperature > 0, `greedy` for the others."""
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    filtered = (top_k > 0) | (top_p < 1)
    threshold = jax.lax.cond(jnp.any(filtered), _filter_threshold,
                             lambda s, p, k: jnp.full(s.shape[:1], -jnp.inf), scaled, top_p, top_k)
    threshold = jnp.where(filtered, threshold, -jnp.inf)
    drawn = jax.vmap(jax.random.categorical)(keys, jnp.where(scaled >= threshold[:, None], scaled, -jnp.inf))
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


def _filter_threshold(scaled: jax.Array, top_p: jax.Array, top_k: jax.Array) -> jax.Array:
    """The smallest scaled logit each row keeps under its top-k and top-p filters."""
    ranked = -jnp.sort(-scaled, axis=-1)                                       # [B, V] descending
    rank = jnp.arange(scaled.shape[-1])
    keep = (top_k[:, None] <= 0) | (rank[None, :] < top_k[:, None])
    probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= mass_before < top_p[:, None]                  # the top token always stays (top_p > 0)
    last = jnp.sum(keep, axis=-1) - 1
    return jnp.take_along_axis(ranked, last[:, None], axis=-1)[:, 0]


# ---- device state and the jitted steps --------------------------------------------------------

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


def empty_state(config: ModelConfig, dtype, slots: int) -> SlotState:
    zeros = lambda dt: jnp.zeros((slots,), dt)
    return SlotState(cache=KVCache.zeros(config, slots, config.sequence_len, dtype),
                     tokens=zeros(jnp.int32), steps=zeros(jnp.int32), seeds=zeros(jnp.uint32),
                     temperature=zeros(jnp.float32), top_p=jnp.ones((slots,), jnp.float32),
                     top_k=zeros(jnp.int32))


def decode_steps(apply, constrain, num_steps: int, params: dict, state: SlotState
                 ) -> tuple[SlotState, jax.Array, jax.Array]:
    """`num_steps` decode steps of every slot -> (state, tokens [num_steps, B], logprobs [...])."""
    def step(state: SlotState, _):
        logits, cache = apply(params, state.tokens[:, None], state.cache,
                              jnp.zeros_like(state.tokens))
        tokens, logprobs = sample(logits, request_keys(state.seeds, state.steps),
                                  state.temperature, state.top_p, state.top_k)
        state = dataclasses.replace(state, cache=cache, tokens=tokens, steps=state.steps + 1)
        return constrain(state), (tokens, logprobs)

    state, (tokens, logprobs) = jax.lax.scan(step, state, None, length=num_steps)
    return state, tokens, logprobs


def prefill_slot(apply, config: ModelConfig, dtype, constrain, params: dict, state: SlotState,
                 prompt: jax.Array, length: jax.Array, slot: jax.Array, seed: jax.Array,
                 temperature: jax.Array, top_p: jax.Array, top_k: jax.Array
                 ) -> tuple[SlotState, jax.Array, jax.Array]:
    """Run a right-padded prompt [1, L] through a fresh batch-1 cache of L positions, write that
    cache into row `slot` (other rows untouched), and sample the request's first token."""
    small = KVCache.zeros(config, 1, prompt.shape[1], dtype)
    logits, small = apply(params, prompt, small, (length - 1)[None])
    settings = [x[None] for x in (temperature, top_p, top_k)]
    token, logprob = sample(logits, request_keys(seed[None], jnp.zeros((1,), jnp.int32)), *settings)

    big = state.cache
    put = lambda row, new: jax.lax.dynamic_update_slice(row, new.astype(row.dtype), (slot,) + (0,) * (row.ndim - 1))
    valid_row = jnp.zeros((1, big.valid.shape[1]), bool).at[:, :prompt.shape[1]].set(small.valid)
    cache = KVCache(keys=tuple(put(b, s) for b, s in zip(big.keys, small.keys)),
                    values=tuple(put(b, s) for b, s in zip(big.values, small.values)),
                    valid=put(big.valid, valid_row), length=big.length.at[slot].set(length))
    state = SlotState(cache=cache, tokens=state.tokens.at[slot].set(token[0]),
                      steps=state.steps.at[slot].set(1), seeds=state.seeds.at[slot].set(seed),
                      temperature=state.temperature.at[slot].set(temperature),
                      top_p=state.top_p.at[slot].set(top_p), top_k=state.top_k.at[slot].set(top_k))
    return constrain(state), token[0], logprob[0]


def prefill_buckets(sequence_len: int) -> tuple[int, ...]:
    """Prompt lengths prefill compiles for: 32, 128, 512 ... and sequence_len itself (a few
    compilations; padding at most quadruples a prompt's prefill work)."""
    buckets, size = [], MIN_BUCKET
    while size < sequence_len:
        buckets.append(size)
        size *= BUCKET_GROWTH
    return tuple(buckets) + (sequence_len,)


# ---- host side: one request's progress --------------------------------------------------------

class Request:
    """Host-side progress of one request: stop checks, text decoding, the deltas it emits."""

    def __init__(self, prompt: list[int], settings: SamplingSettings, config: ModelConfig, tokenizer: Any):
        self.prompt = prompt
        self.settings = settings
        self.stop_ids = frozenset(settings.stop_token_ids) | {config.eos_token}
        # Stop at max_new_tokens or when prompt + output fill the context.
        self.max_tokens = min(settings.max_new_tokens or config.sequence_len,
                              config.sequence_len - len(prompt))
        self.decoder = IncrementalDecoder(tokenizer, prompt) if tokenizer is not None else None
        self.token_ids: list[int] = []
        self.logprobs: Optional[list[float]] = [] if settings.logprobs else None
        self.text = ""       # emitted
        self.held = ""       # decoded but held back: it may be the start of a stop string
        self.finish_reason: Optional[str] = None

    def add(self, token: int, logprob: float) -> Delta:
        """Take one sampled token; the delta it produces (the last one has a finish_reason)."""
        if token in self.stop_ids:
            return self._finish("stop", [], None)
        self.token_ids.append(token)
        logprobs = None
        if self.logprobs is not None:
            self.logprobs.append(logprob)
            logprobs = [logprob]
        if self.decoder is not None:
            self.held += self.decoder.push([token])
            hit = self._stop_string_at()
            if hit is not None:
                self.held = self.held[:hit]
                return self._finish("stop", [token], logprobs, flush=False)
        if len(self.token_ids) >= self.max_tokens:
            return self._finish("length", [token], logprobs)
        return Delta(text=self._release(self._safe_length()), token_ids=[token], logprobs=logprobs)

    def completion(self) -> Completion:
        return Completion(text=self.text, token_ids=list(self.token_ids), finish_reason=self.finish_reason,
                          prompt_token_ids=list(self.prompt),
                          logprobs=None if self.logprobs is None else list(self.logprobs))

    def _finish(self, reason: str, tokens: list[int], logprobs, flush: bool = True) -> Delta:
        self.finish_reason = reason
        if flush and self.decoder is not None:
            self.held += self.decoder.flush()
        return Delta(text=self._release(len(self.held)), token_ids=tokens, logprobs=logprobs,
                     finish_reason=reason)

    def _release(self, n: int) -> str:
        out, self.held = self.held[:n], self.held[n:]
        self.text += out
        return out

    def _stop_string_at(self) -> Optional[int]:
        hits = [i for i in (self.held.find(s) for s in self.settings.stop_strings) if i >= 0]
        return min(hits) if hits else None

    def _safe_length(self) -> int:
        """How much of `held` can be emitted: all but its longest tail that begins a stop string."""
        for start in range(max(0, len(self.held) - max(map(len, self.settings.stop_strings), default=0)),
                           len(self.held)):
            tail = self.held[start:]
            if any(s.startswith(tail) for s in self.settings.stop_strings):
                return start
        return len(self.held)


# ---- the runner -------------------------------------------------------------------------------

class Runner:
    """Continuous batching over `slots` cache rows for one model.

    `decode_chunk` tokens are decoded per jitted call (a lax.scan); the host processes the tokens
    of call k while call k+1 runs, so its bookkeeping stays off the device's critical path. The
    cache is allocated once and reused by later `run` calls (one `run` at a time); compilation
    happens once for the decode step and once per prefill bucket.
    """

    def __init__(self, model: Any, slots: int, buckets: Optional[Sequence[int]] = None,
                 decode_chunk: int = 1):
        if not _is_int(slots) or slots < 1:
            raise ValueError(f"slots must be an integer >= 1, got {slots!r}")
        if not _is_int(decode_chunk) or decode_chunk < 1:
            raise ValueError(f"decode_chunk must be an integer >= 1, got {decode_chunk!r}")
        config = model.config
        self.model = model
        self.slots = int(slots)
        self.buckets = tuple(sorted(buckets or prefill_buckets(config.sequence_len)))
        if self.buckets[-1] < config.sequence_len or self.buckets[0] < 1:
            raise ValueError(f"buckets must be positive and include sequence_len {config.sequence_len}, "
                             f"got {self.buckets}")
        apply = on_mesh(transformed(config, model.dtype).apply, model.mesh)  # grok1/rows.py
        constrain, self._state_sharding = self._sharding()
        # On a mesh the outputs keep the input shardings, so every call reuses one compilation.
        placement = {} if model.mesh is None else dict(out_shardings=(
            self._state_sharding, self._state_sharding.tokens, self._state_sharding.tokens))
        self.decode = jax.jit(functools.partial(decode_steps, apply, constrain, int(decode_chunk)),
                              donate_argnums=(1,), **placement)
        self.prefill = jax.jit(functools.partial(prefill_slot, apply, config, model.dtype, constrain),
                               donate_argnums=(1,), **placement)
        self._state: Optional[SlotState] = None

    def _sharding(self):
        """(constrain(state), state shardings): the cache split as sharding.kv_cache_sharding says,
        the per-slot vectors replicated; identity on a single device."""
        mesh = self.model.mesh
        if mesh is None:
            return (lambda state: state), None
        from jax.sharding import NamedSharding, PartitionSpec
        from grok1.sharding import kv_cache_sharding

        shape = jax.eval_shape(functools.partial(empty_state, self.model.config, self.model.dtype, self.slots))
        replicated = NamedSharding(mesh, PartitionSpec())
        sharding = dataclasses.replace(
            jax.tree_util.tree_map(lambda _: replicated, shape),
            cache=kv_cache_sharding(mesh, shape.cache))
        return (lambda state: jax.lax.with_sharding_constraint(state, sharding)), sharding

    def _fresh_state(self) -> SlotState:
        """A zero state placed (committed) where the step outputs will live, so the first call
        and all later ones share one compilation."""
        make = functools.partial(empty_state, self.model.config, self.model.dtype, self.slots)
        sharding = self._state_sharding or jax.tree_util.tree_leaves(self.model.params)[0].sharding
        return jax.jit(make, out_shardings=sharding)()

    def run(self, requests: Sequence[tuple[list[int], SamplingSettings]]
            ) -> Iterator[tuple[int, Delta, "Request"]]:
        """Generate every (prompt ids, settings) request; yield (request index, delta, progress)
        as tokens arrive, in order within each request."""
        config, tokenizer = self.model.config, self.model.tokenizer
        waiting = collections.deque(enumerate(requests))
        slot_of: list[Optional[tuple[int, Request]]] = [None] * self.slots
        in_flight = collections.deque()   # device results not yet read: (kind, slots snapshot, arrays)
        if self._state is None:
            self._state = self._fresh_state()
        while waiting or in_flight or any(s is not None for s in slot_of):
            for slot in range(self.slots):
                if slot_of[slot] is None and waiting:
                    index, (prompt, settings) = waiting.popleft()
                    request = Request(prompt, settings, config, tokenizer)
                    slot_of[slot] = (index, request)
                    self._state, token, logprob = self._prefill(slot, prompt, settings)
                    in_flight.append(("prefill", {slot: (index, request)}, (token, logprob)))
            dispatched = False
            if any(s is not None for s in slot_of):
                self._state, tokens, logprobs = self.decode(self.model.params, self._state)
                in_flight.append(("decode", {s: r for s, r in enumerate(slot_of) if r is not None},
                                  (tokens, logprobs)))
                dispatched = True
            # Read everything except the call just dispatched, which the device is still running.
            while len(in_flight) > (1 if dispatched else 0):
                kind, snapshot, arrays = in_flight.popleft()
                tokens, logprobs = (to_host(a) for a in arrays)
                if kind == "prefill":
                    tokens, logprobs = tokens.reshape(1, 1), logprobs.reshape(1, 1)
                    columns = {slot: 0 for slot in snapshot}
                else:
                    columns = {slot: slot for slot in snapshot}
                for step in range(tokens.shape[0]):
                    for slot, (index, request) in snapshot.items():
                        if request.finish_reason is not None:
                            continue
                        delta = request.add(int(tokens[step, columns[slot]]),
                                            float(logprobs[step, columns[slot]]))
                        yield index, delta, request
                        if request.finish_reason is not None and slot_of[slot] is not None \
                                and slot_of[slot][1] is request:
                            slot_of[slot] = None

    def _prefill(self, slot: int, prompt: list[int], settings: SamplingSettings):
        bucket = next(b for b in self.buckets if b >= len(prompt))
        padded = np.full((1, bucket), self.model.config.pad_token, np.int32)
        padded[0, :len(prompt)] = prompt
        return self.prefill(self.model.params, self._state, padded, np.int32(len(prompt)),
                            np.int32(slot), np.uint32(settings.seed), np.float32(settings.temperature),
                            np.float32(settings.top_p), np.int32(settings.top_k))


# ---- the Model-level API ----------------------------------------------------------------------

DEFAULT_MAX_SLOTS = 8


def runner_for(model: Any, slots: int) -> Runner:
    """The model's runner with `slots` slots, built once and cached on the model."""
    runners = model.__dict__.setdefault("_runners", {})
    if slots not in runners:
        runners[slots] = Runner(model, slots)
    return runners[slots]


def _requests(model: Any, prompts: Any, settings: dict[str, Any]) -> list[tuple[list[int], SamplingSettings]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list of prompts (strings or lists of token ids), "
                         f"got {type(prompts).__name__}; wrap a single prompt as [prompt]")
    if not prompts:
        raise ValueError("prompts must hold at least one prompt, got an empty batch")
    seed = settings.get("seed", SamplingSettings.seed)
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(prompts)
    if len(seeds) != len(prompts):
        raise ValueError(f"seed must be one integer or one per prompt ({len(prompts)}), got {len(seeds)}")
    requests = []
    for prompt, seed in zip(prompts, seeds):
        checked = sampling_settings(model.config, model.tokenizer, **{**settings, "seed": seed})
        requests.append((prompt_token_ids(prompt, model.config, model.tokenizer, checked), checked))
    return requests


def generate(model: Any, prompts: Sequence[Any], slots: Optional[int] = None,
             **settings: Any) -> list[Completion]:
    """Complete every prompt; the list of Completions is in prompt order.

    `slots` (default: the batch size rounded up to a power of two, at most 8) is the number of
    requests decoded together; more prompts than slots wait for a free slot.
    """
    requests = _requests(model, prompts, settings)
    if slots is None:
        slots = min(DEFAULT_MAX_SLOTS, 1 << (len(requests) - 1).bit_length())
    done: dict[int, Completion] = {}
    for index, delta, request in runner_for(model, slots).run(requests):
        if delta.finish_reason is not None:
            done[index] = request.completion()
    return [done[i] for i in range(len(requests))]


def stream(model: Any, prompt: Any, slots: int = 1, **settings: Any) -> Iterator[Delta]:
    """Complete one prompt, yielding Deltas (text and token ids) as they are sampled; the
    concatenated delta texts equal the Completion's text. Settings are checked on the call."""
    requests = _requests(model, [prompt], settings)
    return (delta for _, delta, _ in runner_for(model, slots).run(requests))
