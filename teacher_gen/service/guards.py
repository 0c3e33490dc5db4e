"""ASGI middlewares that refuse a request before the app reads it: too large a body, a foreign Host,
a missing bearer token.

`BodyLimit` answers 413 to a body over `--max-body-bytes`: at once when Content-Length says so,
else as soon as the bytes read (a chunked body has no Content-Length) pass the limit, so a client
cannot make the service buffer an unbounded body. `HostCheck` answers 400 to a Host header that
is not one of the service's names: a web page a browser on the service's machine visits cannot
reach a token-less service through DNS rebinding (its requests carry the attacker's host name).

`TokenCheck` answers 401 to a request without the service's bearer token. All three are plain ASGI
middlewares: Starlette's `BaseHTTPMiddleware` (`@app.middleware("http")`) would wrap the body stream
and turn `BodyLimit`'s 413 into FastAPI's 400 "error parsing the body".

All answer with the service's usual `{"detail": "<one line>"}` body. They are written here, not
taken from Starlette: its `TrustedHostMiddleware` answers in plain text, and its body limit (like
FastAPI's `max_body_size`) needs newer Starlette / FastAPI releases than potstill requires and
than the vLLM image ships.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")

Scope = dict[str, Any]


class BodyTooLarge(HTTPException):
    """Raised from `receive`: FastAPI lets an HTTPException from reading the body through, and its
    handler answers it; a request that is not answered yet when it escapes is answered here."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than this service's limit of {limit:,} bytes (--max-body-bytes)")


class BodyLimit:
    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _answer(scope, receive, send, BodyTooLarge(self.max_bytes))
            return
        received = 0
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracked_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except BodyTooLarge as e:
            if started:
                raise
            await _answer(scope, receive, send, e)


class HostCheck:
    def __init__(self, app: Any, allowed: Iterable[str]) -> None:
        self.app = app
        self.allowed = frozenset(name.lower() for name in allowed)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # lifespan; the app has no websocket routes
            await self.app(scope, receive, send)
            return
        host = host_name(_header(scope, b"host") or "")
        if host not in self.allowed:
            shown = host[:100] if host.isprintable() else repr(host[:100])
            detail = (f"host {shown!r} is not a name of this service; a service without a token answers only "
                      "to its loopback names and --host (add others with --allow-host)")
            await _answer(scope, receive, send, HTTPException(400, detail))
            return
        await self.app(scope, receive, send)


class TokenCheck:
    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.expected = token.encode()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scheme, _, given = (_header(scope, b"authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("latin-1"), self.expected):
            response = JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def allowed_hosts(bound_host: str, extra: Iterable[str]) -> list[str]:
    """The Host names a service answers to: loopback, the address it listens on, and the operator's."""
    return list(dict.fromkeys([*LOOPBACK_NAMES, bound_host.strip("[]").lower(), *extra]))


def host_name(header: str) -> str:
    """'Example.org:8000' -> 'example.org', '[::1]:8000' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _answer(scope: Scope, receive: Any, send: Any, error: HTTPException) -> None:
    response = JSONResponse({"detail": error.detail}, status_code=error.status_code)
    await response(scope, receive, send)
