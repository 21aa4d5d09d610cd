"""Authentication and authorization over every route, against the built zipapp.

Tokens (wrong, expired, other clients'), per-job secrets, TLS, and mutual TLS with good,
unknown, expired and missing client certificates (made here with trustme).

The routes are data: `JOB_ROUTES` (routes that act on one job), `CREATE_ROUTES` (routes that
create one) and `OTHER_ROUTES`. Routes of every protocol are listed; those the build does not
have are skipped, so the native API and the orchestrator protocol are checked as soon as they
are merged. `test_every_route_is_covered` compares the lists with the daemon's routing table: a
route added without a line here fails the suite.
"""

from __future__ import annotations

import datetime
import hashlib
import signal
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
import trustme

from jobd.app import create_app
from jobd.auth import Authenticator
from jobd.config import Config
from tests.conftest import Daemon, classic_body, python39, wait_until

TOKENS = {"alice": "alice-0123456789abcdef", "bob": "bob-0123456789abcdef",
          "root": "root-0123456789abcdef"}
ROLES = {"alice": "client", "bob": "client", "root": "admin"}
EXPIRED = "expired-0123456789abcdef"
SECRET = "job-secret-0123456789"
RUN = {"run.sh": "#!/bin/sh\necho hello > out.txt\n"}
FAST = {"JOBD_FSYNC": "false"}


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


# -- the routes, as data ----------------------------------------------------------------------

PRESENT = {getattr(r, "path", "") for r in
           create_app(Config.load({}), authenticator=Authenticator()).routes}


class JobRoute:
    """A route that acts on one job.

    A caller that may not see the job gets exactly the answer of a job that does not exist;
    a caller that may gets anything else but a server error (`ok`, when given, narrows it).
    `numeric`: the protocol addresses jobs by unsigned integer ids (the orchestrator).
    `extra` holds further httpx arguments (a body, for instance)."""

    def __init__(self, method: str, path: str, ok: set[int] | None = None, *,
                 numeric: bool = False, **extra: Any) -> None:
        self.method = method
        self.path = path  # with {id}, as in the routing table
        self.ok = frozenset(ok) if ok else None
        self.numeric = numeric
        self.extra = extra

    def __repr__(self) -> str:
        return f"{self.method} {self.path}"

    def call(self, client: httpx.Client, job_id: str, headers: dict[str, str],
             params: dict[str, str] | None = None) -> httpx.Response:
        path = self.path.replace("{id}", job_id).replace("{path:path}", "run.sh")
        return client.request(self.method, path, headers=headers, params=params, **self.extra)

    def allowed(self, response: httpx.Response, ghost: httpx.Response) -> bool:
        if response.status_code >= 500 or same_answer(response, ghost):
            return False
        return self.ok is None or response.status_code in self.ok


@dataclass(frozen=True)
class CreateRoute:
    """A route that creates a job: `create(client, job_id, headers, secret)` -> (answer, id).

    `secrets`: whether the route takes a per-job secret."""

    name: str
    path: str
    create: Callable[[httpx.Client, str, dict[str, str], str | None],
                     tuple[httpx.Response, str | None]]
    secrets: bool = True


def classic_create(client: httpx.Client, job_id: str, headers: dict[str, str],
                   secret: str | None) -> tuple[httpx.Response, str | None]:
    extra = {"secret": secret} if secret is not None else {}
    response = client.post("/api/upload", json=classic_body(job_id, RUN, **extra),
                           headers=headers)
    return response, job_id


def native_create(client: httpx.Client, job_id: str, headers: dict[str, str],
                  secret: str | None) -> tuple[httpx.Response, str | None]:
    body = classic_body(job_id, RUN)
    if secret is not None:
        body["secret"] = secret
    return client.post("/api/v1/jobs", json=body, headers=headers), job_id


def orchestrator_create(client: httpx.Client, job_id: str, headers: dict[str, str],
                        secret: str | None) -> tuple[httpx.Response, str | None]:
    response = client.post("/submit", headers=headers, files=[
        ("file", ("run.sh", RUN["run.sh"].encode(), "application/octet-stream"))])
    made = str(response.json()["id"]) if response.status_code == 200 else None
    return response, made


JOB_ROUTES = [
    JobRoute("GET", "/api/get/{id}", {200, 202}),
    # native API (ARCHITECTURE.md)
    JobRoute("GET", "/api/v1/jobs/{id}", {200}),
    JobRoute("DELETE", "/api/v1/jobs/{id}", {204, 409}),
    JobRoute("POST", "/api/v1/jobs/{id}/cancel", {200}),
    JobRoute("POST", "/api/v1/jobs/{id}/restart", {200, 409}),
    JobRoute("GET", "/api/v1/jobs/{id}/logs", {200}),
    JobRoute("GET", "/api/v1/jobs/{id}/files", {200, 409}),
    JobRoute("GET", "/api/v1/jobs/{id}/files/{path:path}"),
    JobRoute("GET", "/api/v1/jobs/{id}/archive", {200, 409}),
    JobRoute("GET", "/api/v1/jobs/{id}/artifacts", {200}),
    # orchestrator protocol (wire-compat.md section 2)
    JobRoute("GET", "/retrieve/{id}", {200}, numeric=True),
    JobRoute("GET", "/retrieve_partial/{id}", {200}, numeric=True),
    JobRoute("POST", "/kill/{id}", {200}, numeric=True),
]
CREATE_ROUTES = [
    CreateRoute("classic", "/api/upload", classic_create),
    CreateRoute("native", "/api/v1/jobs", native_create),
    CreateRoute("orchestrator", "/submit", orchestrator_create, secrets=False),
]
# Routes that need no job: every one but /health needs credentials when authentication is on.
OPEN_ROUTES = {"/health"}
OTHER_ROUTES = {"/", "/load", "/api/v1/jobs", "/api/v1/overview", "/metrics", "/openapi.json",
                "/docs", "/api/v1/specs", "/api/v1/specs/{name}",
                "/api/v1/specs/{name}/jobs"}  # spec jobs get their owner as any create does


def present(route: Any) -> Any:
    return pytest.param(route, id=str(getattr(route, "name", route)), marks=[] if route.path
                        in PRESENT else [pytest.mark.skip(reason=f"{route.path} is not in "
                                                                 "this build")])


def test_every_route_is_covered() -> None:
    """A route nobody listed here has not been checked for authorization: list it above."""
    listed = {r.path for r in JOB_ROUTES} | {r.path for r in CREATE_ROUTES} | OPEN_ROUTES \
        | OTHER_ROUTES
    missing = sorted(path for path in PRESENT if path not in listed)
    assert not missing, f"add these routes to JOB_ROUTES, CREATE_ROUTES or OTHER_ROUTES: {missing}"


# -- daemons ----------------------------------------------------------------------------------


def start(zipapp: Path, where: Path, *, verify: ssl.SSLContext | None = None,
          interpreter: str | None = None, **env: str) -> Daemon:
    """A daemon; with `verify` it speaks HTTPS and its client uses that context."""
    where.mkdir(parents=True, exist_ok=True)
    daemon = Daemon(zipapp, where, interpreter, **FAST, **env)
    if verify is not None:
        daemon.url = f"https://127.0.0.1:{daemon.port}"
        daemon.client.close()
        daemon.client = httpx.Client(base_url=daemon.url, timeout=30, verify=verify)
    return daemon.start()


def stop(daemon: Daemon) -> None:
    if daemon.proc is not None and daemon.proc.poll() is None:
        daemon.stop(signal.SIGTERM)
    daemon.client.close()


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    lines = [f"{name}:{ROLES[name]}:{sha(token)}" for name, token in TOKENS.items()]
    lines.append(f"old:client:{sha(EXPIRED)}:2001-02-03T04:05:06Z")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def secured(zipapp: Path, tmp_path_factory: pytest.TempPathFactory,
            tokens_file: Path) -> Iterator[Daemon]:
    daemon = start(zipapp, tmp_path_factory.mktemp("secured"),
                   JOBD_TOKENS_FILE=str(tokens_file))
    yield daemon
    stop(daemon)


@pytest.fixture(scope="module")
def anonymous(zipapp: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    daemon = start(zipapp, tmp_path_factory.mktemp("anonymous"))
    yield daemon
    stop(daemon)


def new_id(prefix: str, numeric: bool = False) -> str:
    if numeric:  # an unsigned 32-bit id, as the orchestrator protocol addresses jobs
        return str(3_000_000_000 + uuid.uuid4().int % 1_000_000_000)
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def create(daemon: Daemon, owner: str | None, route: CreateRoute | None = None,
           secret: str | None = None, numeric: bool = False) -> str:
    route = route or CREATE_ROUTES[0]
    response, job_id = route.create(daemon.client, new_id(owner or "anon", numeric),
                                    auth_headers(TOKENS[owner] if owner else None), secret)
    assert response.status_code in (200, 201) and job_id is not None, response.text
    return job_id


def same_answer(response: httpx.Response, ghost: httpx.Response) -> bool:
    """Whether `response` is the answer a job that does not exist gets (status and body)."""
    return response.status_code == ghost.status_code == 404 and response.content == ghost.content


def is_not_found(response: httpx.Response) -> bool:
    """The classic answer of a job that does not exist."""
    return response.status_code == 404 and response.json() == {
        "error": "not_found", "message": "job not found", "status": 404}


def ghost_of(daemon: Daemon, route: JobRoute, token: str | None) -> httpx.Response:
    """The route's answer for a job that does not exist."""
    ghost = route.call(daemon.client, new_id("ghost", route.numeric), auth_headers(token))
    assert ghost.status_code == 404 and ghost.json()["error"] == "not_found", ghost.text
    return ghost


# -- tokens -----------------------------------------------------------------------------------


@pytest.mark.parametrize("route", [present(r) for r in CREATE_ROUTES])
def test_create_records_the_owner(secured: Daemon, route: CreateRoute) -> None:
    job_id = create(secured, "alice", route)
    reader = JOB_ROUTES[0]  # the classic read reaches jobs of every protocol
    ghost = ghost_of(secured, reader, TOKENS["alice"])
    for caller, token in TOKENS.items():
        response = reader.call(secured.client, job_id, auth_headers(token))
        assert reader.allowed(response, ghost) is (caller in ("alice", "root")), response.text
    log = (secured.workdir / "daemon.log").read_text()
    assert TOKENS["alice"] not in log and sha(TOKENS["alice"]) not in log


@pytest.mark.parametrize("route", [present(r) for r in JOB_ROUTES])
def test_each_client_against_every_other_clients_job(secured: Daemon, route: JobRoute) -> None:
    """A regular client sees its own jobs only, the admin every job; another client's job
    answers exactly like a job that does not exist."""
    for owner in TOKENS:
        for caller, token in TOKENS.items():
            ghost = ghost_of(secured, route, token)
            job_id = create(secured, owner, numeric=route.numeric)  # fresh: it may be deleted
            response = route.call(secured.client, job_id, auth_headers(token))
            if caller == owner or ROLES[caller] == "admin":
                assert route.allowed(response, ghost), (owner, caller, response.text)
            else:
                assert same_answer(response, ghost), (owner, caller, response.text)
                # the secret of another's job does not help a client either
                again = route.call(secured.client, job_id, {**auth_headers(token),
                                                            "X-Job-Secret": SECRET})
                assert same_answer(again, ghost), (owner, caller, again.text)


@pytest.mark.parametrize("route", [present(r) for r in CREATE_ROUTES])
def test_listing_shows_each_client_its_own_jobs(secured: Daemon, route: CreateRoute) -> None:
    if "/api/v1/jobs" not in PRESENT:
        pytest.skip("GET /api/v1/jobs is not in this build")
    mine = {owner: create(secured, owner, route) for owner in TOKENS}
    for caller, token in TOKENS.items():
        listing = secured.client.get("/api/v1/jobs", params={"limit": 1000},
                                     headers=auth_headers(token))
        assert listing.status_code == 200, listing.text
        seen = {j["id"] for j in listing.json()["jobs"]}
        for owner, job_id in mine.items():
            assert (job_id in seen) is (owner == caller or ROLES[caller] == "admin")


def all_paths() -> list[tuple[str, str]]:
    """(method, path) of every route the build has, plus unknown ones: all need a token."""
    found = [(r.method, r.path.replace("{id}", "123").replace("{path:path}", "x"))
             for r in JOB_ROUTES if r.path in PRESENT]
    found += [("POST", r.path) for r in CREATE_ROUTES if r.path in PRESENT]
    found += [("GET", path) for path in sorted(OTHER_ROUTES) if path in PRESENT]
    return [*found, ("GET", "/no/such/route"), ("GET", "/"), ("POST", "/health/x")]


@pytest.mark.parametrize(("token", "message"), [
    (None, "authentication required: send Authorization: Bearer <token>"),
    ("wrong-token-0123456789", "invalid token"),
    (EXPIRED, "the token has expired"),
    (TOKENS["alice"] + "x", "invalid token"),
])
def test_wrong_missing_and_expired_tokens_on_every_route(secured: Daemon, token: str | None,
                                                         message: str) -> None:
    for method, path in all_paths():
        response = httpx.request(method, secured.url + path, headers=auth_headers(token),
                                 content=b"{}")
        assert response.status_code == 401, (method, path, response.text)
        assert response.json() == {"error": "unauthorized", "message": message,
                                   "status": 401}
        assert response.headers["www-authenticate"].startswith('Bearer realm="jobd"')
    assert secured.proc is not None and secured.proc.poll() is None


def test_malformed_authorization_headers(secured: Daemon) -> None:
    for value in ("Basic YWxpY2U6eA==", "Bearer", "Token " + TOKENS["alice"]):
        response = httpx.get(secured.url + "/api/get/x", headers={"Authorization": value})
        assert response.status_code == 401 and "Bearer <token>" in response.json()["message"]


def test_health_needs_no_token(secured: Daemon) -> None:
    response = httpx.get(secured.url + "/health")
    assert response.status_code == 200 and response.json() == {"status": "healthy"}


def test_upload_without_token_stores_nothing(secured: Daemon) -> None:
    job_id = new_id("nobody")
    response = httpx.post(secured.url + "/api/upload", json=classic_body(job_id, RUN))
    assert response.status_code == 401
    assert not (secured.datapath / job_id).exists()
    root = secured.client.get(f"/api/get/{job_id}", headers=auth_headers(TOKENS["root"]))
    assert is_not_found(root)  # not even the admin: nothing was stored


def test_owner_does_not_need_the_secret(secured: Daemon) -> None:
    reader = JOB_ROUTES[0]
    job_id = create(secured, "bob", secret=SECRET)
    ghost = ghost_of(secured, reader, TOKENS["alice"])
    own = reader.call(secured.client, job_id, auth_headers(TOKENS["bob"]))
    assert reader.allowed(own, ghost)
    other = reader.call(secured.client, job_id, {**auth_headers(TOKENS["alice"]),
                                                 "X-Job-Secret": SECRET})
    assert same_answer(other, ghost)


# -- per-job secrets (authentication off) -----------------------------------------------------


@pytest.mark.parametrize("route", [present(r) for r in JOB_ROUTES])
def test_a_secret_job_needs_its_secret(anonymous: Daemon, route: JobRoute) -> None:
    creator = next(c for c in CREATE_ROUTES if c.secrets)  # classic: ids of any form
    ghost = ghost_of(anonymous, route, None)
    plain = create(anonymous, None, creator, numeric=route.numeric)
    assert route.allowed(route.call(anonymous.client, plain, {}), ghost)
    for how in ("none", "wrong", "header", "query", "empty"):
        job_id = create(anonymous, None, creator, secret=SECRET, numeric=route.numeric)
        headers: dict[str, str] = {}
        params = None
        if how == "wrong":
            headers = {"X-Job-Secret": SECRET + "x"}
        elif how == "header":
            headers = {"X-Job-Secret": SECRET}
        elif how == "query":
            params = {"secret": SECRET}
        elif how == "empty":
            headers = {"X-Job-Secret": ""}
        response = route.call(anonymous.client, job_id, headers, params)
        if how in ("header", "query"):
            assert route.allowed(response, ghost), (how, response.text)
            assert SECRET not in response.text
        else:
            assert same_answer(response, ghost), (how, response.text)


@pytest.mark.parametrize("route", [present(r) for r in CREATE_ROUTES if r.secrets])
def test_the_secret_is_never_echoed_nor_stored(anonymous: Daemon, route: CreateRoute) -> None:
    response, job_id = route.create(anonymous.client, new_id("quiet"), {}, SECRET)
    assert response.status_code in (200, 201) and SECRET not in response.text
    assert job_id is not None

    def finished() -> httpx.Response | None:
        got = anonymous.client.get(f"/api/get/{job_id}", headers={"X-Job-Secret": SECRET})
        return got if got.status_code == 200 else None

    done = wait_until(finished, 30, 0.05, "the job to finish")
    assert SECRET not in done.text and "secret_hash" not in done.text
    for path in [*anonymous.db_path.rglob("*"), anonymous.workdir / "daemon.log"]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.parametrize(("secret", "message"), [
    (12345678, "secret must be a string"),
    ("short", "secret must be 8 to 256 printable ASCII characters"),
    ("has a space in it", "secret must be 8 to 256"),
    ("x" * 257, "secret must be 8 to 256"),
])
def test_bad_secrets_are_refused(anonymous: Daemon, secret: Any, message: str) -> None:
    job_id = new_id("badsecret")
    response = anonymous.client.post("/api/upload",
                                     json=classic_body(job_id, RUN, secret=secret))
    assert response.status_code == 400
    assert response.json()["message"] == f"error validating job {message}" or \
        message in response.json()["message"]
    assert not (anonymous.datapath / job_id).exists()


# -- TLS and mutual TLS -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A CA, the server's certificate, client certificates good and bad, as files."""
    where = tmp_path_factory.mktemp("pki")
    ca, stranger = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    files: dict[str, Any] = {"ca_obj": ca, "where": where}
    server.private_key_pem.write_to_path(str(where / "server.key"))
    server.cert_chain_pems[0].write_to_path(str(where / "server.pem"))
    ca.cert_pem.write_to_path(str(where / "ca.pem"))
    past = datetime.datetime(2001, 1, 1, tzinfo=datetime.timezone.utc)
    files["certs"] = {
        "alice": ca.issue_cert("alice@clients", common_name="alice"),
        "bob": ca.issue_cert("bob@clients", common_name="bob"),
        "ops": ca.issue_cert("ops@clients", common_name="ops"),
        "stranger": stranger.issue_cert("alice@clients", common_name="alice"),
        "expired": ca.issue_cert("alice@clients", common_name="alice", not_before=past,
                                 not_after=past + datetime.timedelta(days=1)),
    }
    return files


def tls_context(pki: dict[str, Any], cert: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    pki["ca_obj"].configure_trust(context)
    if cert is not None:
        pki["certs"][cert].configure_cert(context)
    return context


def tls_env(pki: dict[str, Any], **extra: str) -> dict[str, str]:
    where = pki["where"]
    return {"JOBD_TLS_CERT": str(where / "server.pem"), "JOBD_TLS_KEY": str(where / "server.key"),
            **extra}


def test_tls_serves_https_and_tokens_work_over_it(zipapp: Path, tmp_path: Path,
                                                  pki: dict[str, Any], tokens_file: Path) -> None:
    daemon = start(zipapp, tmp_path / "tls", verify=tls_context(pki),
                   JOBD_TOKENS_FILE=str(tokens_file), **tls_env(pki))
    try:
        job_id = create(daemon, "alice")
        own = daemon.client.get(f"/api/get/{job_id}", headers=auth_headers(TOKENS["alice"]))
        assert own.status_code in (200, 202)
        assert is_not_found(daemon.client.get(f"/api/get/{job_id}",
                                              headers=auth_headers(TOKENS["bob"])))
        assert daemon.client.get("/api/get/x").status_code == 401
        with pytest.raises(httpx.TransportError):  # plain HTTP to the TLS port
            httpx.get(f"http://127.0.0.1:{daemon.port}/health", timeout=10)
        with pytest.raises(httpx.TransportError):  # a client that does not trust the CA
            httpx.get(daemon.url + "/health", timeout=10)
        assert daemon.client.get("/health").status_code == 200
        assert "listening on https://" in daemon.log()
    finally:
        stop(daemon)


def tls_get(daemon: Daemon, pki: dict[str, Any], cert: str | None, path: str,
            **kwargs: Any) -> httpx.Response:
    with httpx.Client(base_url=daemon.url, verify=tls_context(pki, cert), timeout=15) as c:
        return c.get(path, **kwargs)


def tls_upload(daemon: Daemon, pki: dict[str, Any], cert: str | None,
               **kwargs: Any) -> str:
    job_id = new_id(cert or "anon")
    with httpx.Client(base_url=daemon.url, verify=tls_context(pki, cert), timeout=15) as c:
        response = c.post("/api/upload", json=classic_body(job_id, RUN), **kwargs)
    assert response.status_code == 201, response.text
    return job_id


def test_mutual_tls_required(zipapp: Path, tmp_path: Path, pki: dict[str, Any]) -> None:
    """The CN names the client; certificates from elsewhere, expired or missing get no
    handshake at all; the daemon keeps serving."""
    daemon = start(zipapp, tmp_path / "mtls", verify=tls_context(pki, "alice"),
                   JOBD_TLS_CLIENT_CA=str(pki["where"] / "ca.pem"), JOBD_TLS_ADMINS="ops",
                   **tls_env(pki))
    try:
        job_id = tls_upload(daemon, pki, "alice")
        assert tls_get(daemon, pki, "alice", f"/api/get/{job_id}").status_code in (200, 202)
        assert tls_get(daemon, pki, "ops", f"/api/get/{job_id}").status_code in (200, 202)
        assert is_not_found(tls_get(daemon, pki, "bob", f"/api/get/{job_id}"))
        for cert in ("stranger", "expired", None):
            with pytest.raises(httpx.TransportError):
                tls_get(daemon, pki, cert, f"/api/get/{job_id}")
            with pytest.raises(httpx.TransportError):
                tls_get(daemon, pki, cert, "/health")
        assert tls_get(daemon, pki, "bob", "/health").status_code == 200
        assert daemon.proc is not None and daemon.proc.poll() is None
        assert "client=alice" in daemon.log()
    finally:
        stop(daemon)


def test_mutual_tls_optional_with_tokens(zipapp: Path, tmp_path: Path, pki: dict[str, Any],
                                         tokens_file: Path) -> None:
    """Without a certificate a token is needed (/health needs neither); a certificate CN and
    a token name the same client; an unknown certificate still gets no handshake."""
    daemon = start(zipapp, tmp_path / "optional", verify=tls_context(pki),
                   JOBD_TLS_CLIENT_CA=str(pki["where"] / "ca.pem"),
                   JOBD_TLS_CLIENT_CERT="optional", JOBD_TOKENS_FILE=str(tokens_file),
                   **tls_env(pki))
    try:
        job_id = tls_upload(daemon, pki, None, headers=auth_headers(TOKENS["alice"]))
        assert tls_get(daemon, pki, None, "/health").status_code == 200
        bare = tls_get(daemon, pki, None, f"/api/get/{job_id}")
        assert bare.status_code == 401 and "or a client certificate" in bare.json()["message"]
        assert tls_get(daemon, pki, "alice", f"/api/get/{job_id}").status_code in (200, 202)
        assert is_not_found(tls_get(daemon, pki, "bob", f"/api/get/{job_id}"))
        wrong = tls_get(daemon, pki, "alice", f"/api/get/{job_id}",
                        headers=auth_headers("wrong-token-0123456789"))
        assert wrong.status_code == 401  # a token sent decides, even with a good certificate
        with pytest.raises(httpx.TransportError):
            tls_get(daemon, pki, "stranger", "/health")
        assert daemon.proc is not None and daemon.proc.poll() is None
    finally:
        stop(daemon)


@pytest.mark.skipif(python39() is None, reason="no CPython 3.9 on this machine")
def test_tokens_and_mutual_tls_under_python39(zipapp: Path, tmp_path: Path,
                                              pki: dict[str, Any], tokens_file: Path) -> None:
    """The oldest supported Python: the TLS extension, tokens and the rule work there too."""
    daemon = start(zipapp, tmp_path / "py39", verify=tls_context(pki),
                   interpreter=python39(), JOBD_TLS_CLIENT_CA=str(pki["where"] / "ca.pem"),
                   JOBD_TLS_CLIENT_CERT="optional", JOBD_TOKENS_FILE=str(tokens_file),
                   **tls_env(pki))
    try:
        job_id = tls_upload(daemon, pki, "alice")
        assert tls_get(daemon, pki, "alice", f"/api/get/{job_id}").status_code in (200, 202)
        assert tls_get(daemon, pki, None, f"/api/get/{job_id}",
                       headers=auth_headers(TOKENS["alice"])).status_code in (200, 202)
        assert is_not_found(tls_get(daemon, pki, "bob", f"/api/get/{job_id}"))
        expired = tls_get(daemon, pki, None, "/api/get/x", headers=auth_headers(EXPIRED))
        assert expired.json()["message"] == "the token has expired"
    finally:
        stop(daemon)


# -- start-up ---------------------------------------------------------------------------------


def warnings_in(daemon: Daemon) -> list[str]:
    return [line for line in daemon.log().splitlines() if "authentication is off" in line]


def test_one_warning_when_open_beyond_loopback(zipapp: Path, tmp_path: Path,
                                               tokens_file: Path) -> None:
    open_daemon = start(zipapp, tmp_path / "open", JOBD_HOST="0.0.0.0")
    closed = start(zipapp, tmp_path / "closed", JOBD_HOST="0.0.0.0",
                   JOBD_TOKENS_FILE=str(tokens_file))
    local = start(zipapp, tmp_path / "local")
    try:
        lines = warnings_in(open_daemon)
        assert len(lines) == 1 and "WARNING" in lines[0] and "0.0.0.0" in lines[0]
        assert warnings_in(closed) == [] and warnings_in(local) == []
        assert "authentication on: 4 token(s) for 4 client(s)" in closed.log()
    finally:
        for daemon in (open_daemon, closed, local):
            stop(daemon)


@pytest.mark.parametrize(("env", "message"), [
    ({"JOBD_TLS_CLIENT_CA": "/nonexistent/ca.pem"}, "JOBD_TLS_CLIENT_CA (mutual TLS) needs"),
    ({"JOBD_TLS_KEY": "/x.key"}, "JOBD_TLS_KEY needs JOBD_TLS_CERT"),
    ({"JOBD_TLS_CERT": "/nonexistent/cert.pem"}, "cannot load /nonexistent/cert.pem"),
    ({"JOBD_TLS_ADMINS": "ops"}, "JOBD_TLS_ADMINS needs JOBD_TLS_CLIENT_CA"),
    ({"JOBD_TOKEN_EVE": "plain-token"}, "JOBD_TOKEN_EVE: expected the SHA-256"),
    ({"JOBD_TOKENS_FILE": "/nonexistent/tokens"}, "JOBD_TOKENS_FILE: cannot read"),
    ({"JOBD_TLS_CLIENT_CERT": "sometimes"}, "JOBD_TLS_CLIENT_CERT"),
])
def test_bad_security_settings_stop_the_start(zipapp: Path, tmp_path: Path,
                                              env: dict[str, str], message: str) -> None:
    daemon = Daemon(zipapp, tmp_path, **env)
    result = subprocess.run([str(zipapp)], env=daemon.env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    daemon.client.close()
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
