"""The Starlette application: the routing table, the lifespan, the request log."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobd import api, classic, limits, metrics, orchestrator
from jobd.auth import Authenticator, AuthMiddleware
from jobd.config import Config
from jobd.manager import JobManager, Rejected
from jobd.reaper import Reaper
from jobd.store import JobStore

if TYPE_CHECKING:
    from jobd.spec import Spec

log = logging.getLogger("jobd.http")


async def health(request: Request) -> Response:
    return JSONResponse({"status": "healthy"})


async def openapi_json(request: Request) -> Response:
    """`GET /openapi.json`: jobd/openapi.py (a large document) is loaded on first use."""
    from jobd import openapi
    return await openapi.openapi_json(request)


async def docs(request: Request) -> Response:
    """`GET /docs`, loaded on first use like the document it renders."""
    from jobd import openapi
    return await openapi.docs(request)


async def http_error(request: Request, exc: Exception) -> Response:
    """Unknown routes and wrong methods answer in the classic error shape."""
    assert isinstance(exc, HTTPException)
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
    return JSONResponse({"error": kind, "message": str(exc.detail).lower(),
                         "status": exc.status_code}, exc.status_code, headers=exc.headers)


async def rejected(request: Request, exc: Exception) -> Response:
    """A refused job (queue full, disk full, bad options) that a protocol did not map itself."""
    assert isinstance(exc, Rejected)
    return JSONResponse({"error": exc.code, "message": exc.message, "status": exc.status},
                        exc.status, headers=exc.headers)


class RequestLog:
    """One line per request on stderr: method, path, status, duration."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.note(scope, status, started)

    @staticmethod
    def note(scope: Scope, status: int, started: float) -> None:
        """The line for one request (`started`: its `time.perf_counter()`); the fast path
        (fastpath.py) writes its requests' lines with this too."""
        client = scope.get("client") or ("-", 0)
        caller = getattr((scope.get("state") or {}).get("client"), "name", None)
        log.info('%s "%s %s" %d %.1fms%s', client[0], scope["method"], scope["path"],
                 status, (time.perf_counter() - started) * 1000,
                 f" client={caller}" if caller else "")


def load_configured_specs(config: Config) -> dict[str, Spec]:
    """The specs of JOBD_SPECS_DIR; a broken one raises SpecError (the daemon must not start)."""
    if not config.specs_dir:
        return {}
    from jobd.spec import load_specs  # only with specs to load: keeps idle memory down

    specs = load_specs(Path(config.specs_dir))
    log.info("loaded %d job spec(s) from %s: %s", len(specs), config.specs_dir,
             ", ".join(sorted(specs)) or "none")
    return specs


def create_app(config: Config, *, store: JobStore | None = None,
               specs: dict[str, Spec] | None = None,
               adopt_orphans: bool = False,
               authenticator: Authenticator | None = None) -> Starlette:
    """The whole daemon as an ASGI app.

    `store` may be opened by the caller (the server does, to report a damaged database before
    anything listens); `adopt_orphans` makes the reaper collect every child, as PID 1 must.
    `authenticator` defaults to the clients configured in `config` and the environment.
    """
    if authenticator is None:
        authenticator = Authenticator.from_config(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        own_store = store if store is not None else JobStore(config.db_path, fsync=config.fsync)
        reaper = Reaper(adopt_orphans=adopt_orphans)
        reaper.start()
        own_store.use_syncer(reaper.watch)
        manager = JobManager(config, own_store, reaper)
        manager.specs = specs if specs is not None else load_configured_specs(config)
        manager.job_end_listeners.append(app.state.metrics.observe_job)
        app.state.manager = manager
        await manager.start()
        log.info("jobd ready: %d slot(s), data in %s, database in %s",
                 manager.scheduler.slots, config.datapath, config.db_path)
        try:
            yield {}
        finally:
            await manager.stop()
            await own_store.stop_syncer()  # while the reaper still collects its exit
            await reaper.stop()
            own_store.close()
            app.state.stopped = True  # all of it: see server.DaemonServer.capture_signals
            log.info("jobd stopped")

    routes = [
        Route("/health", health, methods=["GET"]),
        *classic.routes,
        *api.routes,
        Route("/openapi.json", openapi_json, methods=["GET"]),  # openapi.routes, lazily
        Route("/docs", docs, methods=["GET"]),
        *orchestrator.routes,
        Route("/metrics", metrics.endpoint, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Rejected: rejected,
                                        **limits.handlers})
    app.state.metrics = metrics.Metrics()
    app.add_middleware(metrics.HTTPMetrics, metrics=app.state.metrics)
    app.state.pace = limits.Pace.of(config)
    app.state.authenticator = authenticator
    app.add_middleware(AuthMiddleware, authenticator=authenticator)
    app.add_middleware(limits.RequestLimits, max_url=config.max_url,
                       max_header=config.max_header)
    if config.access_log:
        app.add_middleware(RequestLog)
    return app
