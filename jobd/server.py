"""Running the daemon: logging, the database check, uvicorn, signals."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import ipaddress
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

import uvicorn.config
import uvicorn.server
from uvicorn.server import HANDLED_SIGNALS

from jobd import __version__
from jobd.app import create_app, load_configured_specs
from jobd.auth import Authenticator
from jobd.config import Config, ConfigError
from jobd.connection import connection_class
from jobd.fastpath import FastPath
from jobd.store import JobStore, StoreError
from jobd.users import UserPolicy

log = logging.getLogger("jobd")

# Seconds open HTTP connections (log followers, downloads) get to finish on shutdown; jobs are
# being stopped at the same time, so the total stays inside Docker's 10 s.
HTTP_DRAIN = 2.0
# Seconds between two looks at `should_exit` when no signal woke the server loop (a backstop:
# signals wake it at once).
IDLE_TICK = 30.0


class UTCFormatter(logging.Formatter):
    converter = time.gmtime
    _second = -1
    _text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        second = int(record.created)
        if second != self._second:  # one strftime a second, not one a line
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(second))
            self._second = second
        return f"{self._text}.{int(record.msecs):03d}Z"


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """One line per record on a stream; the lines logged on the event loop's thread are
    written together once per loop iteration.

    Under load the access log is a line per request, and a write (a system call) per line
    cost as much as answering a status read; now a burst of requests costs one write. A
    line waits at most for the end of the loop iteration that logged it; lines from other
    threads, before `attach` and after `detach` are written at once (after any waiting
    ones, so the order holds), and `flush` (logging's exit handler calls it) writes what
    waits.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = 0
        self.pending: list[str] = []

    def attach(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Buffer the lines logged on `loop`'s thread (None: write every line at once)."""
        self.flush()
        self.loop = loop
        self.thread = threading.get_ident() if loop is not None else 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
            if self.loop is not None and threading.get_ident() == self.thread:
                if not self.pending:
                    self.loop.call_soon(self.flush)
                self.pending.append(line)
                return
            self._write_pending()
            self.stream.write(line)
            self.stream.flush()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging's convention: handleError reports it
            self.handleError(record)

    def flush(self) -> None:
        self.acquire()
        try:
            self._write_pending()
            super().flush()
        finally:
            self.release()

    def _write_pending(self) -> None:
        if self.pending:
            lines, self.pending = self.pending, []
            self.stream.write("".join(lines))


def setup_logging(level: str) -> LineHandler:
    """One line per event on stderr, UTC timestamps: what container log collectors expect.

    The records carry no thread, process or caller information (the format shows none),
    which makes a line several times cheaper (the logging HOWTO's "Optimization")."""
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    handler = LineHandler(sys.stderr)
    handler.setFormatter(UTCFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("uvicorn.access").disabled = True
    return handler


class DaemonServer(uvicorn.server.Server):
    """uvicorn, with SIGTERM and SIGINT meaning "stop cleanly and exit 0".

    Plain uvicorn re-raises the signal after its shutdown, so the process dies by SIGTERM
    (exit 143); a container's init is expected to exit 0 after a clean stop. The running jobs
    are told to stop at once, while HTTP connections drain.
    """

    def __init__(self, config: uvicorn.config.Config, app_state: object,
                 log_handler: LineHandler | None = None) -> None:
        super().__init__(config)
        self._app_state = app_state
        self._log_handler = log_handler
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    async def serve(self, sockets: object = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        if self._log_handler is not None:
            self._log_handler.attach(self._loop)
        try:
            await super().serve(sockets)  # type: ignore[arg-type]
        finally:
            if self._log_handler is not None:
                self._log_handler.attach(None)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        settle_memory()

    async def main_loop(self) -> None:
        """uvicorn's loop without its tenth-of-a-second tick: wait for `handle_exit`.

        uvicorn wakes ten times a second to refresh the date header and look at
        `should_exit`; the connection refreshes the date when a request needs it
        (connection.DateHeader) and a signal wakes this loop at once, so an idle daemon
        sleeps. `IDLE_TICK` is a backstop for anything that sets `should_exit` without waking.
        """
        assert self._wake is not None
        while not await self.on_tick(0):
            with contextlib.suppress(asyncio.TimeoutError):  # the backstop: look again
                await asyncio.wait_for(self._wake.wait(), IDLE_TICK)
            self._wake.clear()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's (SIGTERM and SIGINT go to `handle_exit` while it serves), except at the
        end: once the daemon has stopped cleanly (jobs ended, database closed), a further
        SIGTERM or SIGINT while the interpreter winds down (asyncio.run joins worker
        threads) exits 0 at once, instead of killing the process by the signal (exit 143):
        `docker stop` twice, or a supervisor that repeats its signal, sees a clean stop. The
        handler is swapped in one step, so no moment is left without one."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        stopped = False
        try:
            yield
            stopped = (self.started and self.should_exit and not self.force_exit
                       and getattr(self._app_state, "stopped", False))
        finally:
            for sig, handler in original.items():
                signal.signal(sig, _exit_stopped if stopped else handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()
        log.info("signal %d: stopping", sig)
        if self._loop is None:
            return
        manager = getattr(self._app_state, "manager", None)
        if manager is not None:
            self._loop.call_soon_threadsafe(manager.begin_stop)
        if self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)


def _exit_stopped(sig: int, frame: FrameType | None) -> None:
    """A signal after the daemon stopped cleanly: nothing is left to do but exit."""
    os._exit(0)


def settle_memory() -> None:
    """Once started: what start-up allocated stays out of the garbage collector's way, and
    the heap it freed goes back to the system.

    `gc.freeze` moves every object alive now (the job records above all: millions of objects
    with 100,000 jobs) to the permanent generation, so a full collection no longer walks
    them; `malloc_trim` (glibc) returns the pages the store's loading freed (a few MiB with
    100,000 jobs) instead of keeping them for later.
    """
    gc.freeze()
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim): nothing to do
        return
    trim(0)


class UvicornConfig(uvicorn.config.Config):
    """uvicorn's configuration, with jobd's floor on the TLS version."""

    def load(self) -> None:
        super().load()
        if self.ssl is not None:
            self.ssl.minimum_version = ssl.TLSVersion.TLSv1_2


def client_cert_mode(config: Config) -> int:
    if config.tls_client_ca is None:
        return ssl.CERT_NONE
    return ssl.CERT_REQUIRED if config.tls_client_cert == "required" else ssl.CERT_OPTIONAL


def check_tls(config: Config) -> None:
    """Refuse inconsistent TLS settings and unreadable files before anything listens."""
    if config.tls_key is not None and config.tls_cert is None:
        raise ConfigError("JOBD_TLS_KEY needs JOBD_TLS_CERT")
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise ConfigError("JOBD_TLS_CLIENT_CA (mutual TLS) needs JOBD_TLS_CERT and "
                          "JOBD_TLS_KEY")
    if config.tls_admins and config.tls_client_ca is None:
        raise ConfigError("JOBD_TLS_ADMINS needs JOBD_TLS_CLIENT_CA")
    if config.tls_cert is None:
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"JOBD_TLS_CERT/JOBD_TLS_KEY: cannot load {config.tls_cert}"
                          f"{' and ' + str(config.tls_key) if config.tls_key else ''}: "
                          f"{exc}") from exc
    if config.tls_client_ca is not None:
        try:
            context.load_verify_locations(config.tls_client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"JOBD_TLS_CLIENT_CA: cannot load {config.tls_client_ca}: "
                              f"{exc}") from exc


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def serve(config: Config) -> int:
    """Run the daemon until SIGTERM or SIGINT; returns the exit code."""
    log_handler = setup_logging("debug" if config.debug else config.log_level)
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
    try:
        check_tls(config)
        authenticator = Authenticator.from_config(config)
        specs = load_configured_specs(config)  # a broken spec: SpecError, a ConfigError
    except ConfigError as exc:
        store.close()
        log.error("%s", exc)
        return 2
    if config.locked and not specs:
        log.warning("locked-down mode with no job specs: this daemon can run nothing")
    app = create_app(config, store=store, specs=specs, adopt_orphans=True,
                     authenticator=authenticator)
    fast = FastPath.of(app, config) if config.fast_path else None
    server = DaemonServer(UvicornConfig(
        app, host=config.host, port=config.port, loop="asyncio",
        http=connection_class(config.header_timeout, fast), ws="none",
        lifespan="on", log_config=None, access_log=False, server_header=False,
        timeout_graceful_shutdown=int(HTTP_DRAIN), timeout_keep_alive=30,
        h11_max_incomplete_event_size=config.max_header,
        ssl_certfile=config.tls_cert, ssl_keyfile=config.tls_key,
        ssl_ca_certs=config.tls_client_ca, ssl_cert_reqs=client_cert_mode(config),
        ssl_ciphers="",  # Python's defaults, not uvicorn's "TLSv1"
    ), app.state, log_handler)
    scheme = "https" if config.tls_cert is not None else "http"
    log.info("jobd %s listening on %s://%s:%d, %s", __version__, scheme, config.host,
             config.port, authenticator.describe())
    if not authenticator.enabled and not is_loopback(config.host):
        log.warning("authentication is off and jobd listens on %s: anyone who can reach port "
                    "%d can run code here (set JOBD_TOKENS_FILE, JOBD_TOKEN_<NAME> or "
                    "JOBD_TLS_CLIENT_CA; see SECURITY.md)", config.host, config.port)
    server.run()
    if not server.started:
        log.error("jobd could not start (see the messages above)")
        return 3
    return 0
