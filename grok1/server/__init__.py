"""The OpenAI-compatible server: `serve` (until stopped), `BackgroundServer` (in a thread, for
tests and notebooks), `build_app` (the ASGI app). The HTTP side is app.py; what a request may ask
and what it gets back is protocol.py."""

from grok1.server.app import DEFAULT_HOST, DEFAULT_PORT, BackgroundServer, bind, build_app, serve

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "BackgroundServer", "bind", "build_app", "serve"]
