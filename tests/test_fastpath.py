"""The fast path (jobd/fastpath.py): status reads answered in the connection layer, byte for
byte what the normal path sends, over raw sockets to the built zipapp."""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.conftest import Daemon, classic_body, wait_until
from tests.test_authorization import pki, start, tls_context, tls_env, tls_upload

__all__ = ["pki"]  # the fixture, shared with test_authorization

# A request header h11 accepts and no route reads, whose tab the fast path refuses: the same
# request, sent down the normal path.
NORMAL = b"X-Pad: a\tb\r\n"
_DATE = re.compile(rb"\r\ndate: [^\r]*\r\n")


def raw_get(target: str, extra: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return b"GET %s %s\r\nHost: jobd\r\n%s\r\n" % (target.encode(), version, extra)


class Raw:
    """One TCP connection (TLS with `tls`); answers are read by their Content-Length."""

    def __init__(self, daemon: Daemon, tls: ssl.SSLContext | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="127.0.0.1")
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def answer(self) -> bytes:
        while b"\r\n\r\n" not in self.buffer:
            assert self._fill(), f"connection closed mid-head: {self.buffer!r}"
        head_end = self.buffer.index(b"\r\n\r\n") + 4
        length = int(re.search(rb"\r\ncontent-length: (\d+)\r\n", self.buffer[:head_end],
                               re.I).group(1))  # type: ignore[union-attr]
        while len(self.buffer) < head_end + length:
            assert self._fill(), "connection closed mid-body"
        answer, self.buffer = self.buffer[:head_end + length], self.buffer[head_end + length:]
        return answer

    def closed(self) -> bool:
        """Whether the server closed the connection (nothing more arrives)."""
        return not self.buffer and not self._fill()


def exchange(daemon: Daemon, request: bytes, tls: ssl.SSLContext | None = None) -> bytes:
    raw = Raw(daemon, tls)
    try:
        raw.send(request)
        return raw.answer()
    finally:
        raw.close()


def undated(answer: bytes) -> bytes:
    """The answer without its date header's value (two requests may straddle a second)."""
    assert _DATE.search(answer), answer[:200]
    return _DATE.sub(b"\r\ndate: -\r\n", answer, count=1)


def fast_count(daemon: Daemon) -> int:
    text = daemon.client.get("/metrics").text
    return sum(int(v) for v in re.findall(
        r'^jobd_http_fast_path_requests_total\{.*\} (\d+)$', text, re.M))


def same_both_ways(daemon: Daemon, target: str, extra: bytes = b"",
                   tls: ssl.SSLContext | None = None) -> bytes:
    """The fast answer to `target`, checked equal (but the date) to the normal one, and
    checked to have come from the fast path."""
    before = fast_count(daemon)
    fast = exchange(daemon, raw_get(target, extra), tls)
    assert fast_count(daemon) == before + 1, "the fast path did not serve it"
    normal = exchange(daemon, raw_get(target, extra + NORMAL), tls)
    assert fast_count(daemon) == before + 1, "the fast path served the NORMAL request"
    assert undated(fast) == undated(normal)
    return fast


def upload(daemon: Daemon, job_id: str, script: str, **extra: object) -> None:
    response = daemon.client.post("/api/upload", json=classic_body(
        job_id, {"run.sh": "#!/bin/sh\n" + script}, **extra))
    assert response.status_code == 201, response.text


@pytest.fixture(scope="module")
def daemon(zipapp: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    workdir = tmp_path_factory.mktemp("fast")
    daemon = Daemon(zipapp, workdir, JOBD_SLOTS="1").start()
    yield daemon
    daemon.stop()
    daemon.client.close()


@pytest.fixture(scope="module")
def jobs(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A finished job of each kind, one running and one queued behind it (one slot)."""
    gate = tmp_path_factory.mktemp("gate") / "go"
    upload(daemon, "ok", "echo hello > out.txt\n")
    daemon.wait_done("ok")
    upload(daemon, "bad", "echo oops >&2; exit 3\n")
    daemon.wait_done("bad")
    upload(daemon, "big", "head -c 400000 /dev/urandom > noise.bin\n")  # result > 256 KiB
    daemon.wait_done("big")
    upload(daemon, "running", f"while [ ! -e {gate} ]; do sleep 0.05; done\n")
    upload(daemon, "queued", "true\n")
    wait_until(lambda: daemon.client.get("/api/v1/jobs/running").json()["status"] == "RUNNING",
               what="the running job")
    yield {"ok": "SUCCESS", "bad": "FAILED", "running": "RUNNING", "queued": "QUEUED"}
    gate.write_text("")


@pytest.mark.parametrize("job_id", ["ok", "bad", "running", "queued", "nosuchjob"])
def test_classic_answers_are_byte_for_byte_the_normal_ones(daemon: Daemon, jobs: dict[str, str],
                                                           job_id: str) -> None:
    fast = same_both_ways(daemon, f"/api/get/{job_id}")
    status = int(fast.split(b" ", 2)[1])
    assert status == {"ok": 200, "bad": 200, "running": 202, "queued": 202}.get(job_id, 404)
    assert fast.startswith(b"HTTP/1.1 %d " % status)
    # twice more: the second answer may come from the cache
    assert undated(exchange(daemon, raw_get(f"/api/get/{job_id}"))) == undated(fast)


@pytest.mark.parametrize("job_id", ["ok", "bad", "queued", "nosuchjob"])
def test_native_answers_are_byte_for_byte_the_normal_ones(daemon: Daemon, jobs: dict[str, str],
                                                          job_id: str) -> None:
    fast = same_both_ways(daemon, f"/api/v1/jobs/{job_id}")
    if job_id in jobs:
        assert f'"status":"{jobs[job_id]}"'.encode() in fast


def test_classic_answer_equals_the_query_string_one(daemon: Daemon, jobs: dict[str, str]) -> None:
    """A query string always takes the normal path; `secret` changes nothing for a job
    without one."""
    fast = exchange(daemon, raw_get("/api/get/ok"))
    normal = exchange(daemon, raw_get("/api/get/ok?secret=whatever-1"))
    assert undated(fast) == undated(normal)


def test_the_date_header_is_now(daemon: Daemon, jobs: dict[str, str]) -> None:
    answer = exchange(daemon, raw_get("/api/get/ok"))
    date = re.search(rb"\r\ndate: ([^\r]*)\r\n", answer).group(1).decode()  # type: ignore[union-attr]
    from email.utils import parsedate_to_datetime
    assert abs(parsedate_to_datetime(date).timestamp() - time.time()) < 3


def test_a_large_result_streams_down_the_normal_path(daemon: Daemon, jobs: dict[str, str]) -> None:
    before = fast_count(daemon)
    response = daemon.client.get("/api/get/big")
    assert response.status_code == 200 and len(response.json()["Output"]) > 256 * 1024
    assert fast_count(daemon) == before


def test_an_answer_changes_with_the_job(daemon_factory: Callable[..., Daemon],
                                        tmp_path: Path) -> None:
    """The cached answer follows the record: running, finished, restarted, deleted."""
    daemon = daemon_factory()
    gate = tmp_path / "go"
    upload(daemon, "changing", f"while [ ! -e {gate} ]; do sleep 0.05; done\necho $$ > pid\n")
    wait_until(lambda: b" 202 " in exchange(daemon, raw_get("/api/get/changing"))
               and daemon.client.get("/api/v1/jobs/changing").json()["status"] == "RUNNING",
               what="the job to run")
    running = same_both_ways(daemon, "/api/get/changing")
    gate.write_text("")
    daemon.wait_done("changing")
    first = same_both_ways(daemon, "/api/get/changing")
    assert b" 200 " in first.split(b"\r\n", 1)[0]
    assert daemon.client.post("/api/v1/jobs/changing/restart").status_code == 200
    daemon.wait_done("changing")
    second = same_both_ways(daemon, "/api/get/changing")
    assert undated(second) != undated(first) != undated(running)  # LastUpdated, Output
    assert daemon.client.delete("/api/v1/jobs/changing").status_code == 204
    assert b" 404 " in same_both_ways(daemon, "/api/get/changing").split(b"\r\n", 1)[0]


def test_keep_alive_and_pipelining(daemon: Daemon, jobs: dict[str, str]) -> None:
    """Fast and normal requests on one connection, one at a time and pipelined, answered in
    order, each as it would be alone."""
    alone = {target: undated(exchange(daemon, raw_get(target))) for target in
             ("/api/get/ok", "/api/get/bad", "/api/v1/jobs/ok", "/health")}
    raw = Raw(daemon)
    try:
        for target in ("/api/get/ok", "/api/get/bad", "/health", "/api/get/ok"):
            raw.send(raw_get(target))
            assert undated(raw.answer()) == alone[target]
        order = ["/api/get/ok", "/api/v1/jobs/ok", "/health", "/api/get/bad", "/api/get/ok",
                 "/health", "/health", "/api/get/bad"]
        raw.send(b"".join(raw_get(t) for t in order))
        assert [undated(raw.answer()) for _ in order] == [alone[t] for t in order]
        # a normal request with a body in the middle of fast ones
        post = (b"POST /api/upload HTTP/1.1\r\nHost: jobd\r\nContent-Length: 2\r\n\r\n{}")
        raw.send(raw_get("/api/get/ok") + post + raw_get("/api/get/bad"))
        assert undated(raw.answer()) == alone["/api/get/ok"]
        assert b" 400 " in raw.answer().split(b"\r\n", 1)[0]
        assert undated(raw.answer()) == alone["/api/get/bad"]
    finally:
        raw.close()


def test_a_long_pipeline_is_answered_in_order(daemon: Daemon, jobs: dict[str, str]) -> None:
    """More requests in one packet than the fast path takes at once: the rest go to h11."""
    order = ["/api/get/ok", "/api/get/bad", "/api/v1/jobs/ok"] * 100
    alone = {t: undated(exchange(daemon, raw_get(t))) for t in set(order)}
    raw = Raw(daemon)
    try:
        raw.send(b"".join(raw_get(t) for t in order))
        assert [undated(raw.answer()) for _ in order] == [alone[t] for t in order]
    finally:
        raw.close()


def test_partial_heads_split_across_packets(daemon: Daemon, jobs: dict[str, str]) -> None:
    request = raw_get("/api/get/ok")
    expected = undated(exchange(daemon, request))
    raw = Raw(daemon)
    try:
        for cut in (1, 5, 20, len(request) - 3, len(request) - 1):
            raw.send(request[:cut])
            time.sleep(0.02)  # separate reads on the server's side
            raw.send(request[cut:])
            assert undated(raw.answer()) == expected
        for piece in (request[i:i + 7] for i in range(0, len(request), 7)):
            raw.send(piece)
            time.sleep(0.005)
        assert undated(raw.answer()) == expected
        # a whole request and half of the next one in one packet
        raw.send(request + request[:10])
        assert undated(raw.answer()) == expected
        time.sleep(0.02)
        raw.send(request[10:])
        assert undated(raw.answer()) == expected
    finally:
        raw.close()


@pytest.mark.parametrize("variant", [
    b"GET /api/get/ok HTTP/1.1\r\nHost: jobd\r\nConnection: close\r\n\r\n",
    b"GET /api/get/ok HTTP/1.0\r\nHost: jobd\r\n\r\n",
])
def test_closing_requests_are_answered_then_closed(daemon: Daemon, jobs: dict[str, str],
                                                   variant: bytes) -> None:
    raw = Raw(daemon)
    try:
        raw.send(variant)
        answer = raw.answer()
        assert b"connection: close" in answer.lower() and b'"ID":"ok"' in answer
        assert raw.closed()
    finally:
        raw.close()


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /api/get/ok HTTP/1.1\r\n\r\n", 400),                        # no Host
    (b"GET /api/get/ok HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),  # two
    (b"GET /api/get/ok HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n", 400),
    (b"GET /api/get/ok HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", 200),
    (b"GET /api/get/ok HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n", 200),
    (b"DELETE /api/get/ok HTTP/1.1\r\nHost: a\r\n\r\n", 405),
    (b"GET /api/get/ok/ HTTP/1.1\r\nHost: a\r\n\r\n", 307),  # Starlette's redirect
    (b"GET /api/get/%6Fk HTTP/1.1\r\nHost: a\r\n\r\n", 200),
    (b"GET /api/get/.hidden HTTP/1.1\r\nHost: a\r\n\r\n", 404),
    (b"GET /api/v1/jobs/ok?x=1 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
])
def test_what_the_fast_path_leaves_to_h11(daemon: Daemon, jobs: dict[str, str],
                                          request_bytes: bytes, status: int) -> None:
    before = fast_count(daemon)
    raw = Raw(daemon)
    try:
        raw.send(request_bytes)
        answer = raw.answer()
    finally:
        raw.close()
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:300]
    assert fast_count(daemon) == before


def test_counted_and_logged_like_the_normal_path(daemon: Daemon, jobs: dict[str, str]) -> None:
    def count(route: str, code: int) -> int:
        text = daemon.client.get("/metrics").text
        found = re.search(rf'^jobd_http_requests_total\{{method="GET",route="{re.escape(route)}",'
                          rf'code="{code}"\}} (\d+)$', text, re.M)
        return int(found.group(1)) if found else 0

    before = count("/api/get/{id}", 404), count("/api/v1/jobs/{id}", 200)
    exchange(daemon, raw_get("/api/get/logged-ghost"))
    exchange(daemon, raw_get("/api/v1/jobs/ok"))
    assert (count("/api/get/{id}", 404), count("/api/v1/jobs/{id}", 200)) == \
        (before[0] + 1, before[1] + 1)
    wait_until(lambda: '"GET /api/get/logged-ghost" 404' in daemon.log(),
               what="the access log line")


# -- authentication and ownership --------------------------------------------------------------

TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789"}


def bearer(name: str) -> bytes:
    return b"Authorization: Bearer %s\r\n" % TOKENS[name].encode()


@pytest.fixture(scope="module")
def secured(zipapp: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    workdir = tmp_path_factory.mktemp("fast-secured")
    env = {f"JOBD_TOKEN_{name.upper()}": hashlib.sha256(token.encode()).hexdigest()
           for name, token in TOKENS.items()}
    daemon = Daemon(zipapp, workdir, **env).start()
    daemon.client.headers["Authorization"] = "Bearer " + TOKENS["alice"]  # for /metrics
    yield daemon
    daemon.stop()
    daemon.client.close()


def test_authentication_still_required(secured: Daemon) -> None:
    response = secured.client.post("/api/upload", json=classic_body(
        "alices", {"run.sh": "#!/bin/sh\ntrue\n"}))  # as alice
    assert response.status_code == 201, response.text
    wait_until(lambda: secured.client.get("/api/get/alices").status_code == 200,
               what="alice's job")
    for extra in (b"", b"Authorization: Bearer wrong-token-123\r\n", b"Authorization: Basic x\r\n",
                  bearer("alice") + bearer("alice")):
        for target in ("/api/get/alices", "/api/v1/jobs/alices"):
            answer = exchange(secured, raw_get(target, extra))
            assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
            assert b"www-authenticate: Bearer" in answer
    # the owner gets the job, fast, as the normal path gives it
    owner = same_both_ways(secured, "/api/get/alices", bearer("alice"))
    assert b'"ID":"alices"' in owner
    same_both_ways(secured, "/api/v1/jobs/alices", bearer("alice"))
    # another client gets what a job that does not exist gets
    ghost = same_both_ways(secured, "/api/get/no-such-job", bearer("bob"))
    assert undated(same_both_ways(secured, "/api/get/alices", bearer("bob"))) == undated(ghost)


def test_a_secret_job_needs_its_secret(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory()
    upload(daemon, "hidden", "true\n", secret="s3cret-value")
    wait_until(lambda: daemon.client.get("/api/get/hidden", headers={
        "X-Job-Secret": "s3cret-value"}).status_code == 200, what="the secret job")
    ghost = same_both_ways(daemon, "/api/get/no-such-job")
    assert undated(same_both_ways(daemon, "/api/get/hidden")) == undated(ghost)
    wrong = same_both_ways(daemon, "/api/get/hidden", b"X-Job-Secret: not-the-secret\r\n")
    assert undated(wrong) == undated(ghost)
    right = same_both_ways(daemon, "/api/get/hidden", b"X-Job-Secret: s3cret-value\r\n")
    assert b'"ID":"hidden"' in right


def test_fast_path_can_be_turned_off(daemon_factory: Callable[..., Daemon]) -> None:
    off = daemon_factory(JOBD_FAST_PATH="false")
    upload(off, "j", "true\n")
    off.wait_done("j")
    assert b'"ID":"j"' in exchange(off, raw_get("/api/get/j"))
    assert fast_count(off) == 0


def test_mutual_tls_answers_fast_by_certificate(zipapp: Path, tmp_path: Path,
                                                pki: dict[str, Any]) -> None:
    """Over TLS the certificate names the caller (the ASGI TLS extension the fast path hands
    the authenticator): the owner and an admin get the job, another client a 404."""
    daemon = start(zipapp, tmp_path / "mtls", verify=tls_context(pki, "ops"),
                   JOBD_TLS_CLIENT_CA=str(pki["where"] / "ca.pem"),
                   JOBD_TLS_ADMINS="ops", **tls_env(pki))
    try:
        job_id = tls_upload(daemon, pki, "alice")
        wait_until(lambda: daemon.client.get(f"/api/get/{job_id}").status_code == 200,
                   what="alice's job")
        alice = same_both_ways(daemon, f"/api/get/{job_id}", tls=tls_context(pki, "alice"))
        assert f'"ID":"{job_id}"'.encode() in alice
        admin = same_both_ways(daemon, f"/api/get/{job_id}", tls=tls_context(pki, "ops"))
        assert undated(admin) == undated(alice)
        bob = tls_context(pki, "bob")
        ghost = same_both_ways(daemon, "/api/get/no-such-job", tls=bob)
        assert undated(same_both_ways(daemon, f"/api/get/{job_id}", tls=bob)) == undated(ghost)
        assert "client=alice" in daemon.log()
    finally:
        daemon.stop()
        daemon.client.close()


def test_locked_mode_reads_the_same(daemon_factory: Callable[..., Daemon]) -> None:
    """Locked mode refuses uploads; reads are the endpoints' business, fast or not."""
    locked = daemon_factory(JOBD_LOCKED="true")
    assert locked.upload("refused", {"run.sh": "true\n"}).status_code == 403
    same_both_ways(locked, "/api/get/refused")
    same_both_ways(locked, "/api/v1/jobs/refused")
