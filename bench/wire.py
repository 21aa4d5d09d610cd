"""A minimal HTTP/1.1 keep-alive client on a raw socket, so the client is not the bottleneck.

httpx or http.client spend far more CPU per request than the daemon's own work for a tiny
job; this client builds request bytes by hand, parses only the status line and the framing
headers, and can count a large body without keeping it (``discard=True``).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

_RECV = 1 << 20


class WireError(OSError):
    """The server closed the connection or answered something that is not HTTP/1.1."""


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    size: int  # body bytes received (also when the body was discarded)


class Conn:
    """One keep-alive connection; not thread-safe (one per client thread)."""

    def __init__(self, host: str, port: int, timeout: float = 120.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._scratch = bytearray(_RECV)

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._buf.clear()
        return sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, body: bytes | memoryview = b"", *,
                content_type: str = "application/json", discard: bool = False) -> Answer:
        """Send one request and read the whole answer (counted, not kept, with `discard`)."""
        sock = self._sock or self._connect()
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Length: {len(body)}\r\n").encode()
        if body:
            head += f"Content-Type: {content_type}\r\n".encode()
        head += b"\r\n"
        if len(body) <= 64 * 1024:
            sock.sendall(head + bytes(body))
        else:
            sock.sendall(head)
            sock.sendall(body)
        return self._read_answer(discard, head_only=method == "HEAD")

    def _fill(self) -> None:
        assert self._sock is not None
        n = self._sock.recv_into(self._scratch)
        if n == 0:
            self.close()
            raise WireError("connection closed by the server")
        self._buf += memoryview(self._scratch)[:n]

    def _read_answer(self, discard: bool, head_only: bool) -> Answer:
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            self._fill()
        lines = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
        del self._buf[:end + 4]
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise WireError(f"not an HTTP answer: {lines[0]!r}")
        status = int(parts[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if head_only:
            body, size = b"", 0
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body, size = self._read_chunked(discard)
        else:
            body, size = self._read_length(int(headers.get("content-length", "0")), discard)
        if headers.get("connection", "").lower() == "close":
            self.close()
        return Answer(status, headers, body, size)

    def _read_length(self, length: int, discard: bool) -> tuple[bytes, int]:
        if not discard:
            while len(self._buf) < length:
                self._fill()
            body = bytes(self._buf[:length])
            del self._buf[:length]
            return body, length
        assert self._sock is not None
        have = min(len(self._buf), length)
        del self._buf[:have]
        left = length - have
        while left > 0:  # straight into the scratch buffer: no copy, no growth
            n = self._sock.recv_into(self._scratch, min(left, _RECV))
            if n == 0:
                self.close()
                raise WireError("connection closed in the middle of a body")
            left -= n
        return b"", length

    def _read_chunked(self, discard: bool) -> tuple[bytes, int]:
        out = bytearray()
        size = 0
        while True:
            while (eol := self._buf.find(b"\r\n")) < 0:
                self._fill()
            n = int(bytes(self._buf[:eol]).split(b";")[0], 16)
            del self._buf[:eol + 2]
            while len(self._buf) < n + 2:
                self._fill()
            if not discard:
                out += self._buf[:n]
            size += n
            del self._buf[:n + 2]
            if n == 0:
                return bytes(out), size
