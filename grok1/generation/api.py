"""`Model.generate`, `Model.stream` and `Model.score`: prompts checked and fitted, then submitted to
the model's engine (grok1/generation/engine.py), which decodes them together with continuous
batching and scores prompts (prefill only) beside them."""

from __future__ import annotations

import dataclasses
import queue
from typing import Any, Iterator, Optional, Sequence

from grok1.generation.engine import engine_for
from grok1.generation.requests import Completion, Delta
from grok1.generation.scoring import Score, check_top_n, scored_prompt_ids
from grok1.generation.settings import (FittedPrompt, SamplingSettings, draw_fresh_seeds, fit_prompt,
                                      sampling_settings)

DEFAULT_MAX_SLOTS = 8


def _check_batch(prompts: Any) -> None:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list of prompts (strings or lists of token ids), "
                         f"got {type(prompts).__name__}; wrap a single prompt as [prompt]")
    if not prompts:
        raise ValueError("prompts must hold at least one prompt, got an empty batch")


def _requests(model: Any, prompts: Any, settings: dict[str, Any]
              ) -> list[tuple[FittedPrompt, SamplingSettings]]:
    """Checked, fitted requests; `settings` become per-request SamplingSettings with a seed each."""
    _check_batch(prompts)
    seed = settings.get("seed", SamplingSettings.seed)
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(prompts)
    if len(seeds) != len(prompts):
        raise ValueError(f"seed must be one integer or one per prompt ({len(prompts)}), got {len(seeds)}")
    checked = [sampling_settings(model.config, model.tokenizer, **{**settings, "seed": s}) for s in seeds]
    fresh = iter(draw_fresh_seeds(sum(c.seed is None for c in checked)))
    requests = []
    for prompt, request_settings in zip(prompts, checked):
        if request_settings.seed is None:
            request_settings = dataclasses.replace(request_settings, seed=next(fresh))
        fitted = fit_prompt(prompt, model.config, model.tokenizer, request_settings)
        requests.append((fitted, request_settings))
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
    runs = [(fitted.token_ids, request_settings) for fitted, request_settings in requests]
    for index, delta, request in engine_for(model, slots).run(runs):
        if delta.finish_reason is not None:
            fitted = requests[index][0]
            done[index] = dataclasses.replace(
                request.completion(), dropped_prompt_tokens=fitted.dropped_prompt_tokens,
                max_new_tokens_lowered_from=fitted.max_new_tokens_lowered_from)
    return [done[i] for i in range(len(requests))]


def stream(model: Any, prompt: Any, slots: int = 1, **settings: Any) -> Iterator[Delta]:
    """Complete one prompt, yielding Deltas (text and token ids) as they are sampled; the
    concatenated delta texts equal the Completion's text. Settings are checked on the call."""
    [(fitted, request_settings)] = _requests(model, [prompt], settings)
    deltas = engine_for(model, slots).run([(fitted.token_ids, request_settings)])

    def with_fit_on_the_first() -> Iterator[Delta]:
        for i, (_, delta, _) in enumerate(deltas):
            yield delta if i else dataclasses.replace(
                delta, dropped_prompt_tokens=fitted.dropped_prompt_tokens,
                max_new_tokens_lowered_from=fitted.max_new_tokens_lowered_from)
    return with_fit_on_the_first()


def score(model: Any, prompts: Sequence[Any], top_n: int = 0) -> list[Score]:
    """The Score of every prompt (grok1/generation/scoring.py), in prompt order: each token's
    log-probability given the ones before it, and the `top_n` likeliest tokens at each position.
    Prompts are text (BOS first when `config.add_bos`) or token ids, each 1 to sequence_len
    tokens, any number of any lengths; they run through the model's engine in batches."""
    _check_batch(prompts)
    top_n = check_top_n(top_n, model.config.vocab_size)
    ids = [scored_prompt_ids(prompt, model.config, model.tokenizer) for prompt in prompts]
    engines = model.__dict__.get("_engines") or {}
    engine = next((e for e in engines.values() if not e.closing), None) or engine_for(model, 1)
    results: queue.SimpleQueue = queue.SimpleQueue()
    jobs = engine.submit_scores([(p, top_n, lambda item, i=i: results.put((i, item)))
                                 for i, p in enumerate(ids)], bounded=False)
    scores: dict[int, Score] = {}
    try:
        while len(scores) < len(jobs):
            index, item = results.get()
            if isinstance(item, Exception):
                raise item
            scores[index] = item
    finally:
        for job in jobs:
            if not job.done:
                engine.cancel(job)
    return [scores[i] for i in range(len(jobs))]
