"""Running the daemon: logging, the database check, uvicorn, signals."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from types import FrameType

import uvicorn

from jobd import __version__
from jobd.app import create_app
from jobd.config import Config, ConfigError
from jobd.store import JobStore, StoreError
from jobd.users import UserPolicy

log = logging.getLogger("jobd")

# Seconds open HTTP connections (log followers, downloads) get to finish on shutdown; jobs are
# being stopped at the same time, so the total stays inside Docker's 10 s.
HTTP_DRAIN = 2.0


class UTCFormatter(logging.Formatter):
    converter = time.gmtime

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(record.created)) + \
            f".{int(record.msecs):03d}Z"


def setup_logging(level: str) -> None:
    """One line per event on stderr, UTC timestamps: what container log collectors expect."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(UTCFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("uvicorn.access").disabled = True


class DaemonServer(uvicorn.Server):
    """uvicorn, with SIGTERM and SIGINT meaning "stop cleanly and exit 0".

    Plain uvicorn re-raises the signal after its shutdown, so the process dies by SIGTERM
    (exit 143); a container's init is expected to exit 0 after a clean stop. The running jobs
    are told to stop at once, while HTTP connections drain.
    """

    def __init__(self, config: uvicorn.Config, app_state: object) -> None:
        super().__init__(config)
        self._app_state = app_state
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: object = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()
        log.info("signal %d: stopping", sig)
        manager = getattr(self._app_state, "manager", None)
        if manager is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(manager.begin_stop)


def serve(config: Config) -> int:
    """Run the daemon until SIGTERM or SIGINT; returns the exit code."""
    setup_logging("debug" if config.debug else config.log_level)
    try:
        UserPolicy.from_config(config).check_datapath(config.datapath)
    except ConfigError as exc:
        log.error("refusing to start: %s", exc)
        return 2
    try:
        store = JobStore(config.db_path, fsync=config.fsync)
    except StoreError as exc:
        log.error("%s", exc)
        return 2
    app = create_app(config, store=store, adopt_orphans=True)
    server = DaemonServer(uvicorn.Config(
        app, host=config.host, port=config.port, loop="asyncio", http="h11", ws="none",
        lifespan="on", log_config=None, access_log=False, server_header=False,
        timeout_graceful_shutdown=int(HTTP_DRAIN), timeout_keep_alive=30,
    ), app.state)
    log.info("jobd %s listening on %s:%d", __version__, config.host, config.port)
    server.run()
    if not server.started:
        log.error("jobd could not start (see the messages above)")
        return 3
    return 0
