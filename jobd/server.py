"""Running the daemon: logging, the database check, uvicorn, signals."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import sys
import time
from types import FrameType

import uvicorn

from jobd import __version__
from jobd.app import create_app, load_configured_specs
from jobd.auth import Authenticator
from jobd.config import Config, ConfigError
from jobd.connection import connection_class
from jobd.spec import SpecError
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


class UvicornConfig(uvicorn.Config):
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
    try:
        check_tls(config)
        authenticator = Authenticator.from_config(config)
        specs = load_configured_specs(config)
    except (ConfigError, SpecError) as exc:
        store.close()
        log.error("%s", exc)
        return 2
    if config.locked and not specs:
        log.warning("locked-down mode with no job specs: this daemon can run nothing")
    app = create_app(config, store=store, specs=specs, adopt_orphans=True,
                     authenticator=authenticator)
    server = DaemonServer(UvicornConfig(
        app, host=config.host, port=config.port, loop="asyncio",
        http=connection_class(config.header_timeout), ws="none",
        lifespan="on", log_config=None, access_log=False, server_header=False,
        timeout_graceful_shutdown=int(HTTP_DRAIN), timeout_keep_alive=30,
        h11_max_incomplete_event_size=config.max_header,
        ssl_certfile=config.tls_cert, ssl_keyfile=config.tls_key,
        ssl_ca_certs=config.tls_client_ca, ssl_cert_reqs=client_cert_mode(config),
        ssl_ciphers="",  # Python's defaults, not uvicorn's "TLSv1"
    ), app.state)
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
