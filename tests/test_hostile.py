"""Hostile and malformed requests against every upload route of the built zipapp.

The corpus is data (`tests/hostile_corpus.py`). Every case proves three things: the answer is
a refusal with a message (a 4xx in the error shape, or the protocol's "invalid" answer), or the
documented harmless handling; nothing was written outside DATAPATH (a snapshot of the tree
around the daemon, a sentinel directory, an absolute path that must not appear) and nothing is
left behind in it; the daemon is alive and serving afterwards.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from jobd.app import create_app
from jobd.auth import Authenticator
from jobd.config import Config
from tests.conftest import Daemon, wait_until
from tests.hostile_corpus import (
    ARCHIVES,
    LIMITS,
    ORCHESTRATOR,
    ORCHESTRATOR_FILENAMES,
    ROUTES,
    SENTINEL,
    Archive,
    Request,
    UploadRoute,
    error_shape,
    form,
    wait_outcome,
    zip_of,
)

PRESENT = {getattr(r, "path", "") for r in
           create_app(Config.load({}), authenticator=Authenticator()).routes}


def route_param(route: UploadRoute, *values: Any, name: str) -> Any:
    marks = [] if route.path in PRESENT else [pytest.mark.skip(
        reason=f"{route.method} {route.path} is not in this build")]
    return pytest.param(route, *values, id=f"{route.name}:{name}", marks=marks)


# -- the daemon and the guard -----------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(zipapp: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    where = tmp_path_factory.mktemp("hostile")
    (where / "outside").mkdir()
    (where / "outside" / "keep").write_bytes(b"sentinel")
    daemon = Daemon(zipapp, where, JOBD_FSYNC="false", JOBD_SLOTS="2", **LIMITS).start()
    yield daemon
    if daemon.proc is not None and daemon.proc.poll() is None:
        daemon.stop(signal.SIGTERM)
    daemon.client.close()


def snapshot(daemon: Daemon) -> dict[str, tuple[int, int]]:
    """Every path around the daemon but its own DATAPATH, DB_PATH and log: (size, mtime).

    The shiv unpack directory is represented by its top entry only (thousands of files,
    written once at the first start)."""
    top = daemon.workdir.parent
    own = {daemon.datapath, daemon.db_path, daemon.log_path}
    found: dict[str, tuple[int, int]] = {}
    for root, dirs, files in os.walk(top):
        here = Path(root)
        dirs[:] = [d for d in dirs if here / d not in own and d != "shiv"]
        for name in [*dirs, *files]:
            path = here / name
            if path in own:
                continue
            info = path.lstat()
            found[str(path.relative_to(top))] = (info.st_size, info.st_mtime_ns)
    shiv = top / "shiv"
    if shiv.exists():
        found["shiv"] = (0, shiv.lstat().st_mtime_ns)
    return found


def job_dirs(daemon: Daemon) -> set[str]:
    return {p.name for p in daemon.datapath.iterdir() if not p.name.startswith(".")}


class Guard:
    """Taken before a case; `check` after it: nothing outside, nothing left, still serving."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.before = snapshot(daemon)
        self.jobs = job_dirs(daemon)

    def check(self, made: set[str]) -> None:
        daemon = self.daemon
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log()[-3000:]
        assert daemon.client.get("/health").status_code == 200
        incoming = daemon.datapath / ".incoming"
        wait_until(lambda: not any(incoming.iterdir()), 30, 0.05, "DATAPATH/.incoming to empty")
        assert snapshot(daemon) == self.before, "something changed outside DATAPATH"
        assert (daemon.workdir / "outside" / "keep").read_bytes() == b"sentinel"
        assert not Path(SENTINEL).exists()
        assert not (daemon.workdir.parent / "pwned").exists()
        new = job_dirs(daemon) - self.jobs
        assert new <= made, f"job directories left by a refused request: {new - made}"


def new_id(name: str) -> str:
    return f"h-{name[:40]}-{uuid.uuid4().hex[:8]}"


def made_by(route: UploadRoute, sent: Any) -> set[str]:
    ok = sent.response.status_code < 300 and sent.job_id is not None
    return {sent.job_id} if ok else set()


# -- archives ---------------------------------------------------------------------------------


ARCHIVE_CASES = [route_param(route, case, name=case.name) for route in ROUTES
                 for case in ARCHIVES]


@pytest.mark.parametrize(("route", "case"), ARCHIVE_CASES)
def test_hostile_archive(corpus: Daemon, route: UploadRoute, case: Archive) -> None:
    guard = Guard(corpus)
    sent = route.send(corpus.client, new_id(case.name), case.build(), case.fmt)
    response = sent.response
    made = made_by(route, sent)
    if case.fmt not in route.formats:
        assert route.refused(response), response.text[:500]
        if error_shape(response):
            assert route.wrong_format in response.json()["message"]
    elif case.outcome == "refused":
        assert route.refused(response), response.text[:500]
        if error_shape(response) and case.expect:
            assert case.expect in response.json()["message"], response.json()
    else:
        assert response.status_code in (200, 201), response.text[:500]
        assert sent.job_id is not None
        status, message = wait_outcome(route, corpus.client, sent.job_id)
        if case.outcome == "failed":
            assert status == "FAILED"
            assert case.expect in message or not message  # the orchestrator shows no message
        else:
            assert status == "SUCCESS", message
            assert case.check is not None
            case.check(route.result(corpus.client, sent.job_id))
    guard.check(made)


# -- malformed requests -----------------------------------------------------------------------


REQUEST_CASES = [route_param(route, case, name=case.name) for route in ROUTES
                 for case in route.requests]
REQUEST_CASES += [route_param(ORCHESTRATOR, Request(name, form(parts)), name=name)
                  for name, parts in ORCHESTRATOR_FILENAMES]


@pytest.mark.parametrize(("route", "case"), REQUEST_CASES)
def test_malformed_request(corpus: Daemon, route: UploadRoute, case: Request) -> None:
    guard = Guard(corpus)
    job_id = new_id(case.name)
    response = corpus.client.request(route.method, route.path, **case.build(job_id))
    made: set[str] = set()
    if route is ORCHESTRATOR and response.status_code == 200:
        made = {str(response.json()["id"])}  # sanitised and accepted, or Invalid
    elif route.refused(response) and error_shape(response):
        assert response.status_code == case.status, response.text[:500]
        assert case.expect in response.json()["message"], response.json()
    else:
        raise AssertionError(f"not refused: {response.status_code} {response.text[:500]}")
    guard.check(made)


# -- HTTP-level abuse, on every upload route --------------------------------------------------


def exchange(port: int, steps: list[bytes | float], timeout: float = 20.0,
             ) -> tuple[int | None, bytes, bool]:
    """Send bytes (and sleep for floats) on a raw connection; then (status, body, closed).

    Stops sending once the server answered or closed (what a slow client would notice)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.setblocking(True)
        received = b""
        for step in steps:
            if isinstance(step, float):
                time.sleep(step)
                sock.settimeout(0.0)
                try:
                    more = sock.recv(65536)
                    if not more:
                        return _parse(received), True
                    received += more
                    return _finish(sock, received, timeout)
                except BlockingIOError:
                    pass
                finally:
                    sock.settimeout(timeout)
                continue
            try:
                sock.sendall(step)
            except (BrokenPipeError, ConnectionResetError):
                break
        return _finish(sock, received, timeout)


def _finish(sock: socket.socket, received: bytes, timeout: float,
            ) -> tuple[int | None, bytes, bool]:
    deadline = time.monotonic() + timeout
    closed = False
    while time.monotonic() < deadline:
        try:
            more = sock.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            closed = True
            break
        if not more:
            closed = True
            break
        received += more
        head, sep, body = received.partition(b"\r\n\r\n")
        if sep:
            length = [line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")]
            if length and len(body) >= int(length[0]):
                break
    status, body = _parse(received)
    return status, body, closed


def _parse(received: bytes) -> tuple[int | None, bytes]:
    if not received.startswith(b"HTTP/1.1 "):
        return None, received
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head[9:12]), body


def head(route: UploadRoute, *lines: str, body: bytes = b"") -> bytes:
    text = f"{route.method} {route.path} HTTP/1.1\r\nHost: jobd\r\n" + "".join(
        f"{line}\r\n" for line in lines) + "\r\n"
    return text.encode() + body


def typed(route: UploadRoute, length: int) -> bytes:
    """The head of an upload of `length` bytes and the first bytes of its body."""
    if route is ORCHESTRATOR:
        return head(route, f"Content-Length: {length}",
                    "Content-Type: multipart/form-data; boundary=B", body=b"--B\r\n")
    return head(route, f"Content-Length: {length}", "Content-Type: application/json",
                body=b'{"note": "')


@dataclass(frozen=True)
class Http:
    """Raw HTTP abuse: `steps(route)` are bytes to send and seconds to wait."""

    name: str
    steps: Callable[[UploadRoute], list[bytes | float]]
    statuses: set[int]
    message: str


HTTP_CASES = [Http(*case) for case in [
    ("huge-header", lambda r: [head(r, "X-Big: " + "a" * 20_000, "Content-Length: 0")],
     {431}, "larger than"),
    ("many-headers", lambda r: [head(r, *[f"X-H{i}: v" for i in range(3000)],
                                     "Content-Length: 0")], {431}, "larger than"),
    ("long-url", lambda r: [f"{r.method} {r.path}?q={'a' * 10_000} HTTP/1.1\r\nHost: j\r\n"
                            "Content-Length: 0\r\n\r\n".encode()], {414}, "longer than 8192"),
    ("very-long-url", lambda r: [f"{r.method} {r.path}/{'a' * 40_000} HTTP/1.1\r\nHost: j\r\n"
                                 "\r\n".encode()], {414, 431}, "than"),
    ("slow-head", lambda r: [f"{r.method} {r.path} HTTP/1.1\r\nHost: j\r\n".encode(), 4.0],
     {408}, "request head did not arrive within 2s"),
    ("slow-body", lambda r: [typed(r, 1000), 5.0], {408}, "no request body data for 2s"),
    ("trickle-body", lambda r: [typed(r, 100_000),
                                *[step for _ in range(30) for step in (b"a" * 100, 0.5)]],
     {408}, "slower than 512 bytes/s"),
    ("garbage-request-line", lambda r: [b"\x16\x03\x01\x02\x00 hello\r\n\r\n"], {400},
     "invalid HTTP request"),
    ("bad-content-length", lambda r: [head(r, "Content-Length: abc")], {400},
     "invalid HTTP request"),
    # h11 lets Transfer-Encoding win (RFC 9112 6.3): the empty body is then refused
    ("content-length-and-chunked", lambda r: [head(r, "Content-Length: 5",
                                                   "Transfer-Encoding: chunked",
                                                   body=b"0\r\n\r\n")], {400}, ""),
    ("declared-body-over-cap", lambda r: [typed(r, 65 << 20)], {413},
     "request body is larger than"),
    ("unsupported-transfer-encoding", lambda r: [head(r, "Transfer-Encoding: gzip")], {400},
     "invalid HTTP request"),
    ("header-without-colon", lambda r: [head(r, "this is no header")], {400},
     "invalid HTTP request"),
]]


@pytest.mark.parametrize(("route", "case"), [
    route_param(route, case, name=case.name) for route in ROUTES for case in HTTP_CASES])
def test_http_abuse(corpus: Daemon, route: UploadRoute, case: Http) -> None:
    guard = Guard(corpus)
    started = time.monotonic()
    status, body, _ = exchange(corpus.port, case.steps(route))
    assert status in case.statuses, (f"{route.name} {case.name}: no refusal within 20s (is "
                                     "the body read through limits.body?)"
                                     if status is None else body)
    parsed = json.loads(body)
    assert parsed["status"] == status and case.message in parsed["message"], parsed
    assert time.monotonic() - started < 20
    guard.check(set())


@pytest.mark.parametrize("route", [route_param(r, name="disconnect") for r in ROUTES])
def test_client_gone_mid_body(corpus: Daemon, route: UploadRoute) -> None:
    guard = Guard(corpus)
    with socket.create_connection(("127.0.0.1", corpus.port), timeout=10) as sock:
        sock.sendall(typed(route, 100_000) + b"A" * 5000)
    guard.check(set())
    assert "Traceback" not in corpus.log()


def test_the_corpus_is_large_enough() -> None:
    classic = [p for p in ARCHIVE_CASES + REQUEST_CASES if str(p.id).startswith("classic:")]
    assert len(classic) + len(HTTP_CASES) >= 50


def test_the_guard_sees_a_write_outside(corpus: Daemon) -> None:
    """The proof above would catch an escape: a file appearing beside the daemon fails it."""
    guard = Guard(corpus)
    stray = corpus.workdir / "outside" / "pwned"
    stray.write_bytes(b"x")
    try:
        with pytest.raises(AssertionError, match="outside DATAPATH"):
            guard.check(set())
    finally:
        stray.unlink()


def test_daemon_survived_everything(corpus: Daemon) -> None:
    """Last in the module: a good job still runs after all of the above."""
    archive = zip_of(("run.sh", b"#!/bin/sh\necho ok > ok.txt\n", 0o100755))
    response = corpus.client.post("/api/upload", json={
        "id": "after-all", "input": base64.b64encode(archive).decode()})
    assert response.status_code == 201
    assert corpus.wait_done("after-all").json()["Status"] == "SUCCESS"

