"""An OpenAI-compatible HTTP server over the generation engine (Starlette + uvicorn).

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus text). Requests are checked by hand against the fields each endpoint
accepts, so every mistake is a 4xx in the OpenAI error shape, {"error": {"message", "type",
"param", "code"}}, naming the field and what is allowed; the server never dies from a request.

Choices: `n` choices of a request sample with seeds seed, seed+1, ... (fresh seeds when no seed
is given). Completions default to max_tokens 16 (lowered to the room the prompt leaves when not
given); chat defaults to the end of the context. A prompt longer than the context, or a
max_tokens beyond the room it leaves, is a 400 naming the limit. `top_k` is an extension
(0 = off). `logprobs` gives the log-probability of each chosen token; top alternatives
(logprobs > 0, top_logprobs > 0) are not computed and are refused. `usage.completion_tokens`
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

Several processes (`grok1.distributed`): process 0 serves; the others follow its engine's steps
(`serve` does both, see `Engine.follow`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import secrets
import socket
import threading
import time
from typing import Any, Callable, Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from grok1.distributed import is_main_process
from grok1.engine import (DEFAULT_MAX_WAITING, DEFAULT_SLOTS, Engine, EngineClosed, EngineError,
                          Job, QueueFull)
from grok1.sampler import Delta, sampling_settings

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_BODY_BYTES = 1 << 20
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

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict, name: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value > high or value < low or (low_open and value == low):
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ApiError(400, f"{name} must be a number in {bounds}, got {value!r}", name)
    return float(value)


def _integer(body: dict, name: str, default: Optional[int], low: int, high: Optional[int] = None
             ) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or value < low or (high is not None and value > high):
        allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ApiError(400, f"{name} must be {allowed}, got {value!r}", name)
    return value


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, got {value!r}", name)
    return value


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
            raise ApiError(400, f"unknown field(s) {', '.join(unknown)}; allowed: "
                                f"{', '.join(sorted(allowed))}", unknown[0])
        for name in required:
            if name not in body:
                raise ApiError(400, f"missing required field {name}", name)
        model = body["model"]
        if not isinstance(model, str):
            raise ApiError(400, f"model must be a string, got {model!r}", "model")
        if model != self.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves "
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
        n = _integer(body, "n", 1, 1, MAX_CHOICES)
        stop = body.get("stop")
        stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > MAX_STOP or \
                not all(isinstance(s, str) and s for s in stops):
            raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP} "
                                f"of them, got {stop!r}", "stop")
        seed = body.get("seed")
        if seed is not None and (not _is_int(seed) or not 0 <= seed < 2 ** 32):
            raise ApiError(400, f"seed must be an integer in [0, 2**32), got {seed!r}", "seed")
        values = dict(
            max_new_tokens=max_tokens,
            temperature=_number(body, "temperature", 1.0, 0.0, MAX_TEMPERATURE),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
            top_k=_integer(body, "top_k", 0, 0, self.config.vocab_size),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
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

    def completion_prompts(self, body: dict) -> list:
        prompt = body["prompt"]
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and _is_int(prompt[0])):
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
            elif not (isinstance(p, list) and p and all(_is_int(t) for t in p)):
                raise ApiError(400, f"each prompt must be a string or a non-empty list of token ids, "
                                    f"got {json.dumps(p)[:80]}", "prompt")
        return prompts

    def chat_prompt(self, body: dict) -> str:
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list of {role, content}", "messages")
        lines = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or set(message) - {"role", "content", "name"} \
                    or message.get("role") not in CHAT_ROLES:
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


async def _read_json(request: HttpRequest) -> Any:
    size = 0
    chunks = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks), parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None


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


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# ---- the two generation endpoints -------------------------------------------------------------

class Generation:
    """One HTTP request's choices: submits them, gathers or streams their Deltas."""

    def __init__(self, service: Service, chat: bool, body: dict, prompts: list, settings: list,
                 default_max_tokens: Optional[int]):
        self.service, self.chat, self.body = service, chat, body
        self.id = _new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.stream = _boolean(body, "stream")
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
        self.finish = {}

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
            self.finish[index] = delta.finish_reason
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

    async def gather(self, request: HttpRequest, events: asyncio.Queue) -> JSONResponse:
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
        return JSONResponse(body)

    async def events(self, events: asyncio.Queue):
        if self.chat:
            for index, _, _ in self.runs:
                yield _sse(self.envelope([{"index": index, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}], chunk=True))
        while len(self.finish) < len(self.runs):
            index, item = await events.get()
            if isinstance(item, EngineError):
                error = ApiError(503 if isinstance(item, EngineClosed) else 500, str(item),
                                 kind="server_error")
                yield _sse(error.body())
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
            yield _sse(chunk)
        else:
            if self.include_usage:
                chunk = self.envelope([], chunk=True)
                chunk["usage"] = self.usage()
                yield _sse(chunk)
        yield "data: [DONE]\n\n"


def build_app(engine: Engine, model_name: str) -> Starlette:
    """The Starlette app serving `engine` under `model_name`. The engine must be started (the
    app's lifespan starts it, and closes it at shutdown)."""
    service = Service(engine, model_name)

    async def generation(request: HttpRequest, chat: bool) -> Response:
        body = await _read_json(request)
        if chat:
            body = service.check_fields(body, CHAT_FIELDS, ("model", "messages"))
            if body.get("top_logprobs"):
                raise ApiError(400, "top_logprobs > 0 is not supported (only the chosen token's "
                                    "logprob is computed)", "top_logprobs")
            logprobs = _boolean(body, "logprobs")
            if "max_tokens" in body and "max_completion_tokens" in body:
                raise ApiError(400, "give max_tokens or max_completion_tokens, not both", "max_tokens")
            name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
            max_tokens, default = _integer(body, name, None, 1), None
            prompts = [service.chat_prompt(body)]
            settings = service.settings(body, max_tokens, logprobs, extra_stop=(CHAT_STOP,))
        else:
            body = service.check_fields(body, COMPLETION_FIELDS, ("model", "prompt"))
            wanted = body.get("logprobs")
            if wanted is not None and (not _is_int(wanted) or wanted != 0):
                raise ApiError(400, f"logprobs must be 0 (the chosen token's logprob) or null; top "
                                    f"alternatives are not computed, got {wanted!r}", "logprobs")
            if body.get("echo"):
                raise ApiError(400, "echo is not supported", "echo")
            if body.get("suffix"):
                raise ApiError(400, "suffix is not supported: this model does not fill in the middle",
                               "suffix")
            if _integer(body, "best_of", 1, 1, 1) != 1:
                raise ApiError(400, "best_of must be 1", "best_of")
            max_tokens = _integer(body, "max_tokens", None, 1)
            default = COMPLETIONS_DEFAULT_MAX_TOKENS
            prompts = service.completion_prompts(body)
            settings = service.settings(body, max_tokens, wanted is not None)
        generation = Generation(service, chat, body, prompts, settings, default)
        events = generation.start(asyncio.get_running_loop())
        if generation.stream:
            return EventStream(generation.events(events), on_close=generation.cancel)
        return await generation.gather(request, events)

    async def completions(request: HttpRequest) -> Response:
        return await generation(request, chat=False)

    async def chat_completions(request: HttpRequest) -> Response:
        return await generation(request, chat=True)

    async def models(request: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": service.created, "owned_by": "grok1",
             "context_length": service.config.sequence_len}]})

    async def health(request: HttpRequest) -> Response:
        if engine.closing:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(request: HttpRequest) -> Response:
        return PlainTextResponse(prometheus_text(engine, service.http_responses),
                                 media_type="text/plain; version=0.0.4")

    async def api_error(request: HttpRequest, error: ApiError) -> Response:
        return error.response()

    async def http_error(request: HttpRequest, error: HTTPException) -> Response:
        return ApiError(error.status_code, str(error.detail), kind="invalid_request_error"
                        if error.status_code < 500 else "server_error").response()

    async def client_gone(request: HttpRequest, error: ClientDisconnect) -> Response:
        return Response(status_code=499)

    async def server_error(request: HttpRequest, error: Exception) -> Response:
        return ApiError(500, f"internal error: {type(error).__name__}: {error}",
                        kind="server_error").response()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.close)

    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: api_error, HTTPException: http_error,
                                        ClientDisconnect: client_gone, Exception: server_error})
    return CountResponses(app, service.http_responses)


class CountResponses:
    """ASGI middleware counting responses by status code (for /metrics)."""

    def __init__(self, app, counts: dict[int, int]):
        self.app, self.counts = app, counts

    def __getattr__(self, name):
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.counts[message["status"]] = self.counts.get(message["status"], 0) + 1
            await send(message)
        await self.app(scope, receive, counting_send)


def prometheus_text(engine: Engine, http_responses: dict[int, int]) -> str:
    """The engine's metrics (and responses by status) in the Prometheus text format."""
    m = engine.snapshot()
    lines = [
        "# HELP grok1_slots Slots (requests decoded together) of the engine.",
        "# TYPE grok1_slots gauge", f"grok1_slots {m.slots}",
        "# HELP grok1_requests_running Requests holding a slot.",
        "# TYPE grok1_requests_running gauge", f"grok1_requests_running {m.running}",
        "# HELP grok1_requests_waiting Requests waiting for a slot.",
        "# TYPE grok1_requests_waiting gauge", f"grok1_requests_waiting {m.waiting}",
        "# HELP grok1_prompt_tokens_total Prompt tokens prefilled.",
        "# TYPE grok1_prompt_tokens_total counter", f"grok1_prompt_tokens_total {m.prompt_tokens}",
        "# HELP grok1_generated_tokens_total Tokens sampled.",
        "# TYPE grok1_generated_tokens_total counter",
        f"grok1_generated_tokens_total {m.generated_tokens}",
        "# HELP grok1_requests_finished_total Requests ended, by reason (stop, length, cancelled, "
        "aborted, error).",
        "# TYPE grok1_requests_finished_total counter",
        *(f'grok1_requests_finished_total{{reason="{r}"}} {c}' for r, c in sorted(m.finished.items())),
        "# HELP grok1_time_to_first_token_seconds From submission to the first token.",
        "# TYPE grok1_time_to_first_token_seconds histogram",
        *m.time_to_first_token.lines("grok1_time_to_first_token_seconds"),
        "# HELP grok1_time_per_output_token_seconds Between consecutive tokens of a request.",
        "# TYPE grok1_time_per_output_token_seconds histogram",
        *m.time_per_output_token.lines("grok1_time_per_output_token_seconds"),
        "# HELP grok1_http_responses_total HTTP responses by status code.",
        "# TYPE grok1_http_responses_total counter",
        *(f'grok1_http_responses_total{{code="{c}"}} {n}' for c, n in sorted(dict(http_responses).items())),
    ]
    return "\n".join(lines) + "\n"


# ---- running it -------------------------------------------------------------------------------

def _uvicorn_server(app, engine: Engine, log_level: str):
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            # End running requests with a final event first, so open streams close at once.
            threading.Thread(target=engine.close, name="grok1-engine-close").start()
            await super().shutdown(sockets)

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=10,
                            lifespan="on", access_log=False)
    return Server(config)


def serve(model: Any, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, slots: int = DEFAULT_SLOTS,
          model_name: str = "grok-1", max_waiting: int = DEFAULT_MAX_WAITING, decode_chunk: int = 1,
          log_level: str = "info", sock: Optional[socket.socket] = None) -> None:
    """Serve `model` on host:port (or the listening `sock`) until SIGTERM or Ctrl-C (blocking).
    Running requests end with a final event, then the port is freed.

    On a cluster (`grok1.distributed`) every process calls this with the same settings: process 0
    serves HTTP, the others follow its engine's steps (`Engine.follow`) and return when it stops."""
    engine = Engine(model, slots=slots, decode_chunk=decode_chunk, max_waiting=max_waiting,
                    lead_followers=True)
    if not is_main_process():
        engine.follow()
        return
    sock = sock or bind(host, port)
    host, port = sock.getsockname()[:2]
    print(f"serving {model_name!r} on http://{_url_host(host)}:{port}/v1 ({engine.slots} slots)",
          flush=True)
    _uvicorn_server(build_app(engine, model_name), engine, log_level).run(sockets=[sock])


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class BackgroundServer:
    """A server on a thread of this process (for tests and notebooks): `.url`, `.engine`,
    `.stop()`."""

    def __init__(self, model: Any, host: str = DEFAULT_HOST, port: int = 0, slots: int = DEFAULT_SLOTS,
                 model_name: str = "grok-1", max_waiting: int = DEFAULT_MAX_WAITING,
                 decode_chunk: int = 1, log_level: str = "warning"):
        self.engine = Engine(model, slots=slots, decode_chunk=decode_chunk, max_waiting=max_waiting)
        self.model_name = model_name
        self._socket = bind(host, port)
        self.url = f"http://{_url_host(host)}:{self._socket.getsockname()[1]}"
        self._server = _uvicorn_server(build_app(self.engine, model_name), self.engine, log_level)
        self._thread = threading.Thread(target=self._server.run, kwargs=dict(sockets=[self._socket]),
                                        name="grok1-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def stop(self, timeout: float = 30.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
