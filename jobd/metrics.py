"""`GET /metrics` in the Prometheus text exposition format (0.0.4), in plain Python.

What is exposed, and where it comes from:
- `jobd_jobs{status}`, `jobd_queue_length`, `jobd_running_jobs`, `jobd_slots`: read from the
  store's status index and the scheduler at scrape time (O(statuses), not O(jobs));
- `jobd_job_duration_seconds{status}`: a histogram observed when a job that ran ends (a
  `JobManager.job_end_listeners` hook), from `started` to `finished`;
- `jobd_http_requests_total{method,route,code}` and the body bytes received and sent per
  route (`jobd_http_request_body_bytes_total` is bytes in: uploads;
  `jobd_http_response_body_bytes_total` bytes out: results served), counted by the `HTTPMetrics`
  ASGI middleware. Routes are the routing table's templates (`/api/get/{id}`), never raw
  paths, and `other` for paths no route matches, so the number of series stays bounded;
- `jobd_http_fast_path_requests_total{route}`: of those, the status reads the connection
  layer answered itself (fastpath.py), which counts them in the series above as well.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobd import job

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 12 * 3600.0,
                    24 * 3600.0)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER = "other"


class Histogram:
    """Cumulative buckets, sum and count, per label value."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(sorted(buckets))
        self.series: dict[str, tuple[list[int], list[float]]] = {}

    def observe(self, label: str, value: float) -> None:
        counts, total = self.series.setdefault(label, ([0] * (len(self.buckets) + 1), [0.0]))
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
        counts[-1] += 1  # +Inf, which is also the count
        total[0] += value


class Metrics:
    """The daemon's counters; `render` adds the gauges read at scrape time."""

    def __init__(self) -> None:
        self.started = time.time()
        self.requests: dict[tuple[str, str, str], int] = {}
        self.bytes_in: dict[str, int] = {}
        self.bytes_out: dict[str, int] = {}
        self.fast: dict[str, int] = {}
        self.durations = Histogram(DURATION_BUCKETS)

    def observe_request(self, method: str, route: str, code: int, received: int,
                        sent: int) -> None:
        key = (method if method in _METHODS else OTHER, route, str(code))
        self.requests[key] = self.requests.get(key, 0) + 1
        if received:
            self.bytes_in[route] = self.bytes_in.get(route, 0) + received
        if sent:
            self.bytes_out[route] = self.bytes_out.get(route, 0) + sent

    def observe_fast(self, route: str) -> None:
        """A request the fast path answered (also counted by `observe_request`)."""
        self.fast[route] = self.fast.get(route, 0) + 1

    def observe_job(self, record: dict[str, Any]) -> None:
        """A job-end listener: the run time of a job that ran."""
        started, finished = record.get("started"), record.get("finished")
        if isinstance(started, (int, float)) and isinstance(finished, (int, float)):
            self.durations.observe(record["status"], max(0.0, finished - started))

    def render(self, manager: Any) -> str:
        """The exposition text; `manager` is the JobManager (None before it started)."""
        out: list[str] = []
        if manager is not None:
            counts = manager.store.counts()
            _family(out, "jobd_jobs", "gauge", "Jobs in the database by status.",
                    ((f'{{status="{s}"}}', counts.get(s, 0)) for s in job.STATUSES))
            scheduler = manager.scheduler
            _family(out, "jobd_queue_length", "gauge", "Queued jobs waiting for a slot.",
                    [("", scheduler.queue_length)])
            _family(out, "jobd_running_jobs", "gauge", "Jobs running now.",
                    [("", scheduler.running_count)])
            _family(out, "jobd_slots", "gauge", "Jobs that may run at once.",
                    [("", scheduler.slots)])
            syncer = manager.store.syncer
            _family(out, "jobd_fsync_helper_running", "gauge",
                    "1 while commits go to the fsync helper process (it stops when idle).",
                    [("", int(syncer is not None and syncer.running))])
            _family(out, "jobd_fsync_helper_deaths_total", "counter",
                    "fsync helpers that ended unasked (after 3, commits use threads).",
                    [("", syncer.deaths if syncer is not None else 0)])
        _family(out, "jobd_start_time_seconds", "gauge",
                "When the daemon started, in seconds since the epoch.", [("", self.started)])
        self._render_histogram(out)
        _family(out, "jobd_http_requests_total", "counter",
                "HTTP requests by method, route template and status code.",
                ((_labels(method=m, route=r, code=c), n)
                 for (m, r, c), n in sorted(self.requests.items())))
        _family(out, "jobd_http_request_body_bytes_total", "counter",
                "Request body bytes received, by route (uploads are bytes in).",
                ((_labels(route=r), n) for r, n in sorted(self.bytes_in.items())))
        _family(out, "jobd_http_response_body_bytes_total", "counter",
                "Response body bytes sent, by route (results served are bytes out).",
                ((_labels(route=r), n) for r, n in sorted(self.bytes_out.items())))
        _family(out, "jobd_http_fast_path_requests_total", "counter",
                "Of the HTTP requests, the status reads answered by the fast path, by route.",
                ((_labels(route=r), n) for r, n in sorted(self.fast.items())))
        return "\n".join(out) + "\n"

    def _render_histogram(self, out: list[str]) -> None:
        name = "jobd_job_duration_seconds"
        out.append(f"# HELP {name} Run time of jobs that ran, by final status.")
        out.append(f"# TYPE {name} histogram")
        bounds = [*(_number(b) for b in self.durations.buckets), "+Inf"]
        for status, (counts, total) in sorted(self.durations.series.items()):
            for bound, count in zip(bounds, counts):
                out.append(f"{name}_bucket{_labels(status=status, le=bound)} {count}")
            out.append(f"{name}_sum{_labels(status=status)} {_number(total[0])}")
            out.append(f"{name}_count{_labels(status=status)} {counts[-1]}")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _family(out: list[str], name: str, kind: str, help_text: str,
            samples: Iterable[tuple[str, float]]) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        out.append(f"{name}{labels} {_number(value)}")


# -- the route of a request -------------------------------------------------------------------


def route_template(routes: Sequence[BaseRoute], scope: Scope, prefix: str = "") -> str:
    """The path template of the route that serves `scope` (a method mismatch counts), or
    `other`. Mounts are followed, their templates joined."""
    partial = None
    for route in routes:
        match, child = route.matches(scope)
        if match == Match.NONE:
            continue
        if isinstance(route, Mount):
            inner = route_template(route.routes, {**scope, **child}, prefix + route.path)
            if inner != OTHER:
                return inner
            continue
        path = getattr(route, "path", None)
        if path is None:
            continue
        if match == Match.FULL:
            return prefix + path
        if partial is None:
            partial = prefix + path
    return partial if partial is not None else OTHER


class HTTPMetrics:
    """ASGI middleware: counts requests and body bytes by route template and status code."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        app = scope.get("app")
        routes = getattr(app, "routes", ())
        route = route_template(routes, scope)
        status = 500  # what the client gets if the app fails before answering
        received = sent = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            self.metrics.observe_request(scope["method"], route, status, received, sent)


async def endpoint(request: Request) -> Response:
    metrics: Metrics = request.app.state.metrics
    manager = getattr(request.app.state, "manager", None)
    return Response(metrics.render(manager), media_type=CONTENT_TYPE)
