"""A KV-cache runner with continuous batching: a fixed number of *slots*, each a row of one KV
cache of `sequence_len` positions, and the jitted steps over them.

A request is prefilled into a free slot (its prompt right-padded to a length bucket, so prefill
compiles once per bucket); one jitted decode step then advances every slot at once, and a slot
whose request finished takes the next waiting one (grok1/generation/engine.py schedules).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

from grok1.generation.settings import is_int
from grok1.generation.steps import (SlotState, decode_steps, empty_state, prefill_buckets, prefill_chunk,
                                    prefill_slot, score_rows, start_slot)
from grok1.mesh import activation_sharding, from_host, on_mesh, penalty_counts_sharding
from grok1.model import transformed
from grok1.runtime.compiling import jit


class Runner:
    """Continuous batching over `slots` cache rows for one model.

    The jitted steps over one cache of `slots` rows: `decode` (`decode_chunk` tokens per call, a
    lax.scan), `prefill` (one prompt into one slot, padded to a bucket) and `prefill_chunk`, each
    prompt followed by its first token's sampling. Compilation happens once for the decode step,
    once per prefill bucket and once for the first token. The scheduling is
    grok1/generation/engine.py's; `_state` holds the cache between the calls of the engine that owns it.
    `score` runs prompts through the model for their tokens' log-probabilities alone (no cache).
    """

    def __init__(self, model: Any, slots: int, buckets: Optional[Sequence[int]] = None,
                 decode_chunk: int = 1):
        if not is_int(slots) or slots < 1:
            raise ValueError(f"slots must be an integer >= 1, got {slots!r}")
        if not is_int(decode_chunk) or decode_chunk < 1:
            raise ValueError(f"decode_chunk must be an integer >= 1, got {decode_chunk!r}")
        config = model.config
        self.model = model
        self.slots = int(slots)
        self.buckets = tuple(sorted(buckets or prefill_buckets(config.sequence_len)))
        if self.buckets[-1] < config.sequence_len or self.buckets[0] < 1:
            raise ValueError(f"buckets must be positive and include sequence_len {config.sequence_len}, "
                             f"got {self.buckets}")
        apply = on_mesh(transformed(config, model.dtype).apply, model.mesh)  # grok1/mesh.py
        constrain, self._state_sharding = self._sharding()
        # On a mesh the outputs keep the input shardings, so every call reuses one compilation.
        placement = {} if model.mesh is None else dict(out_shardings=(
            self._state_sharding, self._state_sharding.tokens, self._state_sharding.tokens))
        self.decode = jit(on_mesh(functools.partial(decode_steps, apply, constrain, int(decode_chunk)),
                                  model.mesh),
                          donate_argnums=(1,), **placement)
        # A prompt's step gives its last logits replicated, one layout whatever the bucket.
        prompt_placement = {} if model.mesh is None else dict(out_shardings=(
            self._state_sharding, NamedSharding(model.mesh, PartitionSpec())))
        self._prefill_slot = jit(functools.partial(prefill_slot, apply, config, model.dtype, constrain),
                                 donate_argnums=(1,), **prompt_placement)
        self._prefill_chunk = jit(functools.partial(prefill_chunk, apply, constrain),
                                  donate_argnums=(1,), **prompt_placement)
        self._start_slot = jit(functools.partial(start_slot, constrain), donate_argnums=(0,), **placement)
        # Scores come out replicated: every process reads them without communication.
        self._score = jit(functools.partial(score_rows, apply), static_argnums=(0,), **(
            {} if model.mesh is None else dict(out_shardings=NamedSharding(model.mesh, PartitionSpec()))))
        self._state: Optional[SlotState] = None

    def prefill(self, params: dict, state: SlotState, prompt: Any, length: Any, slot: Any, seed: Any,
                temperature: Any, top_p: Any, top_k: Any, frequency_penalty: Any, presence_penalty: Any
                ) -> tuple[SlotState, jax.Array, jax.Array]:
        """A right-padded prompt [1, bucket] into row `slot`, and its first token sampled under the
        request's settings: (state, token, logprob). `state` is donated."""
        state, logits = self._prefill_slot(params, state, prompt, length, slot)
        return self._start_slot(state, logits, slot, seed, temperature, top_p, top_k,
                                frequency_penalty, presence_penalty)

    def prefill_chunk(self, params: dict, state: SlotState, chunk: Any, start: Any, length: Any,
                      slot: Any, seed: Any, temperature: Any, top_p: Any, top_k: Any,
                      frequency_penalty: Any, presence_penalty: Any) -> tuple[SlotState, jax.Array, jax.Array]:
        """`steps.prefill_chunk` into row `slot`, then the slot set to the request as `prefill`
        sets it (every chunk sets it; the final chunk's token is the request's first):
        (state, token, logprob). `state` is donated."""
        state, logits = self._prefill_chunk(params, state, chunk, start, length, slot)
        return self._start_slot(state, logits, slot, seed, temperature, top_p, top_k,
                                frequency_penalty, presence_penalty)

    def score(self, params: dict, tokens: Any, top_n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`steps.score_rows` of right-padded prompts [B, L] (numpy; every process passes the same):
        (logprobs [B, L], top_ids and top_logprobs [B, L, top_n]). No slot or cache is touched."""
        if self.model.mesh is not None:
            tokens = from_host(tokens, activation_sharding(self.model.mesh, "tokens", tokens.shape))
        return self._score(int(top_n), params, tokens)

    def _sharding(self):
        """(constrain(state), state shardings): the cache split as `KVCache.sharding` says,
        the token counts as the logits they penalise, the per-slot vectors replicated; identity
        on a single device."""
        mesh = self.model.mesh
        if mesh is None:
            return (lambda state: state), None
        shape = jax.eval_shape(functools.partial(empty_state, self.model.config, self.model.dtype, self.slots))
        replicated = NamedSharding(mesh, PartitionSpec())
        sharding = dataclasses.replace(
            jax.tree_util.tree_map(lambda _: replicated, shape),
            cache=shape.cache.sharding(mesh), counts=penalty_counts_sharding(mesh, shape.counts.shape))
        return (lambda state: jax.lax.with_sharding_constraint(state, sharding)), sharding

    def _fresh_state(self) -> SlotState:
        """A zero state placed (committed) where the step outputs will live, so the first call
        and all later ones share one compilation."""
        make = functools.partial(empty_state, self.model.config, self.model.dtype, self.slots)
        sharding = self._state_sharding or jax.tree_util.tree_leaves(self.model.params)[0].sharding
        return jax.jit(make, out_shardings=sharding)()


def runner_for(model: Any, slots: int) -> Runner:
    """The model's runner with `slots` slots, built once and cached on the model."""
    runners = model.__dict__.setdefault("_runners", {})
    if slots not in runners:
        runners[slots] = Runner(model, slots)
    return runners[slots]
