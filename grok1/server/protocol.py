"""The OpenAI API over the generation engine: what each request may ask, checked, and the
responses and streamed events it gets (grok1/server/app.py serves them over HTTP).

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus text). Requests are checked by hand against the fields each endpoint
accepts, so every mistake is a 4xx in the OpenAI error shape, {"error": {"message", "type",
"param", "code"}}, naming the field and what is allowed; the server never dies from a request.
No body a client can send gets a 5xx: a body is at most 1 MiB of UTF-8 JSON (no NaN or Infinity),
nests arrays and objects at most 64 levels deep and holds valid Unicode text only (no lone
surrogates, which JSON's \\u escapes can spell); an error message shows at most 60 characters of
the value it refuses. With an API key (grok1/server/app.py), a request to /v1/* without
`Authorization: Bearer <key>` gets 401, code "invalid_api_key".

Choices: `n` choices of a request sample with seeds seed, seed+1, ... (fresh seeds when no seed
is given). Completions default to max_tokens 16 (lowered to the room the prompt leaves when not
given); chat defaults to the end of the context. A prompt longer than the context, or a
max_tokens beyond the room it leaves, is a 400 naming the limit. `top_k` is an extension
(0 = off). `logprobs` gives the log-probability of each chosen token; echo, top alternatives
(logprobs 1-5, chat top_logprobs 1-20) and max_tokens 0 with echo are grok1/server/evaluation.py's. `usage.completion_tokens`
counts the tokens returned (a stop token is not among them). A model without a tokenizer takes
prompts of token ids only, and its completions' text is empty: logprobs=0 returns the token ids
(as strings) with their log-probabilities.

Chat template (Grok-1 is a base model, so chat is plain text it can continue):

    System: <system message>\n\n        (each system message, if any)
    User: <user message>\n\n
    Assistant: <assistant message>\n\n
    ...
    Assistant:

and generation also stops at "\nUser:" (the model starting the next turn). The reply is the
continuation with its leading whitespace removed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import secrets
import time
from typing import Any, Callable, Optional

from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse

from grok1.generation.engine import Engine, EngineClosed, EngineError, Job, QueueFull
from grok1.generation.requests import Delta
from grok1.generation.settings import is_int, sampling_settings

MAX_BODY_BYTES = 1 << 20
MAX_DEPTH = 64                   # levels of arrays and objects in a body
MAX_SHOWN = 60                   # characters of a refused value an error message shows
MAX_CHOICES = 16                 # n
MAX_STOP = 4                     # stop sequences, as in the OpenAI API
MAX_TEMPERATURE = 2.0
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
CHAT_STOP = "\nUser:"
RETRY_AFTER_SECONDS = 1

COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream",
                 "stream_options", "stop", "seed", "frequency_penalty", "presence_penalty",
                 "logit_bias", "user"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "logprobs", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}
CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


class ApiError(Exception):
    """A request the server refuses: HTTP status and an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 kind: str = "invalid_request_error", code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ---- request checking -------------------------------------------------------------------------

def number_field(body: dict, name: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    # An int compares with the bounds exactly, however large (math.isfinite would overflow).
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (isinstance(value, float) and not math.isfinite(value)) \
            or value > high or value < low or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ApiError(400, f"{name} must be a number in {bounds}, got {shown(value)}", name)
    return float(value)


def integer_field(body: dict, name: str, default: Optional[int], low: int, high: Optional[int] = None
             ) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return default
    if not is_int(value) or value < low or (high is not None and value > high):
        allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ApiError(400, f"{name} must be {allowed}, got {shown(value)}", name)
    return value


def boolean_field(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, got {shown(value)}", name)
    return value


def shown(value: Any) -> str:
    """`value` as an error message shows it: its repr, nested lists and objects abbreviated, cut to
    MAX_SHOWN characters (one field of a body may hold a megabyte)."""
    text = _brief(value, depth=2)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN - 3] + "..."


def _brief(value: Any, depth: int) -> str:
    if isinstance(value, (list, dict)) and value:
        if depth == 0:
            return "[...]" if isinstance(value, list) else "{...}"
        pairs = value.items() if isinstance(value, dict) else enumerate(value)
        items = [(f"{_brief(k, 0)}: " if isinstance(value, dict) else "") + _brief(v, depth - 1)
                 for _, (k, v) in zip(range(4), pairs)]
        items += ["..."] if len(value) > 4 else []
        return ("{%s}" if isinstance(value, dict) else "[%s]") % ", ".join(items)
    return repr(value[:MAX_SHOWN + 1] if isinstance(value, str) else value)


class Service:
    """The model, its engine, and the request checking and response shaping of each endpoint."""

    def __init__(self, engine: Engine, model_name: str):
        self.engine = engine
        self.model = engine.model
        self.config = engine.model.config
        self.tokenizer = engine.model.tokenizer
        self.model_name = model_name
        self.created = int(time.time())
        self.http_responses: dict[int, int] = {}

    # ---- parsing ----

    def check_fields(self, body: Any, allowed: set[str], required: tuple[str, ...]) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        unknown = sorted(set(body) - allowed)
        if unknown:
            more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
            raise ApiError(400, f"unknown field(s) {', '.join(shown(u) for u in unknown[:3])}{more}; "
                                f"allowed: {', '.join(sorted(allowed))}", unknown[0][:MAX_SHOWN])
        for name in required:
            if name not in body:
                raise ApiError(400, f"missing required field {name}", name)
        model = body["model"]
        if not isinstance(model, str):
            raise ApiError(400, f"model must be a string, got {shown(model)}", "model")
        if model != self.model_name:
            raise ApiError(404, f"the model {shown(model)} does not exist; this server serves "
                                f"{self.model_name!r}", "model", code="model_not_found")
        if body.get("logit_bias"):
            raise ApiError(400, "logit_bias is not supported (give {} or leave it out)", "logit_bias")
        options = body.get("stream_options")
        if options is not None:
            if not isinstance(options, dict) or set(options) - {"include_usage"} \
                    or not isinstance(options.get("include_usage", False), bool):
                raise ApiError(400, 'stream_options must be {"include_usage": true|false}',
                               "stream_options")
            if not body.get("stream"):
                raise ApiError(400, "stream_options goes with stream: true", "stream_options")
        return body

    def settings(self, body: dict, max_tokens: Optional[int], logprobs: bool,
                 extra_stop: tuple[str, ...] = ()) -> list:
        """The SamplingSettings of each of the request's `n` choices (seed, seed+1, ...)."""
        n = integer_field(body, "n", 1, 1, MAX_CHOICES)
        stop = body.get("stop")
        stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > MAX_STOP or \
                not all(isinstance(s, str) and s for s in stops):
            raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP} "
                                f"of them, got {shown(stop)}", "stop")
        seed = body.get("seed")
        if seed is not None and (not is_int(seed) or not 0 <= seed < 2 ** 32):
            raise ApiError(400, f"seed must be an integer in [0, 2**32), got {shown(seed)}", "seed")
        values = dict(
            max_new_tokens=max_tokens,
            temperature=number_field(body, "temperature", 1.0, 0.0, MAX_TEMPERATURE),
            top_p=number_field(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
            top_k=integer_field(body, "top_k", 0, 0, self.config.vocab_size),
            frequency_penalty=number_field(body, "frequency_penalty", 0.0, -2.0, 2.0),
            presence_penalty=number_field(body, "presence_penalty", 0.0, -2.0, 2.0),
            stop=[*stops, *extra_stop] or None, logprobs=logprobs, strict=True)
        if (stops or extra_stop) and self.tokenizer is None:
            raise ApiError(400, "stop strings need a tokenizer; this model has none", "stop")
        try:
            return [sampling_settings(self.config, self.tokenizer,
                                      **values, seed=None if seed is None else (seed + i) % 2 ** 32)
                    for i in range(n)]
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    def fit(self, prompt: Any, settings, param: str, default_max_tokens: Optional[int]):
        """(prompt ids, settings) fitted into the context; a too-long prompt or max_tokens is a 400."""
        try:
            ids = self.engine.fit(prompt, dataclasses.replace(settings, max_new_tokens=None)).token_ids
            if settings.max_new_tokens is None and default_max_tokens is not None:
                settings = dataclasses.replace(
                    settings, max_new_tokens=min(default_max_tokens, self.config.sequence_len - len(ids)))
            return self.engine.fit(ids, settings).token_ids, settings
        except ValueError as e:
            message = str(e)
            if "leaves no room" in message or "does not fit" in message:
                message = (f"this model's context is {self.config.sequence_len} tokens: prompt and "
                           f"max_tokens must fit in it ({message})")
            raise ApiError(400, message, "max_tokens" if "max_new_tokens" in message else param) from None

    def check_count(self, requests: int) -> None:
        """A 400, before any prompt is read, for a request of more runs (prompts x n) than the engine
        ever holds at once: its slots and its queue."""
        most = self.engine.slots + self.engine.max_waiting
        if requests > most:
            raise ApiError(400, f"the request asks for {requests} completions (prompts x n); this "
                                f"server takes at most {most} at once (slots + max_waiting)", "prompt")

    def completion_prompts(self, body: dict) -> list:
        prompt = body["prompt"]
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and is_int(prompt[0])):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt:
            prompts = prompt
        else:
            raise ApiError(400, "prompt must be a string, a list of token ids, or a non-empty list "
                                "of either", "prompt")
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ApiError(400, "this model has no tokenizer: give prompts as token ids", "prompt")
            elif not (isinstance(p, list) and p and all(is_int(t) for t in p)):
                raise ApiError(400, f"each prompt must be a string or a non-empty list of token ids, "
                                    f"got {shown(p)}", "prompt")
        return prompts

    def chat_prompt(self, body: dict) -> str:
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list of {role, content}", "messages")
        lines = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or set(message) - {"role", "content", "name"} \
                    or not isinstance(message.get("role"), str) or message["role"] not in CHAT_ROLES:
                raise ApiError(400, f"messages[{i}] must be {{role, content}} with role one of "
                                    f"{', '.join(CHAT_ROLES)}", "messages")
            content = message.get("content")
            if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                                 and isinstance(p.get("text"), str) for p in content):
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise ApiError(400, f"messages[{i}].content must be text", "messages")
            lines.append(f"{CHAT_ROLES[message['role']]}: {content}\n\n")
        if self.tokenizer is None:
            raise ApiError(400, "chat needs a tokenizer; this model has none", "messages")
        return "".join(lines) + "Assistant:"

    # ---- running ----

    def submit(self, runs: list, loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> list[Job]:
        """Submit (choice index, prompt ids, settings) runs; their Deltas arrive on `events` as
        (choice index, Delta or EngineError)."""
        def deliver_to(index: int) -> Callable[[Any], None]:
            return lambda item: loop.call_soon_threadsafe(events.put_nowait, (index, item))
        try:
            return self.engine.submit([(ids, settings, deliver_to(index)) for index, ids, settings in runs])
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({e}); retry later", kind="rate_limit_error",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        except EngineClosed:
            raise ApiError(503, "the server is shutting down", kind="server_error") from None

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else str(token)


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


async def read_json(request: HttpRequest) -> Any:
    """The request's body parsed, or a 4xx ApiError: larger than MAX_BODY_BYTES (413), not JSON,
    NaN or Infinity, nested deeper than MAX_DEPTH, or text that is not valid Unicode (400)."""
    size = 0
    chunks = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks), parse_constant=_refuse_constant)
    except RecursionError:
        raise ApiError(400, TOO_DEEP) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    check_values(body)
    return body


TOO_DEEP = f"the request body nests arrays and objects more than {MAX_DEPTH} levels deep"


def check_values(body: Any) -> None:
    """Refuse (400) a parsed body nested more than MAX_DEPTH levels deep, or holding a string
    (value or key) that is not valid Unicode: anything that walks it later (a repr, the
    tokenizer, the JSON encoder of a response) would fail on it with a 5xx. Iterative, so any
    depth json.loads returns is safe to check."""
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value)
        if not isinstance(value, (list, dict)):
            continue
        if depth > MAX_DEPTH:
            raise ApiError(400, TOO_DEEP)
        for item in value if isinstance(value, list) else [*value, *value.values()]:
            if isinstance(item, (list, dict)):
                stack.append((item, depth + 1))
            elif isinstance(item, str):
                _check_text(item)


def _check_text(text: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"the request body holds text that is not valid Unicode: a lone surrogate "
                            f"{text[e.start]!r} at character {e.start} of {shown(text)}") from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


class EventStream(StreamingResponse):
    """Server-sent events that run `on_close` however the response ends (a client that
    disconnects cancels the task that runs it)."""

    def __init__(self, events, on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse_event(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# ---- the two generation endpoints -------------------------------------------------------------

class Generation:
    """One HTTP request's choices: submits them, gathers or streams their Deltas."""

    def __init__(self, service: Service, chat: bool, body: dict, prompts: list, settings: list,
                 default_max_tokens: Optional[int]):
        self.service, self.chat, self.body = service, chat, body
        self.id = _new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.stream = boolean_field(body, "stream")
        self.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.runs, self.prompt_tokens = [], 0
        for p, prompt in enumerate(prompts):
            for c, choice_settings in enumerate(settings):
                ids, fitted = service.fit(prompt, choice_settings, "messages" if chat else "prompt",
                                          default_max_tokens)
                if c == 0:
                    self.prompt_tokens += len(ids)
                self.runs.append((p * len(settings) + c, ids, fitted))
        self.jobs: list[Job] = []
        self.tokens = {index: [] for index, _, _ in self.runs}
        self.texts = {index: "" for index, _, _ in self.runs}
        self.logprobs = {index: [] for index, _, _ in self.runs}
        self.finish, self.stop_reason = {}, {}

    def start(self, loop) -> asyncio.Queue:
        events: asyncio.Queue = asyncio.Queue()
        self.jobs = self.service.submit(self.runs, loop, events)
        return events

    def cancel(self) -> None:
        for job in self.jobs:
            if not job.done:
                self.service.engine.cancel(job)

    def take(self, index: int, delta: Delta) -> str:
        """Record a delta; the text it adds (chat: without the reply's leading whitespace)."""
        text = delta.text
        if self.chat and not self.texts[index]:
            text = text.lstrip()
        self.texts[index] += text
        self.tokens[index] += delta.token_ids
        if delta.logprobs:
            self.logprobs[index] += delta.logprobs
        if delta.finish_reason is not None:
            self.finish[index], self.stop_reason[index] = delta.finish_reason, delta.stop_reason
        return text

    def usage(self) -> dict[str, int]:
        completion = sum(len(t) for t in self.tokens.values())
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def logprobs_of(self, tokens: list[int], logprobs: list[float]) -> Any:
        wanted = self.body.get("logprobs")
        if wanted is None or wanted is False:
            return None
        texts = [self.service.token_text(t) for t in tokens]
        if self.chat:
            return {"content": [{"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": []}
                                for s, lp in zip(texts, logprobs)]}
        return {"tokens": texts, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": None}

    def choice(self, index: int) -> dict[str, Any]:
        logprobs = self.logprobs_of(self.tokens[index], self.logprobs[index])
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": self.texts[index]},
                    "logprobs": logprobs, "finish_reason": self.finish[index]}
        return {"index": index, "text": self.texts[index], "logprobs": logprobs,
                "finish_reason": self.finish[index]}

    def envelope(self, choices: list, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion" + (".chunk" if chunk else "")) if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created,
                "model": self.service.model_name, "choices": choices}

    async def gather(self, request: HttpRequest, events: asyncio.Queue) -> Response:
        body = await self.result(request, events)
        return body if isinstance(body, Response) else JSONResponse(body)

    async def result(self, request: HttpRequest, events: asyncio.Queue) -> dict | Response:
        """The response body once every choice has finished (a 499 Response if the client left)."""
        try:
            while len(self.finish) < len(self.runs):
                try:
                    index, item = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self.cancel()
                        return Response(status_code=499)
                    continue
                if isinstance(item, EngineError):
                    raise ApiError(503 if isinstance(item, EngineClosed) else 500, str(item),
                                   kind="server_error")
                self.take(index, item)
        finally:
            self.cancel()
        body = self.envelope([self.choice(i) for i in sorted(self.finish)], chunk=False)
        body["usage"] = self.usage()
        return body

    async def events(self, events: asyncio.Queue):
        if self.chat:
            for index, _, _ in self.runs:
                yield sse_event(self.envelope([{"index": index, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}], chunk=True))
        while len(self.finish) < len(self.runs):
            index, item = await events.get()
            if isinstance(item, EngineError):
                error = ApiError(503 if isinstance(item, EngineClosed) else 500, str(item),
                                 kind="server_error")
                yield sse_event(error.body())
                break
            text = self.take(index, item)
            logprobs = self.logprobs_of(item.token_ids, item.logprobs or [])
            if not text and item.finish_reason is None and not logprobs:
                continue
            if self.chat:
                choice = {"index": index, "delta": {"content": text} if text or item.finish_reason is None
                          else {}, "logprobs": logprobs, "finish_reason": item.finish_reason}
            else:
                choice = {"index": index, "text": text, "logprobs": logprobs,
                          "finish_reason": item.finish_reason}
            chunk = self.envelope([choice], chunk=True)
            if self.include_usage:
                chunk["usage"] = None
            yield sse_event(chunk)
        else:
            if self.include_usage:
                chunk = self.envelope([], chunk=True)
                chunk["usage"] = self.usage()
                yield sse_event(chunk)
        yield "data: [DONE]\n\n"
