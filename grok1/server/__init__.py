"""The OpenAI-compatible server: `serve` (until stopped), `BackgroundServer` (in a thread, for
tests and notebooks), `build_app` (the ASGI app), `api_key_from` (the key a server will require,
checked). The HTTP side is app.py; what a request may ask and what it gets back is protocol.py."""

from grok1.server.app import (API_KEY_ENV, DEFAULT_HOST, DEFAULT_PORT, BackgroundServer, api_key_from, bind,
                              build_app, serve)

__all__ = ["API_KEY_ENV", "DEFAULT_HOST", "DEFAULT_PORT", "BackgroundServer", "api_key_from", "bind",
           "build_app", "serve"]
