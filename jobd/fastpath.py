"""The fast path: job status reads answered without h11 and the ASGI stack.

A status poll (`GET /api/get/{id}` of the classic protocol, `GET /api/v1/jobs/{id}` of the
native API) is what many clients send in a loop, and through uvicorn's h11 parser, the
Starlette middleware and the router it costs about ten times what producing the answer does.
`Connection` (connection.py) hands each complete request head to `FastPath.answer` while the
connection is between requests; when the request is one of those reads, in its simplest form,
the answer is the route's own endpoint called with a Starlette `Request` built here, and
written out with the bytes uvicorn would send (status line, uvicorn's `date`, the response's
headers, the body). Anything else returns None and the request goes the normal way, as do
all that follow it on the connection until it is idle again.

What the fast path serves: `GET`, HTTP/1.1, a target that is exactly one of the two route
prefixes plus a job id (`[A-Za-z0-9][A-Za-z0-9._-]{0,127}`, so nothing to percent-decode and
no query string), exactly one `Host` header, and other headers in plain ASCII. It falls back
on `Content-Length`, `Transfer-Encoding`, `Expect`, `Upgrade`, `Connection` other than
`keep-alive`, `X-Forwarded-*` and `Forwarded` (the proxy-headers middleware would change the
client address), a head longer than JOBD_MAX_URL or JOBD_MAX_HEADER allow (RequestLimits
answers those), credentials the authenticator refuses (AuthMiddleware answers 401), an
endpoint that awaits, raises, or answers with a streamed body (a result over 256 KiB), and
a response with headers of its own about the connection.

What it keeps the same as the normal path, by calling the same code: the authenticator
(`Authenticator.authenticate` on the same headers and TLS extension), owner scoping and
per-job secrets (the endpoint's `JobManager.get(id, client_of(request))`), the body (the
endpoint renders it), the `/metrics` request counters (`Metrics.observe_request` with the
route's template) and the access log line (`app.RequestLog.note`).

Classic answers (the record plus the base64 of result.zip, read from disk) are cached per
request and reused while the job's record is unchanged (`AnswerCache`); the native job view
is rendered each time.

At start (`FastPath.of`) it checks the routing table: each prefix must be served by a `GET`
route with that template and nothing before it may match; the app's middleware must be the
ones above. Otherwise that route, or the whole fast path, stays off.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES

from jobd import auth, metrics

log = logging.getLogger("jobd.http")

# The routes served, by target prefix: the path template must follow the prefix with `{id}`.
PREFIXES = ("/api/get/", "/api/v1/jobs/")

_REQUEST_LINE = re.compile(
    rb"GET (" + b"|".join(re.escape(p.encode()) for p in PREFIXES) +
    rb")([A-Za-z0-9][A-Za-z0-9._-]{0,127}) HTTP/1\.1")
# A header line: a token, then a value of printable ASCII (inner spaces allowed; no tabs,
# no obs-text: a subset of what h11 accepts, anything else goes to h11, which decides).
_HEADER = re.compile(
    rb"([-!#$%&'*+.^_`|~0-9a-zA-Z]+):[ \t]*([\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?)?[ \t]*")
# Request headers that change framing, the client address or the connection: h11's business.
_NOT_HERE = frozenset({b"content-length", b"transfer-encoding", b"expect", b"upgrade",
                       b"forwarded", b"x-forwarded-for", b"x-forwarded-proto",
                       b"x-forwarded-host", b"x-forwarded-port", b"te"})
# Response headers that would make h11 do more than write them out.
_RESPONSE_NOT_HERE = frozenset({b"connection", b"transfer-encoding"})


class _StatusLines(dict[int, bytes]):
    """`HTTP/1.1 <code> <phrase>\\r\\n` by status code, each made when first answered: the
    fast path answers with a handful of codes, and all 500 made up front cost idle memory."""

    def __missing__(self, code: int) -> bytes:
        line = self[code] = b"HTTP/1.1 %d %s\r\n" % (code, STATUS_PHRASES[code])
        return line


STATUS_LINES = _StatusLines()


class Endpoint:
    """One route the fast path serves: its template, the function the router calls, and
    what its answer reads besides the job record (`reads(manager, job_id)`: files whose
    change changes the answer; None: the answer is never cached, e.g. it depends on the
    time)."""

    def __init__(self, prefix: str, call: Callable[[Request], Any],
                 reads: Callable[[Any, str], list[Path]] | None) -> None:
        self.prefix = prefix
        self.template = prefix + "{id}"
        self.call = call
        self.reads = reads


def _classic_reads(manager: Any, job_id: str) -> list[Path]:
    """classic.get answers from the record and result.zip (inlined up to 256 KiB)."""
    return [manager.files(job_id).result]


# What each route's answer depends on besides the record and the request (see Endpoint).
# The native job view shows a running job's duration up to now: not cached.
READS: dict[str, Callable[[Any, str], list[Path]] | None] = {
    "/api/get/": _classic_reads, "/api/v1/jobs/": None}


class Cached:
    """One answer and the state it was rendered from."""

    __slots__ = ("body_size", "checked", "paths", "record", "stats", "status", "tail")

    def __init__(self, status: int, tail: bytes, body_size: int) -> None:
        self.record: Any = None
        self.paths: list[str] = []
        self.stats: list[Any] = []
        self.checked = 0.0  # time.monotonic() when `stats` were last compared
        self.status = status
        self.tail = tail  # the response's own headers, the blank line and the body
        self.body_size = body_size


def _stat(path: str) -> tuple[int, int, int] | int:
    """What identifies a file's content cheaply, or the errno that stat gave."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return exc.errno or -1
    return st.st_ino, st.st_size, st.st_mtime_ns


class AnswerCache:
    """Rendered answers by request (route, id, caller, headers), valid while the job's
    record (a copy from the store, compared whole) and the files it reads are unchanged.

    jobd changes a job's files only together with its record (result.zip is written before
    the job's final status and removed by restart and delete, which change the record), so
    the record decides at once; the files are compared again at most every `recheck`
    seconds, for changes made behind jobd's back. Bounded: answers up to `max_body` bytes,
    at most `max_entries` and `max_bytes` in all (the oldest go first)."""

    def __init__(self, max_entries: int = 1024, max_bytes: int = 8 << 20,
                 max_body: int = 64 << 10, recheck: float = 1.0) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_body = max_body
        self.recheck = recheck
        self.entries: dict[Any, Cached] = {}
        self.size = 0

    def get(self, key: Any, record: Any) -> Cached | None:
        entry = self.entries.get(key)
        if entry is None or entry.record != record:
            return None
        now = time.monotonic()
        if now - entry.checked > self.recheck:
            if [_stat(p) for p in entry.paths] != entry.stats:
                return None
            entry.checked = now
        return entry

    def put(self, key: Any, entry: Cached) -> None:
        if len(entry.tail) > self.max_body:
            return
        old = self.entries.pop(key, None)
        if old is not None:
            self.size -= len(old.tail)
        while self.entries and (len(self.entries) >= self.max_entries
                                or self.size + len(entry.tail) > self.max_bytes):
            self.size -= len(self.entries.pop(next(iter(self.entries))).tail)
        self.entries[key] = entry
        self.size += len(entry.tail)


class FastPath:
    """Answers status reads on a connection's behalf (see the module notes)."""

    def __init__(self, app: Any, endpoints: dict[bytes, Endpoint], *, max_head: int,
                 note: Callable[[dict[str, Any], int, float], None] | None) -> None:
        self.app = app
        self.endpoints = endpoints
        self.max_head = max_head
        self.note = note  # the access log's RequestLog.note, or None
        self.authenticator: auth.Authenticator = app.state.authenticator
        self.metrics: metrics.Metrics = app.state.metrics
        self.manager: Any = None
        self.cache = AnswerCache()
        self._defaults: list[tuple[bytes, bytes]] | None = None
        self._defaults_bytes = b""

    @classmethod
    def of(cls, app: Any, config: Any) -> FastPath | None:
        """The fast path for `app` (a Starlette app from `create_app`), or None when its
        middleware is not the set the fast path mirrors."""
        from jobd.app import RequestLog
        from jobd.limits import RequestLimits

        mirrored = {metrics.HTTPMetrics, auth.AuthMiddleware, RequestLimits, RequestLog}
        stack: Sequence[Middleware] = getattr(app, "user_middleware", ())
        unknown = [m.cls for m in stack if m.cls not in mirrored]
        if unknown:
            log.info("fast path off: middleware %s", ", ".join(map(str, unknown)))
            return None
        endpoints: dict[bytes, Endpoint] = {}
        for prefix in PREFIXES:
            found = _endpoint(app.routes, prefix)
            if found is None:
                log.info("fast path for %s{id} off: the routing table serves it otherwise",
                         prefix)
            else:
                endpoints[prefix.encode()] = found
        if not endpoints:
            return None
        return cls(app, endpoints, max_head=min(config.max_url, config.max_header),
                   note=RequestLog.note if RequestLog in (m.cls for m in stack) else None)

    def answer(self, head: bytes, conn: Any) -> bytes | None:
        """The whole response to the request `head` (without its final CRLF CRLF), or None
        when the normal path must serve it. `conn` is the Connection (addresses, TLS,
        uvicorn's default headers)."""
        if len(head) > self.max_head:
            return None
        lines = head.split(b"\r\n")
        line = _REQUEST_LINE.fullmatch(lines[0])
        if line is None:
            return None
        prefix, raw_id = line.groups()
        endpoint = self.endpoints.get(prefix)
        manager = self.manager
        if manager is None:  # set by the app's lifespan: until then, the normal path
            manager = self.manager = getattr(self.app.state, "manager", None)
        if endpoint is None or manager is None:
            return None
        headers = []
        hosts = 0
        for raw in lines[1:]:
            field = _HEADER.fullmatch(raw)
            if field is None:
                return None
            name = field.group(1).lower()
            value = field.group(2) or b""
            if name in _NOT_HERE:
                return None
            if name == b"host":
                hosts += 1
            elif name == b"connection" and value.lower() != b"keep-alive":
                return None
            headers.append((name, value))
        if hosts != 1:
            return None
        started = time.perf_counter()
        job_id = raw_id.decode("ascii")
        path = endpoint.prefix + job_id
        scope = None
        client = auth.ANONYMOUS
        if self.authenticator.enabled:
            scope = self._scope(conn, path, job_id, headers)
            try:
                client = self.authenticator.authenticate(scope)
            except auth.Unauthorized:
                return None  # AuthMiddleware answers (and logs) the 401
            scope["state"]["client"] = client
        if endpoint.reads is not None:
            key = (prefix, job_id, client, tuple(headers))
            record = manager.store.get(job_id)
            entry = self.cache.get(key, record)
            if entry is None:
                paths = [str(p) for p in endpoint.reads(manager, job_id)]
                stats = [_stat(p) for p in paths]
                if scope is None:
                    scope = self._scope(conn, path, job_id, headers, client)
                entry = self._render(endpoint, scope)
                if entry is None:
                    return None
                # a copy of its own: equality must hold against later states even if the
                # store ever handed out a live record
                entry.record, entry.paths, entry.stats = copy.deepcopy(record), paths, stats
                entry.checked = time.monotonic()
                self.cache.put(key, entry)
        else:
            if scope is None:
                scope = self._scope(conn, path, job_id, headers, client)
            entry = self._render(endpoint, scope)
            if entry is None:
                return None
        status = entry.status
        answer = b"".join((STATUS_LINES[status], self._default_headers(conn), entry.tail))
        self.metrics.observe_request("GET", endpoint.template, status, 0, entry.body_size)
        self.metrics.observe_fast(endpoint.template)
        if self.note is not None:
            self.note(scope or {"client": conn.client, "method": "GET", "path": path,
                                "state": {"client": client}}, status, started)
        return answer

    def _scope(self, conn: Any, path: str, job_id: str, headers: list[tuple[bytes, bytes]],
               client: auth.Client | None = None) -> dict[str, Any]:
        """The ASGI scope uvicorn and the router would give the endpoint (after the
        middleware: `state["client"]` is the caller)."""
        scope: dict[str, Any] = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "server": conn.server, "client": conn.client,
            "scheme": conn.scheme, "method": "GET", "root_path": "", "path": path,
            "raw_path": path.encode("ascii"), "query_string": b"", "headers": headers,
            "state": conn.app_state.copy(), "app": self.app, "path_params": {"id": job_id},
        }
        if conn.tls is not None:
            scope["extensions"] = {"tls": dict(conn.tls)}
        if client is not None:
            scope["state"]["client"] = client
        return scope

    def _render(self, endpoint: Endpoint, scope: dict[str, Any]) -> Cached | None:
        """The endpoint's answer as bytes after uvicorn's default headers, or None."""
        response = _run(endpoint.call, Request(scope))
        if response is None:
            return None
        own = []
        for name, value in response.raw_headers:
            if name in _RESPONSE_NOT_HERE:
                return None
            own.append(b"%s: %s\r\n" % (name, value))
        own.append(b"\r\n")
        own.append(response.body)
        return Cached(response.status_code, b"".join(own), len(response.body))

    def _default_headers(self, conn: Any) -> bytes:
        """uvicorn's default headers (`date`), as bytes; the same list gives the same bytes."""
        defaults = conn.server_state.default_headers
        if defaults is not self._defaults:
            self._defaults_bytes = b"".join(b"%s: %s\r\n" % (n, v) for n, v in defaults)
            self._defaults = defaults
        return self._defaults_bytes


def _endpoint(routes: Sequence[Any], prefix: str) -> Endpoint | None:
    """The endpoint of `GET {prefix}{id}` if a plain route with that template serves it."""
    template = prefix + "{id}"
    probe = {"type": "http", "method": "GET", "path": prefix + "x", "root_path": ""}
    if metrics.route_template(routes, probe) != template:
        return None
    for route in routes:
        if isinstance(route, Route) and route.path == template and \
                "GET" in (route.methods or ()):
            return Endpoint(prefix, route.endpoint, READS[prefix])
    return None


def _run(call: Callable[[Request], Any], request: Request) -> Response | None:
    """The endpoint's response when it completes without waiting for anything and answers
    with a body in memory; else None (nothing is lost: these endpoints only read)."""
    coroutine = call(request)
    try:
        coroutine.send(None)
    except StopIteration as done:
        response = done.value
    except Exception:  # the normal path runs it again and answers as it always does
        log.debug("fast path: %s raised; the normal path serves it", request.url.path,
                  exc_info=True)
        return None
    else:
        coroutine.close()  # it waits for something: the normal path serves it
        return None
    if not isinstance(response, Response) or type(response).__call__ is not Response.__call__ \
            or response.background is not None or not isinstance(response.body, bytes):
        return None
    return response
