"""Perplexity and bits per byte of a text, scored in windows of the context (`Model.score`).

Two ways to cut a text longer than the context into windows:

- "llama.cpp" (the default): as llama.cpp's `llama-perplexity` does, so the two figures compare
  one to one. The text's tokens (BOS first when the config says so) are cut into whole,
  non-overlapping windows of `context` tokens (a remainder shorter than a window is left out; at
  least two windows are needed); each window's first token is replaced by BOS (when the config
  adds BOS), and only the tokens of its second half are scored (positions context/2 + 1 to
  context - 1), so every scored token has at least context/2 tokens before it.
- "stride": a sliding window of `context` tokens moved `stride` tokens at a time; each window
  scores the tokens no earlier window scored, so every token but the first is scored once, with
  at least context - stride tokens before it (all before it, at the start).

Bits per byte divide the negative log-likelihood (in bits) by the UTF-8 bytes of the scored
tokens (their SentencePiece pieces, "▁" counted as a space, a byte piece as one byte).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Optional

import numpy as np

WINDOWS_PER_CALL = 8


@dataclasses.dataclass(frozen=True)
class Window:
    """Token ids to run, and the positions [start, end) of them whose log-probabilities count."""

    tokens: list[int]
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    bits_per_byte: float
    negative_log_likelihood: float    # mean, nats per scored token
    scored_tokens: int
    scored_bytes: int
    text_tokens: int
    windows: int
    run_tokens: int                   # tokens run through the model, context included
    context: int
    stride: Optional[int]
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Tokens run through the model (scored or context) per second."""
        return self.run_tokens / self.seconds if self.seconds else 0.0


def llama_cpp_windows(ids: list[int], context: int, bos: Optional[int]) -> list[Window]:
    """The windows of llama-perplexity (module docstring)."""
    if context < 4:
        raise ValueError(f"the context must be at least 4 tokens, got {context}")
    if len(ids) < 2 * context:
        raise ValueError(f"the text has {len(ids)} tokens: windows of {context} need at least "
                         f"{2 * context} (two windows); give a longer text or a smaller context")
    windows = []
    for i in range(len(ids) // context):
        tokens = ids[i * context:(i + 1) * context]
        if bos is not None:
            tokens = [bos, *tokens[1:]]
        windows.append(Window(tokens, context // 2 + 1, context))
    return windows


def strided_windows(ids: list[int], context: int, stride: int) -> list[Window]:
    """The sliding windows (module docstring)."""
    if not 1 <= stride <= context:
        raise ValueError(f"the stride must be between 1 and the context ({context}), got {stride}")
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} token(s): at least 2 are needed to score one")
    windows, scored_to, end = [], 1, min(context, len(ids))
    while True:
        begin = max(0, end - context)
        windows.append(Window(ids[begin:end], scored_to - begin, end - begin))
        if end == len(ids):
            return windows
        scored_to, end = end, min(end + stride, len(ids))


def token_bytes(tokenizer: Any, ids: np.ndarray) -> int:
    """UTF-8 bytes the tokens spell (module docstring)."""
    sp = tokenizer.sp
    total = 0
    for token in ids.tolist():
        if not 0 <= token < sp.vocab_size() or sp.is_control(token):
            continue
        total += 1 if sp.is_byte(token) else len(sp.id_to_piece(token).replace("\u2581", " ").encode())
    return total


def perplexity(model: Any, text: str, context: Optional[int] = None, stride: Optional[int] = None,
               progress: Optional[Callable[[int, int], None]] = None) -> PerplexityResult:
    """Perplexity of `text` under `model` in windows of `context` tokens (default: the model's
    sequence_len), cut as llama.cpp does, or sliding by `stride` tokens when given (module
    docstring). `progress(windows done, tokens run)` is called after each batch of windows.
    ValueError for an empty text, a model without a tokenizer, or a text too short."""
    config = model.config
    if model.tokenizer is None:
        raise ValueError("perplexity of a text needs a tokenizer; load the model with tokenizer=...")
    if not text:
        raise ValueError("the text is empty")
    context = config.sequence_len if context is None else context
    if not 1 <= context <= config.sequence_len:
        raise ValueError(f"the context must be between 1 and the model's sequence_len "
                         f"({config.sequence_len}), got {context}")
    ids = ([config.bos_token] if config.add_bos else []) + model.tokenizer.encode(text)
    windows = (llama_cpp_windows(ids, context, config.bos_token if config.add_bos else None)
               if stride is None else strided_windows(ids, context, stride))
    nll, scored, nbytes = 0.0, 0, 0
    start = time.perf_counter()
    for first in range(0, len(windows), WINDOWS_PER_CALL):
        batch = windows[first:first + WINDOWS_PER_CALL]
        for window, score in zip(batch, model.score([w.tokens for w in batch])):
            # logprobs[i] scores token i + 1
            nll -= float(np.sum(score.logprobs[window.start - 1:window.end - 1], dtype=np.float64))
            scored += window.end - window.start
            nbytes += token_bytes(model.tokenizer, score.token_ids[window.start:window.end])
        if progress is not None:
            progress(first + len(batch), sum(len(w.tokens) for w in windows[:first + len(batch)]))
    seconds = time.perf_counter() - start
    mean = nll / scored
    return PerplexityResult(perplexity=math.exp(mean), bits_per_byte=nll / math.log(2) / max(nbytes, 1),
                            negative_log_likelihood=mean, scored_tokens=scored, scored_bytes=nbytes,
                            text_tokens=len(ids), windows=len(windows),
                            run_tokens=sum(len(w.tokens) for w in windows), context=context, stride=stride,
                            seconds=seconds)
