"""What evaluation harnesses ask of the server (lm-evaluation-harness's `local-completions`, as
OpenAI's legacy completions and vLLM define it): the prompt's own log-probabilities, top
alternatives, and the tokenizer over HTTP.

- Completions: `echo` returns the prompt's tokens with their log-probabilities (the first one
  null: it has no context), then the completion's; `logprobs` N (0 to 5) adds `top_logprobs`, a
  dict {token: logprob} of the N likeliest tokens per position, and `text_offset`, where each
  token starts in the choice's text. `max_tokens: 0` with `echo` scores the prompt and generates
  nothing. With echo, a completion that ended at a stop token (EOS, or a stop token id) lists that
  token last, with its log-probability, as vLLM does (its text stays out of the choice's text):
  lm-eval drops the last listed token, the one the request generated.
- Chat: `logprobs: true` with `top_logprobs` N (0 to 20).
- Log-probabilities come from the engine's scoring step (grok1/generation/scoring.py), which runs
  beside generation: prompt scores without generating, and the prompt plus the completion scored
  once more after generating, for the alternatives at generated positions. Those are the model's
  own distribution (before temperature and penalties), as `logprobs` has always been here.
- Not streamed: a streamed request asking echo or top alternatives is a 400. Echo takes n = 1.
- `POST /tokenize` {"prompt", "add_special_tokens" (default true: BOS first when the model's
  config says so)} -> {"tokens", "count", "max_model_len"}; the special tokens' own strings
  ("</s>" ...) in the text become their ids. `POST /detokenize` {"tokens"} -> {"prompt"}.
  `GET /tokenizer_info` -> eos/bos/pad/unk tokens, their ids, model_max_length, vocab_size.

Token strings in echo and top-alternative responses are SentencePiece pieces with "▁" shown as a
space: one string per token, so no two alternatives at a position share a dict key.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any, Optional

from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response

from grok1.generation.engine import EngineClosed, EngineError, QueueFull
from grok1.generation.scoring import Score, scored_prompt_ids
from grok1.server.protocol import (RETRY_AFTER_SECONDS, ApiError, Generation, Service, boolean_field,
                                   is_int, read_json, shown)
from grok1.tokenizer import IncrementalDecoder

MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20
TOKENIZE_FIELDS = {"model", "prompt", "add_special_tokens"}
DETOKENIZE_FIELDS = {"model", "tokens"}


# ---- tokens as text ----------------------------------------------------------------------------

def token_string(service: Service, token: int) -> str:
    """One token's own string: its piece with "▁" as a space (unique per token), or its id as
    text for a model without a tokenizer."""
    if service.tokenizer is None or not 0 <= token < service.tokenizer.vocab_size:
        return str(token)
    return service.tokenizer.id_to_piece(token).replace("\u2581", " ")


def text_offsets(service: Service, ids: list[int], context: list[int] = ()) -> list[int]:
    """Where each token's text starts in the decoded text of `ids` (after `context`, which is not
    part of it); a token inside a character that several tokens spell starts where it does."""
    if service.tokenizer is None:
        return [0] * len(ids)
    decoder = IncrementalDecoder(service.tokenizer, context)
    offsets, length = [], 0
    for token in ids:
        offsets.append(length)
        length += len(decoder.push([token]))
    return offsets


def top_dict(service: Service, score: Score, position: int) -> dict[str, float]:
    return {token_string(service, int(t)): float(lp)
            for t, lp in zip(score.top_ids[position], score.top_logprobs[position])}


# ---- scoring through the engine ----------------------------------------------------------------

async def scores(service: Service, prompts: list[list[int]], top_n: int) -> list[Score]:
    """The Score of each list of token ids, from the engine's scoring step (a 429 when the queue
    is full, 503 when shutting down, 500 when the step failed)."""
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in prompts]

    def deliver_to(future: asyncio.Future):
        return lambda item: loop.call_soon_threadsafe(
            lambda: future.done() or future.set_result(item))
    try:
        jobs = service.engine.submit_scores([(ids, top_n, deliver_to(f)) for ids, f in zip(prompts, futures)])
    except QueueFull as e:
        raise ApiError(429, f"the server is busy ({e}); retry later", kind="rate_limit_error",
                       headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
    except EngineClosed:
        raise ApiError(503, "the server is shutting down", kind="server_error") from None
    try:
        results = await asyncio.gather(*futures)
    finally:   # a client that left cancels what is still waiting
        for job in jobs:
            if not job.done:
                service.engine.cancel(job)
    for item in results:
        if isinstance(item, EngineError):
            raise ApiError(503 if isinstance(item, EngineClosed) else 500, str(item), kind="server_error")
    return list(results)


def scored_ids(service: Service, prompt: Any) -> list[int]:
    try:
        return scored_prompt_ids(prompt, service.config, service.tokenizer)
    except ValueError as e:
        raise ApiError(400, str(e), "prompt") from None


def completion_logprobs(service: Service, tokens: list[int], logprobs: list[Optional[float]],
                        tops: Optional[list], offsets: list[int]) -> dict[str, Any]:
    return {"tokens": [token_string(service, t) for t in tokens], "token_logprobs": logprobs,
            "top_logprobs": tops, "text_offset": offsets}


# ---- completions: echo, top alternatives, max_tokens 0 -----------------------------------------

def check_completion_scoring(body: dict) -> tuple[bool, Optional[int]]:
    """(echo, logprobs) of a completions request, checked: logprobs 0 to 5 or null; echo and top
    alternatives not streamed; echo with n = 1."""
    echo = boolean_field(body, "echo")
    wanted = body.get("logprobs")
    if wanted is not None and (not is_int(wanted) or not 0 <= wanted <= MAX_COMPLETION_LOGPROBS):
        raise ApiError(400, f"logprobs must be an integer in [0, {MAX_COMPLETION_LOGPROBS}] (the top "
                            f"alternatives per token) or null, got {shown(wanted)}", "logprobs")
    if (echo or wanted) and boolean_field(body, "stream"):
        raise ApiError(400, "echo and logprobs > 0 are not streamed: give stream: false", "stream")
    if echo and body.get("n") not in (None, 1):
        raise ApiError(400, f"echo takes n = 1 (the prompt's log-probabilities are the same for every "
                            f"choice), got n = {shown(body.get('n'))}", "n")
    if body.get("max_tokens") == 0 and not echo:
        raise ApiError(400, "max_tokens 0 generates nothing: give echo: true to score the prompt, or "
                            "max_tokens >= 1", "max_tokens")
    return echo, wanted


async def prompt_scores(service: Service, body: dict, prompts: list, top_n: Optional[int]) -> Response:
    """`max_tokens: 0` with echo: each prompt's tokens with their log-probabilities, no completion."""
    ids = [scored_ids(service, prompt) for prompt in prompts]
    results = await scores(service, ids, top_n or 0)
    choices = []
    for index, (prompt, prompt_ids, score) in enumerate(zip(prompts, ids, results)):
        logprobs = None
        if top_n is not None:
            logprobs = completion_logprobs(
                service, prompt_ids, [None, *map(float, score.logprobs)],
                [None, *(top_dict(service, score, i) for i in range(len(prompt_ids) - 1))] if top_n else None,
                text_offsets(service, prompt_ids))
        choices.append({"index": index, "text": prompt_text(service, prompt, prompt_ids),
                        "logprobs": logprobs, "finish_reason": "length"})
    count = sum(map(len, ids))
    return JSONResponse({**envelope(service, "cmpl"), "choices": choices,
                         "usage": {"prompt_tokens": count, "completion_tokens": 0, "total_tokens": count}})


def envelope(service: Service, prefix: str) -> dict[str, Any]:
    return {"id": f"{prefix}-{secrets.token_hex(12)}", "object": "text_completion",
            "created": int(time.time()), "model": service.model_name}


def prompt_text(service: Service, prompt: Any, ids: list[int]) -> str:
    if isinstance(prompt, str):
        return prompt
    return service.tokenizer.decode(ids) if service.tokenizer is not None else ""


async def scored_completions(service: Service, request: HttpRequest, generation: Generation,
                             events: asyncio.Queue, prompts: list, echo: bool, top_n: Optional[int]
                             ) -> Response:
    """A finished generation's response with echo and/or top alternatives: prompt plus completion
    scored once, after generating."""
    body = await generation.result(request, events)
    if isinstance(body, Response):
        return body
    eos = service.config.eos_token
    full = {}
    for index, ids, _ in generation.runs:
        completion = list(generation.tokens[index])
        stop = generation.stop_reason.get(index)
        if echo and generation.finish.get(index) == "stop" and not isinstance(stop, str):
            completion.append(eos if stop is None else int(stop))   # the stop token, listed last
        full[index] = (ids, completion)
    order = sorted(full)
    results = dict(zip(order, await scores(service, [full[i][0] + full[i][1] for i in order], top_n or 0)))
    for choice in body["choices"]:
        index = choice["index"]
        ids, completion = full[index]
        score = results[index]
        prompt = prompts[index // max(1, len(generation.runs) // len(prompts))]
        start = 1 if echo else len(ids)          # the first listed token's position in the score
        tokens = ids + completion if echo else completion
        logprobs = [float(x) for x in score.logprobs[start - 1:]]
        tops = [top_dict(service, score, i) for i in range(start - 1, len(ids) + len(completion) - 1)]
        if echo:
            text = prompt_text(service, prompt, ids)
            offsets = text_offsets(service, ids) + [len(text) + offset
                                                    for offset in text_offsets(service, completion, ids)]
            choice["text"] = text + choice["text"]
            logprobs, tops = [None, *logprobs], [None, *tops]
        else:
            offsets = text_offsets(service, completion, ids)
        choice["logprobs"] = None if top_n is None else completion_logprobs(
            service, tokens, logprobs, tops if top_n else None, offsets)
    return JSONResponse(body)


# ---- chat: top_logprobs -----------------------------------------------------------------------

def check_chat_top_logprobs(body: dict) -> int:
    top = body.get("top_logprobs")
    if top is None:
        return 0
    if not is_int(top) or not 0 <= top <= MAX_CHAT_TOP_LOGPROBS:
        raise ApiError(400, f"top_logprobs must be an integer in [0, {MAX_CHAT_TOP_LOGPROBS}], got "
                            f"{shown(top)}", "top_logprobs")
    if top and not boolean_field(body, "logprobs"):
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    if top and boolean_field(body, "stream"):
        raise ApiError(400, "top_logprobs is not streamed: give stream: false", "stream")
    return top


async def chat_with_top_logprobs(service: Service, request: HttpRequest, generation: Generation,
                                 events: asyncio.Queue, top_n: int) -> Response:
    """A finished chat response whose logprobs list the `top_n` likeliest tokens per position."""
    body = await generation.result(request, events)
    if isinstance(body, Response):
        return body
    runs = {index: ids for index, ids, _ in generation.runs}
    order = sorted(runs)
    results = dict(zip(order, await scores(service, [runs[i] + generation.tokens[i] for i in order], top_n)))
    for choice in body["choices"]:
        index = choice["index"]
        start = len(runs[index]) - 1
        for position, entry in enumerate(choice["logprobs"]["content"]):
            top = top_dict(service, results[index], start + position)
            entry["top_logprobs"] = [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                                     for t, lp in top.items()]
    return JSONResponse(body)


# ---- the tokenizer over HTTP ------------------------------------------------------------------

def special_tokens(service: Service) -> dict[str, int]:
    """The strings of the special tokens (BOS, EOS, pad, unk) -> their ids."""
    config, tokenizer = service.config, service.tokenizer
    out = {}
    for token in (config.bos_token, config.eos_token, config.pad_token, tokenizer.sp.unk_id()):
        if 0 <= token < tokenizer.vocab_size:
            out[tokenizer.id_to_piece(token)] = token
    return out


def encode(service: Service, text: str) -> list[int]:
    """Text to ids, the special tokens' own strings becoming their ids (as Hugging Face and vLLM
    tokenizers do), the text between them encoded as it stands."""
    specials = special_tokens(service)
    ids, start = [], 0
    while True:
        hits = [(text.find(s, start), s) for s in specials if text.find(s, start) >= 0]
        if not hits:
            return ids + (service.tokenizer.encode(text[start:]) if text[start:] else [])
        at, special = min(hits, key=lambda hit: (hit[0], -len(hit[1])))
        ids += (service.tokenizer.encode(text[start:at]) if at > start else []) + [specials[special]]
        start = at + len(special)


def need_tokenizer(service: Service) -> None:
    if service.tokenizer is None:
        raise ApiError(400, "this model has no tokenizer: it takes and returns token ids only")


def check_model(service: Service, body: dict) -> None:
    model = body.get("model")
    if model is not None and model != service.model_name:
        raise ApiError(404, f"the model {shown(model)} does not exist; this server serves "
                            f"{service.model_name!r}", "model", code="model_not_found")


def check_body(service: Service, body: Any, allowed: set[str]) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(shown(u) for u in unknown[:3])}; allowed: "
                            f"{', '.join(sorted(allowed))}", unknown[0][:60])
    check_model(service, body)
    return body


async def tokenize(service: Service, request: HttpRequest) -> Response:
    need_tokenizer(service)
    body = check_body(service, await read_json(request), TOKENIZE_FIELDS)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise ApiError(400, f"prompt must be a string, got {shown(prompt)}", "prompt")
    add_special = body.get("add_special_tokens", True)
    if not isinstance(add_special, bool):
        raise ApiError(400, f"add_special_tokens must be true or false, got {shown(add_special)}",
                       "add_special_tokens")
    ids = encode(service, prompt)
    if add_special and service.config.add_bos:
        ids = [service.config.bos_token, *ids]
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": service.config.sequence_len})


async def detokenize(service: Service, request: HttpRequest) -> Response:
    need_tokenizer(service)
    body = check_body(service, await read_json(request), DETOKENIZE_FIELDS)
    tokens = body.get("tokens")
    vocab = service.config.vocab_size
    if not isinstance(tokens, list) or not all(is_int(t) and 0 <= t < vocab for t in tokens):
        raise ApiError(400, f"tokens must be a list of token ids in [0, {vocab}), got {shown(tokens)}",
                       "tokens")
    return JSONResponse({"prompt": service.tokenizer.decode(tokens)})


async def tokenizer_info(service: Service, request: HttpRequest) -> Response:
    need_tokenizer(service)
    config, tokenizer = service.config, service.tokenizer
    piece = lambda token: tokenizer.id_to_piece(token) if 0 <= token < tokenizer.vocab_size else None
    unk = tokenizer.sp.unk_id()
    return JSONResponse({
        "tokenizer_class": "SentencePiece", "model_max_length": config.sequence_len,
        "vocab_size": config.vocab_size, "add_bos_token": config.add_bos, "add_eos_token": False,
        "bos_token": piece(config.bos_token), "bos_token_id": config.bos_token,
        "eos_token": piece(config.eos_token), "eos_token_id": config.eos_token,
        "pad_token": piece(config.pad_token), "pad_token_id": config.pad_token,
        "unk_token": piece(unk), "unk_token_id": unk})
