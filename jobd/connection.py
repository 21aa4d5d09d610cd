"""One HTTP connection: uvicorn's h11 protocol with what jobd needs on top.

- **The client certificate.** uvicorn 0.39 does not fill the ASGI TLS extension
  (`scope["extensions"]["tls"]`, https://asgi.readthedocs.io/en/latest/specs/tls.html): it
  never looks at the peer certificate. This protocol reads it once per connection from the
  transport (`get_extra_info("ssl_object").getpeercert()`, verified by the handshake against
  JOBD_TLS_CLIENT_CA) and hands every request of the connection the extension, with
  `client_cert_name` as an RFC 4514 string. `auth.py` reads only the standard extension, so
  it works behind any ASGI server that fills it.
- **A deadline for request heads** (JOBD_HEADER_TIMEOUT). uvicorn's keep-alive timeout only
  runs between requests, so a client that opens connections and sends a head a byte at a time
  (slowloris) would hold them forever; here a head must be complete in time, else 408 and
  the connection is closed.
- **Protocol errors in the error shape.** A malformed request or a head larger than
  JOBD_MAX_HEADER (h11's buffer limit) gets the JSON error shape, 431 for the size, instead of
  uvicorn's plain-text 400.

- **The fast path** (fastpath.py). While the connection is between requests, each complete
  request head is first offered to `FastPath.answer`; the status reads it serves are written
  out at once, and the first request it does not serve, with everything after it, goes to
  h11 as usual. Partial heads go to h11 too.
- **The date header without a timer.** uvicorn refreshes its `date` header from a tick ten
  times a second (server.py slows that tick down); here it is recomputed when a request
  starts in a new second, so the header stays exact without waking an idle daemon.

It subclasses `uvicorn.protocols.http.h11_impl.H11Protocol` and relies on its attributes
`app`, `conn`, `cycle`, `transport`, `loop`, `flow`, `config`, `server_state`,
`timeout_keep_alive_task` and `handle_events` (uvicorn is pinned; the tests cover each
behaviour).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from email.utils import formatdate
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from jobd.errors import error_bytes
from jobd.fastpath import FastPath

log = logging.getLogger("jobd.http")

# RFC 4514 short names of the attributes Python's getpeercert() spells out.
_SHORT = {"commonName": "CN", "localityName": "L", "stateOrProvinceName": "ST",
          "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
          "streetAddress": "STREET", "domainComponent": "DC", "userId": "UID"}
_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


# Most requests of one read the fast path answers; pipelined requests beyond go to h11, one
# at a time, so one client's burst neither holds the event loop nor fills its write buffer.
MAX_PIPELINED = 64


def _escape(value: str) -> str:
    """An attribute value escaped per RFC 4514 (plus `=`, harmless and simpler to parse)."""
    out = []
    for i, c in enumerate(value):
        if c in ',+"\\<>;=' or (c in "# " and i == 0) or (c == " " and i == len(value) - 1):
            out.append("\\" + c)
        elif c == "\x00":
            out.append("\\00")
        else:
            out.append(c)
    return "".join(out)


def rfc4514(subject: Any) -> str:
    """getpeercert()'s subject (RDNs, most significant first) as an RFC 4514 string."""
    rdns = []
    for rdn in reversed(subject or ()):
        rdns.append("+".join(f"{_SHORT.get(attr, attr)}={_escape(str(value))}"
                             for attr, value in rdn))
    return ",".join(rdns)


def tls_extension(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    """The ASGI TLS extension of a connection, or None for plain HTTP."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    verified = ssl_object.getpeercert()  # {} unless the handshake verified it
    return {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": rfc4514(verified.get("subject")) if verified else None,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": None,
    }


def _with_tls(app: Any, tls: dict[str, Any]) -> Any:
    async def app_with_tls(scope: Any, receive: Any, send: Any) -> None:
        scope.setdefault("extensions", {})["tls"] = dict(tls)
        await app(scope, receive, send)
    return app_with_tls


class DateHeader:
    """uvicorn's default response headers (`date`, then any configured), recomputed when the
    second changes: what its tick did ten times a second, done only when a request needs it."""

    def __init__(self) -> None:
        self.second = -1
        self.headers: list[tuple[bytes, bytes]] = []

    def current(self, config: Any) -> list[tuple[bytes, bytes]]:
        now = time.time()
        second = int(now)
        if second != self.second:
            date = [(b"date", formatdate(now, usegmt=True).encode())] \
                if config.date_header else []
            self.headers = date + config.encoded_headers
            self.second = second
        return self.headers


class Connection(H11Protocol):
    """uvicorn's h11 protocol plus the TLS extension, a head deadline, JSON errors, the fast
    path and a date header without a timer."""

    header_timeout: float = 30.0
    fast: FastPath | None = None
    dates: DateHeader = DateHeader()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._answered = 0.0  # loop.time() of the last fast answer
        self._h11_used = False  # h11 has been given data since it was last seen idle
        self.tls = tls_extension(transport)
        if self.tls is not None:
            self.app = _with_tls(self.app, self.tls)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        self.server_state.default_headers = self.dates.current(self.config)
        super().handle_events()

    def data_received(self, data: bytes) -> None:
        if self.fast is not None and self._idle():
            data = self._serve_fast(data)
            if not data:
                return
        before = self.cycle
        self._h11_used = True
        super().data_received(data)
        if self.cycle is not before:  # a request head is complete
            self._disarm()
        elif before is None or before.response_complete:  # between requests: a head begins
            self._arm()

    def _idle(self) -> bool:
        """Between requests, with nothing buffered in h11 and the peer reading answers."""
        if self.flow.write_paused or self.transport.is_closing():
            return False
        if not self._h11_used:  # h11 is as new: no need to ask it
            return True
        cycle = self.cycle
        if (cycle is None or cycle.response_complete) and self.conn.our_state is h11.IDLE \
                and self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
            self._h11_used = False
            return True
        return False

    def _serve_fast(self, data: bytes) -> bytes:
        """Answer the leading requests of `data` the fast path serves; the rest, from the
        first request it does not serve (or a partial head), is returned for h11."""
        assert self.fast is not None
        answers = []
        start = 0
        self.server_state.default_headers = self.dates.current(self.config)
        while len(answers) < MAX_PIPELINED:
            end = data.find(b"\r\n\r\n", start)
            if end < 0:
                break
            try:
                answer = self.fast.answer(data[start:end], self)
            except Exception:  # never the connection's end: the normal path serves it
                log.exception("the fast path failed on a request; the normal path serves it")
                answer = None
            if answer is None:
                break
            answers.append(answer)
            start = end + 4
        if not answers:
            return data
        self.transport.write(b"".join(answers) if len(answers) > 1 else answers[0])
        self.server_state.total_requests += len(answers)
        self._disarm()
        if start < len(data):
            return data[start:]  # h11 takes over, and uvicorn's keep-alive handling with it
        # The keep-alive timeout counts from now: rather than a new timer per request (a
        # cancelled timer stays in the loop's heap until it would have fired), the one
        # armed stays and looks at `_answered` when it fires.
        self._answered = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler)
        return b""

    def timeout_keep_alive_handler(self) -> None:
        """uvicorn's keep-alive timeout, counted from the last fast answer if later."""
        left = self._answered + self.timeout_keep_alive - self.loop.time()
        if left > 0 and self._idle():
            self.timeout_keep_alive_task = self.loop.call_later(
                left, self.timeout_keep_alive_handler)
            return
        self.timeout_keep_alive_task = None
        super().timeout_keep_alive_handler()

    def _arm(self) -> None:
        if self._head_timer is None and self.header_timeout > 0 \
                and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being served: its body has its own limits
        pending = self.conn.trailing_data[0]
        if pending:
            client = self.client[0] if self.client else "-"
            log.info("%s: no complete request head within %gs, closing", client,
                     self.header_timeout)
            body = error_bytes(408, f"the request head did not arrive within "
                                    f"{self.header_timeout:g}s")
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\n"
                                 b"content-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n"
                                 % len(body) + body)
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """A protocol error (uvicorn calls this): the JSON shape, 431 for an oversize head."""
        limit = self.config.h11_max_incomplete_event_size
        if limit is not None and len(self.conn.trailing_data[0]) > limit:
            status, text = 431, f"request line and headers are larger than {limit} bytes"
        else:
            status, text = 400, "invalid HTTP request"
        body = error_bytes(status, text)
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        for event in (h11.Response(status_code=status, headers=headers),
                      h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event) or b"")
        self.transport.close()


def connection_class(header_timeout: float, fast: FastPath | None = None) -> type[Connection]:
    """The protocol class uvicorn is given (`http=`), with jobd's head deadline and the fast
    path (None: every request goes through h11 and the app)."""
    return type("JobdConnection", (Connection,), {"header_timeout": header_timeout,
                                                  "fast": fast, "dates": DateHeader()})
