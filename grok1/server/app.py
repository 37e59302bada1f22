"""An OpenAI-compatible HTTP server over the generation engine (Starlette + uvicorn): the app
and its routes, Prometheus metrics, and serving until stopped (grok1/server/protocol.py checks
each request and shapes each answer).

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus text), and vLLM's POST /tokenize, POST /detokenize, GET /tokenizer_info
(grok1/server/evaluation.py, with echo and top alternatives for evaluation harnesses).
Several processes (`grok1.distributed`): process 0 serves; the
others follow its engine's steps (`serve` does both, see `Engine.follow`).

Before it listens, a server compiles (or loads from the compilation cache) the device steps a
request needs (`Engine.warm_up`), so the first request does not wait for them.

An API key keeps a server private: with one, every request to /v1/* (and to the tokenizer
endpoints) must carry the header
`Authorization: Bearer <key>` (what the openai client's `api_key=` sends), or it gets 401 in the
OpenAI error shape (code "invalid_api_key"); keys are compared in constant time. /health stays
open, and /metrics too unless `metrics_need_key`. The key is, first to last: the `api_key`
argument, else the environment variable GROK1_API_KEY when it is set and not empty (a key there
stays out of `ps`), else none (every request is served).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Optional

import jax
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from grok1.generation.engine import DEFAULT_MAX_WAITING, DEFAULT_SLOTS, Engine
from grok1.runtime.processes import is_main_process
from grok1.server import evaluation
from grok1.server.protocol import (CHAT_FIELDS, CHAT_STOP, COMPLETION_FIELDS, COMPLETIONS_DEFAULT_MAX_TOKENS,
                                   ApiError, EventStream, Generation, Service, boolean_field,
                                   integer_field, read_json)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
API_KEY_ENV = "GROK1_API_KEY"
TOKENIZER_PATHS = ("/tokenize", "/detokenize", "/tokenizer_info")   # guarded by the key like /v1/*


def api_key_from(api_key: Optional[str] = None, metrics_need_key: bool = False) -> Optional[str]:
    """The key requests to /v1/* must bear: `api_key`, else $GROK1_API_KEY when set and not
    empty, else None (no key). ValueError for a key that cannot travel in an HTTP header (the
    message never shows the key), or for `metrics_need_key` without a key."""
    source = "api_key"
    if api_key is None:
        api_key, source = os.environ.get(API_KEY_ENV) or None, f"${API_KEY_ENV}"
    if api_key is not None and (not isinstance(api_key, str) or not api_key
                                or not all("!" <= c <= "~" for c in api_key)):
        raise ValueError(f"{source} must be a non-empty string of printable ASCII characters "
                         f"without spaces (it travels in the Authorization header)")
    if metrics_need_key and api_key is None:
        raise ValueError(f"metrics_need_key needs an API key: give api_key or set ${API_KEY_ENV}")
    return api_key


def build_app(engine: Engine, model_name: str, api_key: Optional[str] = None,
              metrics_need_key: bool = False) -> Starlette:
    """The Starlette app serving `engine` under `model_name`. The engine must be started (the
    app's lifespan starts it, and closes it at shutdown). With an API key (`api_key_from`),
    requests to /v1/*, and to /metrics when `metrics_need_key`, must bear it."""
    key = api_key_from(api_key, metrics_need_key)
    service = Service(engine, model_name)

    async def generation(request: HttpRequest, chat: bool) -> Response:
        body = await read_json(request)
        if chat:
            body = service.check_fields(body, CHAT_FIELDS, ("model", "messages"))
            top_n = evaluation.check_chat_top_logprobs(body)
            logprobs = boolean_field(body, "logprobs")
            if "max_tokens" in body and "max_completion_tokens" in body:
                raise ApiError(400, "give max_tokens or max_completion_tokens, not both", "max_tokens")
            name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
            max_tokens, default = integer_field(body, name, None, 1, service.config.sequence_len), None
            prompts = [service.chat_prompt(body)]
            settings = service.settings(body, max_tokens, logprobs, extra_stop=(CHAT_STOP,))
        else:
            body = service.check_fields(body, COMPLETION_FIELDS, ("model", "prompt"))
            echo, wanted = evaluation.check_completion_scoring(body)
            if body.get("suffix"):
                raise ApiError(400, "suffix is not supported: this model does not fill in the middle",
                               "suffix")
            if integer_field(body, "best_of", 1, 1, 1) != 1:
                raise ApiError(400, "best_of must be 1", "best_of")
            max_tokens = integer_field(body, "max_tokens", None, 0 if echo else 1,
                                       service.config.sequence_len)
            default = COMPLETIONS_DEFAULT_MAX_TOKENS
            prompts = service.completion_prompts(body)
            if max_tokens == 0:   # echo: score the prompts, generate nothing
                service.check_count(len(prompts))
                return await evaluation.prompt_scores(service, body, prompts, wanted)
            settings = service.settings(body, max_tokens, wanted is not None)
        service.check_count(len(prompts) * len(settings))
        generation = Generation(service, chat, body, prompts, settings, default)
        events = generation.start(asyncio.get_running_loop())
        if chat and top_n:
            return await evaluation.chat_with_top_logprobs(service, request, generation, events, top_n)
        if not chat and (echo or wanted):
            return await evaluation.scored_completions(service, request, generation, events, prompts,
                                                       echo, wanted)
        if generation.stream:
            return EventStream(generation.events(events), on_close=generation.cancel)
        return await generation.gather(request, events)

    async def completions(request: HttpRequest) -> Response:
        return await generation(request, chat=False)

    async def chat_completions(request: HttpRequest) -> Response:
        return await generation(request, chat=True)

    async def tokenize(request: HttpRequest) -> Response:
        return await evaluation.tokenize(service, request)

    async def detokenize(request: HttpRequest) -> Response:
        return await evaluation.detokenize(service, request)

    async def tokenizer_info(request: HttpRequest) -> Response:
        return await evaluation.tokenizer_info(service, request)

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
              Route("/tokenize", tokenize, methods=["POST"]),
              Route("/detokenize", detokenize, methods=["POST"]),
              Route("/tokenizer_info", tokenizer_info, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: api_error, HTTPException: http_error,
                                        ClientDisconnect: client_gone, Exception: server_error})
    if key is not None:
        app = RequireKey(app, key, metrics_need_key)
    return CountResponses(app, service.http_responses)


class RequireKey:
    """ASGI middleware: a request to /v1/* (and /metrics when `metrics_need_key`) without
    `Authorization: Bearer <key>` gets 401, code "invalid_api_key"; the key is compared in
    constant time (hmac.compare_digest)."""

    def __init__(self, app, key: str, metrics_need_key: bool):
        self.app, self.key, self.metrics_need_key = app, key.encode(), metrics_need_key

    def __getattr__(self, name):
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.guards(scope["path"]):
            refusal = self.refusal(next((v for k, v in scope["headers"] if k == b"authorization"), None))
            if refusal is not None:
                error = ApiError(401, refusal, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)

    def guards(self, path: str) -> bool:
        return (path == "/v1" or path.startswith("/v1/") or path in TOKENIZER_PATHS
                or (self.metrics_need_key and path == "/metrics"))

    def refusal(self, header: Optional[bytes]) -> Optional[str]:
        """Why a request with this Authorization header is refused; None when its key is right."""
        scheme, _, token = (header or b"").strip().partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return "this server needs an API key: send the header Authorization: Bearer <key>"
        if not hmac.compare_digest(token.strip(), self.key):
            return "the API key is wrong: send the server's key as Authorization: Bearer <key>"
        return None


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
        "# HELP grok1_requests_finished_total Requests ended, by reason (stop, length, scored, "
        "cancelled, aborted, error).",
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
          log_level: str = "info", sock: Optional[socket.socket] = None, api_key: Optional[str] = None,
          metrics_need_key: bool = False) -> None:
    """Serve `model` on host:port (or the listening `sock`) until SIGTERM or Ctrl-C (blocking).
    The serving steps are compiled first (a line on stderr says so, unless `log_level` hides
    info); running requests end with a final event at shutdown, then the port is freed. With an
    API key (`api_key`, else $GROK1_API_KEY), requests to /v1/* (and /metrics when
    `metrics_need_key`) must bear it (module docstring).

    On a cluster (`grok1.distributed`) every process calls this with the same settings: process 0
    serves HTTP, the others follow its engine's steps (`Engine.follow`) and return when it stops."""
    key = api_key_from(api_key, metrics_need_key)   # a bad key fails before anything compiles
    engine = Engine(model, slots=slots, decode_chunk=decode_chunk, max_waiting=max_waiting,
                    lead_followers=True)
    main = is_main_process()
    app = build_app(engine, model_name, key, metrics_need_key) if main else None
    warm_up(engine, say=main and _shows_info(log_level))
    if not main:
        engine.follow()
        return
    sock = sock or bind(host, port)
    host, port = sock.getsockname()[:2]
    if jax.process_count() > 1:
        # uvicorn stops on SIGTERM, then raises it again; by default that ends this process at
        # once, and with it the cluster's coordination service while the others are still
        # leaving (their JAX client then aborted). As SystemExit, the exit runs JAX's shutdown,
        # which waits for them.
        signal.signal(signal.SIGTERM, _exit_on_signal)
    print(f"serving {model_name!r} on http://{_url_host(host)}:{port}/v1 ({engine.slots} slots"
          f"{', API key required' if key else ''})", flush=True)
    _uvicorn_server(app, engine, log_level).run(sockets=[sock])


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def warm_up(engine: Engine, say: bool) -> None:
    """`engine.warm_up()`, timed in one line on stderr when `say`."""
    start = time.monotonic()
    if say:
        print("grok1: compiling the serving steps (or loading them from the compilation cache) ...",
              end="", file=sys.stderr, flush=True)
    engine.warm_up()
    if say:
        print(f" done in {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)


def _shows_info(log_level: Any) -> bool:
    """Whether uvicorn's `log_level` (a name or a logging level) shows info messages."""
    if isinstance(log_level, int):
        return log_level <= 20
    return str(log_level).lower() in ("trace", "debug", "info")


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
    `.stop()`. It listens once its serving steps are compiled; `api_key` and `metrics_need_key`
    as in `serve`."""

    def __init__(self, model: Any, host: str = DEFAULT_HOST, port: int = 0, slots: int = DEFAULT_SLOTS,
                 model_name: str = "grok-1", max_waiting: int = DEFAULT_MAX_WAITING,
                 decode_chunk: int = 1, log_level: str = "warning", api_key: Optional[str] = None,
                 metrics_need_key: bool = False):
        self.engine = Engine(model, slots=slots, decode_chunk=decode_chunk, max_waiting=max_waiting)
        self.model_name = model_name
        app = build_app(self.engine, model_name, api_key, metrics_need_key)
        warm_up(self.engine, say=_shows_info(log_level))
        self._socket = bind(host, port)
        self.url = f"http://{_url_host(host)}:{self._socket.getsockname()[1]}"
        self._server = _uvicorn_server(app, self.engine, log_level)
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
