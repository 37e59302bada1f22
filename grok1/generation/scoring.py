"""Scoring on the host: a prompt's tokens checked for scoring, a scoring request's progress in the
engine, the batches scoring requests run in, and the `Score` each gets back.

A scoring request only prefills: its tokens go through the model once, without a KV cache or a
slot, and the step returns the log-probability of each token given the ones before it (and the
likeliest alternatives), computed on the device beside the output projection
(`steps.score_rows`). Several requests run as one batch, padded to a prefill bucket in length and
to a power of two in rows, so a few programs serve every batch.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from grok1.config import ModelConfig
from grok1.generation.settings import is_int, prompt_ids

# Top alternatives the step computes: a request's top_n rounded up to one of these (then cut),
# so that asking for 1, 2 ... 5 shares one program. Larger values are computed as asked.
TOP_N_STEPS = (0, 5, 20)
MAX_SCORE_ROWS = 8           # prompts scored together in one call, at most
MIN_SCORE_BUDGET = 2048      # tokens (padded) one scoring call takes when nothing decodes


@dataclasses.dataclass(frozen=True)
class Score:
    """The log-probabilities of a prompt's tokens, each given the tokens before it.

    `logprobs[i]` is log p(token_ids[i + 1] | token_ids[:i + 1]) (the first token has no
    context, so there are len(token_ids) - 1 of them); `top_ids[i]` and `top_logprobs[i]` are
    the `top_n` likeliest tokens at that position and theirs, likeliest first ([T - 1, top_n])."""

    token_ids: np.ndarray      # [T] int32
    logprobs: np.ndarray       # [T - 1] float32
    top_ids: np.ndarray        # [T - 1, top_n] int32
    top_logprobs: np.ndarray   # [T - 1, top_n] float32

    @property
    def total(self) -> float:
        """The log-probability of the whole prompt after its first token (float64 sum)."""
        return float(np.sum(self.logprobs, dtype=np.float64))


def scored_prompt_ids(prompt: Any, config: ModelConfig, tokenizer: Any) -> list[int]:
    """A prompt to score as checked token ids: text (with BOS first when `config.add_bos`) or
    token ids, 1 to sequence_len of them, each in the vocabulary; ValueError otherwise."""
    ids = prompt_ids(prompt, config, tokenizer)
    if len(ids) > config.sequence_len:
        raise ValueError(f"a prompt of {len(ids)} tokens does not fit the model's context of "
                         f"{config.sequence_len}; shorten it, or score a long text in windows "
                         f"(run.py --perplexity)")
    return ids


def check_top_n(top_n: Any, vocab_size: int) -> int:
    if not is_int(top_n) or not 0 <= top_n <= vocab_size:
        raise ValueError(f"top_n must be an integer in [0, {vocab_size}], got {top_n!r}")
    return int(top_n)


def top_n_step(top_n: int) -> int:
    """The number of alternatives the step computes for a request asking `top_n`."""
    return next((step for step in TOP_N_STEPS if step >= top_n), top_n)


@dataclasses.dataclass(eq=False)
class ScoreJob:
    """One submitted scoring request. `deliver` runs on the engine thread with its Score, or an
    EngineError if it cannot be scored; it must not block."""

    prompt: list[int]
    top_n: int
    deliver: Callable[[Any], None]
    id: int = 0
    cancelled: bool = False
    done: bool = False


def next_batch(waiting: "collections.deque[ScoreJob]", budget: int, buckets: Sequence[int]
               ) -> list[ScoreJob]:
    """Take the waiting jobs that run together next: in order, those computing the same number
    of alternatives as the first, at most MAX_SCORE_ROWS, while the padded batch (rows rounded
    up to a power of two, times the bucket of the longest) stays within `budget` tokens; the
    first job always goes. Cancelled jobs at the front are dropped (marked done)."""
    batch: list[ScoreJob] = []
    while waiting:
        job = waiting[0]
        if job.cancelled:
            waiting.popleft().done = True
            continue
        if batch:
            if top_n_step(job.top_n) != top_n_step(batch[0].top_n) or len(batch) == MAX_SCORE_ROWS:
                break
            rows = padded_rows(len(batch) + 1)
            longest = max(len(job.prompt), *(len(j.prompt) for j in batch))
            if rows * bucket_of(longest, buckets) > budget:
                break
        batch.append(waiting.popleft())
    return batch


def padded_rows(rows: int) -> int:
    return 1 << (rows - 1).bit_length()


def bucket_of(length: int, buckets: Sequence[int]) -> int:
    return next(b for b in buckets if b >= length)


def batch_tokens(prompts: Sequence[Sequence[int]], buckets: Sequence[int], pad_token: int) -> np.ndarray:
    """The prompts right-padded into one [rows, bucket] int32 array (rows a power of two; the
    extra rows are all padding)."""
    tokens = np.full((padded_rows(len(prompts)), bucket_of(max(map(len, prompts)), buckets)),
                     pad_token, np.int32)
    for row, ids in enumerate(prompts):
        tokens[row, :len(ids)] = ids
    return tokens


def scores_of(prompts: Sequence[Sequence[int]], top_ns: Sequence[int], logprobs: np.ndarray,
              top_ids: np.ndarray, top_logprobs: np.ndarray) -> list[Score]:
    """Each prompt's Score from the step's outputs for the batch (`score_rows`)."""
    out = []
    for row, (ids, top_n) in enumerate(zip(prompts, top_ns)):
        scored = len(ids) - 1
        out.append(Score(token_ids=np.asarray(ids, np.int32),
                         logprobs=np.asarray(logprobs[row, :scored], np.float32),
                         top_ids=np.asarray(top_ids[row, :scored, :top_n], np.int32),
                         top_logprobs=np.asarray(top_logprobs[row, :scored, :top_n], np.float32)))
    return out
