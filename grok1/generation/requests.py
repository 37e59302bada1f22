"""A request's progress on the host: the tokens it has sampled, stop tokens and stop strings,
text decoded a piece at a time (never split mid-character), and what it hands back: a `Delta`
per step and a `Completion` at the end."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from grok1.config import ModelConfig
from grok1.generation.settings import SamplingSettings
from grok1.tokenizer import IncrementalDecoder


@dataclasses.dataclass(frozen=True)
class Completion:
    """A finished request. `text` is "" without a tokenizer; `logprobs` (log-softmax of the model's
    logits at each chosen token) is None unless asked for.

    `finish_reason` is "stop" (the model's EOS, or a stop token or string: `stop_reason` holds
    which one, None at EOS) or "length" (max_new_tokens reached, or the end of the context).
    `seed` is the one the request sampled with (drawn fresh when none was given).
    `dropped_prompt_tokens` and `max_new_tokens_lowered_from` say how the request was fitted
    into the context (see `fit_prompt`)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_token_ids: list[int]
    logprobs: Optional[list[float]] = None
    stop_reason: Optional[int | str] = None
    seed: Optional[int] = None
    dropped_prompt_tokens: int = 0
    max_new_tokens_lowered_from: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Delta:
    """What one step added to a request: new tokens and the text they complete. The last delta
    of a request carries its `finish_reason` and `stop_reason` (as in Completion); the first one
    of `stream` carries the prompt's `dropped_prompt_tokens` and `max_new_tokens_lowered_from`."""

    text: str
    token_ids: list[int]
    logprobs: Optional[list[float]] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[int | str] = None
    dropped_prompt_tokens: int = 0
    max_new_tokens_lowered_from: Optional[int] = None


class Request:
    """Host-side progress of one request: stop checks, text decoding, the deltas it emits."""

    def __init__(self, prompt: list[int], settings: SamplingSettings, config: ModelConfig, tokenizer: Any):
        self.prompt = prompt
        self.settings = settings
        self.eos_token = config.eos_token
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
        self.stop_reason: Optional[int | str] = None

    def add(self, token: int, logprob: float) -> Delta:
        """Take one sampled token; the delta it produces (the last one has a finish_reason)."""
        if token in self.stop_ids:
            return self._finish("stop", [], None,
                                stop_reason=None if token == self.eos_token else token)
        self.token_ids.append(token)
        logprobs = None
        if self.logprobs is not None:
            self.logprobs.append(logprob)
            logprobs = [logprob]
        if self.decoder is not None:
            self.held += self.decoder.push([token])
            hit = self._stop_string_at()
            if hit is not None:
                self.held, stop_string = self.held[:hit[0]], hit[1]
                return self._finish("stop", [token], logprobs, flush=False, stop_reason=stop_string)
        if len(self.token_ids) >= self.max_tokens:
            return self._finish("length", [token], logprobs)
        return Delta(text=self._release(self._safe_length()), token_ids=[token], logprobs=logprobs)

    def completion(self) -> Completion:
        return Completion(text=self.text, token_ids=list(self.token_ids), finish_reason=self.finish_reason,
                          prompt_token_ids=list(self.prompt),
                          logprobs=None if self.logprobs is None else list(self.logprobs),
                          stop_reason=self.stop_reason, seed=self.settings.seed)

    def _finish(self, reason: str, tokens: list[int], logprobs, flush: bool = True,
                stop_reason: Optional[int | str] = None) -> Delta:
        self.finish_reason, self.stop_reason = reason, stop_reason
        if flush and self.decoder is not None:
            self.held += self.decoder.flush()
        return Delta(text=self._release(len(self.held)), token_ids=tokens, logprobs=logprobs,
                     finish_reason=reason, stop_reason=stop_reason)

    def _release(self, n: int) -> str:
        out, self.held = self.held[:n], self.held[n:]
        self.text += out
        return out

    def _stop_string_at(self) -> Optional[tuple[int, str]]:
        """(where in `held` the first stop string starts, that string), or None."""
        hits = [(self.held.find(s), s) for s in self.settings.stop_strings if s in self.held]
        return min(hits) if hits else None

    def _safe_length(self) -> int:
        """How much of `held` can be emitted: all but its longest tail that begins a stop string."""
        for start in range(max(0, len(self.held) - max(map(len, self.settings.stop_strings), default=0)),
                           len(self.held)):
            tail = self.held[start:]
            if any(s.startswith(tail) for s in self.settings.stop_strings):
                return start
        return len(self.held)
