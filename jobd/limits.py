"""What one HTTP request may cost: target and header size, body size, body pace.

uvicorn bounds a request head only while it arrives in pieces (h11's buffer, JOBD_MAX_HEADER)
and watches idle time only between requests, so:
- `RequestLimits`, a pure ASGI middleware, refuses a long target (414) or a large head that
  arrived in one read (431), whatever route it was for;
- `body()` is how upload routes read a body: it stops at JOBD_MAX_BODY (413) and at a client
  that sends too slowly (408): no more than JOBD_BODY_TIMEOUT between two pieces, and on
  average at least JOBD_MIN_BODY_RATE bytes a second once JOBD_BODY_TIMEOUT has passed. A
  slow-body client (slowloris) therefore holds a connection for a bounded time.
`BodyTooLarge` and `BodyTimeout` have app-wide handlers (`handlers`), so a route that does not
catch them still answers in the error shape, with `Connection: close` (the rest of the body
is never read).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from jobd.errors import error

log = logging.getLogger("jobd.http")

CLOSE = {"Connection": "close"}


class BodyTooLarge(Exception):
    """The request body passed its size limit."""

    def __init__(self, limit: int = 0) -> None:
        super().__init__(f"request body is larger than {limit} bytes")
        self.limit = limit


class BodyTimeout(Exception):
    """The request body arrives too slowly; the message says which limit it broke."""


@dataclass(frozen=True)
class Pace:
    """Limits on reading one request body (from the Config settings of the same names)."""

    max_body: int = 8 << 30
    body_timeout: float = 60.0
    min_body_rate: int = 1 << 10

    @classmethod
    def of(cls, config: Any) -> Pace:
        return cls(config.max_body, config.body_timeout, config.min_body_rate)


def pace_of(request: Request) -> Pace:
    """The app's pace (`create_app` sets `app.state.pace`), or the defaults."""
    pace = getattr(request.app.state, "pace", None)
    return pace if isinstance(pace, Pace) else Pace()


async def body(request: Request, max_body: int | None = None) -> AsyncIterator[bytes]:
    """The request body in pieces, within the size and pace limits (see the module notes).

    Raises BodyTooLarge (also when Content-Length already says so), BodyTimeout, or
    starlette's ClientDisconnect.
    """
    pace = pace_of(request)
    limit = pace.max_body if max_body is None else max_body
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    loop = asyncio.get_running_loop()
    started = loop.time()
    received = 0
    while True:
        wait = pace.body_timeout
        rate_bound = False
        if pace.min_body_rate > 0:
            # `received` bytes satisfy the minimum rate until this moment
            until = started + pace.body_timeout + received / pace.min_body_rate - loop.time()
            if until < wait:
                wait, rate_bound = until, True
        try:
            if wait <= 0:
                raise asyncio.TimeoutError
            message = await asyncio.wait_for(request.receive(), wait)
        except asyncio.TimeoutError:
            if rate_bound:
                raise BodyTimeout(f"request body arrives slower than {pace.min_body_rate} "
                                  f"bytes/s ({received} bytes in "
                                  f"{loop.time() - started:.0f}s)") from None
            raise BodyTimeout(f"no request body data for {pace.body_timeout:g}s "
                              f"({received} bytes received)") from None
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > limit:
            raise BodyTooLarge(limit)
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


# -- app-wide handlers ------------------------------------------------------------------------


async def _too_large(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BodyTooLarge)
    return error(413, str(exc), headers=CLOSE)


async def _too_slow(request: Request, exc: Exception) -> Response:
    log.info("%s %s: %s", request.method, request.url.path, exc)
    return error(408, str(exc), headers=CLOSE)


async def _disconnected(request: Request, exc: Exception) -> Response:
    """The client went away mid-body: nobody reads the answer, one log line is enough."""
    log.info("%s %s: the client disconnected before the body ended", request.method,
             request.url.path)
    return error(400, "client disconnected", headers=CLOSE)


handlers = {BodyTooLarge: _too_large, BodyTimeout: _too_slow, ClientDisconnect: _disconnected}


# -- request target and head ------------------------------------------------------------------


class RequestLimits:
    """Refuse a request target longer than `max_url` (414) or a head larger than `max_header`
    (431) before any route sees it."""

    def __init__(self, app: ASGIApp, *, max_url: int, max_header: int) -> None:
        self.app = app
        self.max_url = max_url
        self.max_header = max_header

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = self.problem(scope)
            if problem is not None:
                await error(*problem, headers=CLOSE)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def problem(self, scope: Scope) -> tuple[int, str] | None:
        raw_path = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
        query = scope.get("query_string") or b""
        target = len(raw_path) + (len(query) + 1 if query else 0)
        if target > self.max_url:
            return 414, f"request target is longer than {self.max_url} bytes"
        head = target + sum(len(name) + len(value) + 4 for name, value in scope["headers"])
        if head > self.max_header:
            return 431, f"request headers are larger than {self.max_header} bytes"
        return None
