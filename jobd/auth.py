"""Who is calling, and which jobs they may touch.

jobd runs the code it is handed, so whoever can call it can run code in its container.

Authentication is on as soon as clients are configured: bearer tokens (JOBD_TOKENS_FILE,
JOBD_TOKEN_<NAME>) or a client CA (mutual TLS). Then every request but `GET /health` needs
credentials, whatever the protocol (classic, orchestrator, native), and `AuthMiddleware`
answers 401 before any route runs. The caller becomes a `Client` (name, role) in
`scope["state"]["client"]` (`request.state.client`); `client_of(request)` adds the per-job
secret the request carries.

Authorization is one rule, `allows(client, record)`, applied where a job is loaded
(`JobManager.get(job_id, client=...)`, which every protocol calls): an admin sees every job, a
regular client the jobs it created (`owner`), an anonymous caller (authentication off) every
job except those created with a secret, which need that secret. A job the caller may not see
answers exactly like a job that does not exist (404), so existence does not leak.

Decisions:
- Tokens are stored as the SHA-256 of the token, never the token: tokens are random and long
  (`jobd new-token` makes 256-bit ones), so a plain hash is enough, and a request costs one
  hash. The presented token's hash is compared with every configured hash using
  `hmac.compare_digest`, without stopping at a match.
- `JOBD_TOKEN_<NAME>` takes a hash only (`[role:]<sha256>[:expires]`): a plain token in the
  environment would show in `ps e`, `docker inspect` and crash reports.
- A certificate names the client by its subject's one CN; JOBD_TLS_ADMINS lists the admin
  CNs. A bearer token, when sent, decides over a certificate (a wrong token is a 401 even
  with a good certificate). A token client and a certificate with the same name are the
  same client.
- Per-job secrets are stored as a salted SHA-256 (`sha256$<salt>$<digest>`), and only gate
  anonymous callers: with authentication on, ownership decides.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets as _secrets
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Callable

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from jobd.config import Config, ConfigError
from jobd.errors import error

log = logging.getLogger("jobd.auth")

ADMIN = "admin"
CLIENT = "client"
ROLES = (ADMIN, CLIENT)

# Requests that never need credentials: container health checks must keep working.
OPEN_PATHS = frozenset({"/health"})

SECRET_HEADER = "x-job-secret"
SECRET_QUERY = "secret"
SECRET_RULE = "8 to 256 printable ASCII characters without spaces"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_SECRET = re.compile(r"[\x21-\x7e]{8,256}")
_TOKEN = re.compile(r"[\x21-\x7e]{1,4096}")
_ENV_PREFIX = "JOBD_TOKEN_"


@dataclass(frozen=True)
class Client:
    """The caller of one request. `name` None: anonymous (authentication is off)."""

    name: str | None = None
    role: str = CLIENT
    via: str = "anonymous"  # "token", "certificate" or "anonymous"
    secret: str | None = field(default=None, repr=False)  # a per-job secret it presented

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    @property
    def is_anonymous(self) -> bool:
        return self.name is None


ANONYMOUS = Client()


@dataclass(frozen=True)
class Token:
    """One configured token: whose it is, the hash, and when it stops working."""

    client: str
    role: str
    digest: bytes = field(repr=False)
    expires: float | None = None
    source: str = ""  # file and line or variable, for messages


class Unauthorized(Exception):
    """No usable credentials; the message is for the client. `invalid` when some were sent."""

    def __init__(self, message: str, *, invalid: bool = False) -> None:
        super().__init__(message)
        self.invalid = invalid


# -- tokens and secrets ---------------------------------------------------------------------


def hash_token(token: str) -> str:
    """The hex SHA-256 that a tokens file or JOBD_TOKEN_<NAME> holds for `token`."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh token: 256 random bits, URL-safe (fits a header unquoted)."""
    return _secrets.token_urlsafe(32)


def secret_problem(value: Any) -> str | None:
    """Why `value` is not acceptable as a per-job secret, or None."""
    if not isinstance(value, str):
        return "secret must be a string"
    if not _SECRET.fullmatch(value):
        return f"secret must be {SECRET_RULE}"
    return None


def hash_secret(secret: str, salt: bytes | None = None) -> str:
    """What a job record keeps of its secret: `sha256$<salt hex>$<digest hex>`."""
    salt = _secrets.token_bytes(16) if salt is None else salt
    digest = hashlib.sha256(salt + secret.encode("utf-8")).hexdigest()
    return f"sha256${salt.hex()}${digest}"


def check_secret(secret: str | None, stored: str) -> bool:
    """Whether `secret` is the one `stored` was made from (constant time in the digest)."""
    if secret is None:
        return False
    try:
        kind, salt, digest = stored.split("$")
        salt_bytes = bytes.fromhex(salt)
    except ValueError:
        log.error("a job record holds a malformed secret hash; nobody gets in with a secret")
        return False
    if kind != "sha256":
        return False
    given = hash_secret(secret, salt_bytes).rsplit("$", 1)[1]
    return hmac.compare_digest(given.encode("ascii"), digest.encode("ascii"))


# -- the tokens file and variables ----------------------------------------------------------


def _expiry(value: Any, where: str) -> float | None:
    """Epoch seconds from a TOML date/datetime or text (RFC 3339, a date, or epoch seconds).

    Times without a zone are UTC; a date means the start of that day (UTC).
    """
    if value is None or value == "":
        return None
    moment: datetime
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d+(\.\d+)?", text):
            return float(text)
        if text[-1:] in ("Z", "z"):
            text = text[:-1] + "+00:00"
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise ConfigError(f"{where}: expires must be an RFC 3339 time, a date or epoch "
                              f"seconds, not {value!r}") from None
    else:
        raise ConfigError(f"{where}: expires must be a date or time, not {value!r}")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _token(name: Any, role: Any, digest: Any, expires: Any, where: str) -> Token:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{where}: client name {name!r} must be 1 to 128 characters from "
                          "A-Z a-z 0-9 . _ @ -, starting with a letter or digit")
    role = CLIENT if role in (None, "") else role
    if role not in ROLES:
        raise ConfigError(f"{where}: role {role!r} must be {' or '.join(ROLES)}")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise ConfigError(f"{where}: expected the SHA-256 of the token as 64 hex digits "
                          "(`jobd hash-token` prints it), not a token")
    return Token(name, role, bytes.fromhex(digest), _expiry(expires, where), where)


def parse_token_lines(text: str, source: str) -> list[Token]:
    """`name:role:sha256[:expires]` lines; `#` comments and blank lines are skipped."""
    tokens = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":", 3)
        where = f"{source}:{number}"
        if len(parts) < 3:
            raise ConfigError(f"{where}: expected name:role:sha256[:expires]")
        tokens.append(_token(parts[0], parts[1], parts[2], parts[3] if len(parts) > 3 else None,
                             where))
    return tokens


def parse_token_toml(text: str, source: str) -> list[Token]:
    """`[[token]]` tables with `client`, `role`, `sha256` and an optional `expires`."""
    # The TOML parser only for a TOML tokens file: keeps an idle daemon's memory down.
    if sys.version_info >= (3, 11):
        import tomllib  # novermin: 3.11+, by the check above
    else:  # Python 3.9 and 3.10: the same parser, as a pure-Python package
        import tomli as tomllib

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    unknown = sorted(set(data) - {"token"})
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)} (expected [[token]])")
    entries = data.get("token", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: `token` must be an array of tables ([[token]])")
    tokens = []
    for number, entry in enumerate(entries, 1):
        where = f"{source} [[token]] #{number}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a table")
        extra = sorted(set(entry) - {"client", "role", "sha256", "expires"})
        if extra:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(extra)}")
        tokens.append(_token(entry.get("client"), entry.get("role"), entry.get("sha256"),
                             entry.get("expires"), where))
    return tokens


def load_token_file(path: Path) -> list[Token]:
    """A tokens file: TOML when it ends in `.toml`, else the lines format."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"JOBD_TOKENS_FILE: cannot read {path}: {exc}") from exc
    if path.suffix.lower() == ".toml":
        return parse_token_toml(text, str(path))
    return parse_token_lines(text, str(path))


def tokens_from_environ(environ: Mapping[str, str]) -> list[Token]:
    """`JOBD_TOKEN_<NAME>=[role:]<sha256>[:expires]`; the client is <name>, lower-cased."""
    tokens = []
    for variable in sorted(environ):
        if not variable.startswith(_ENV_PREFIX) or variable == _ENV_PREFIX:
            continue
        name = variable[len(_ENV_PREFIX):].lower()
        parts = environ[variable].strip().split(":", 2)
        if len(parts) == 1:
            parts = [CLIENT, parts[0]]
        tokens.append(_token(name, parts[0], parts[1], parts[2] if len(parts) > 2 else None,
                             variable))
    return tokens


def _check_consistent(tokens: Sequence[Token]) -> None:
    roles: dict[str, Token] = {}
    digests: dict[bytes, Token] = {}
    for token in tokens:
        first = roles.setdefault(token.client, token)
        if first.role != token.role:
            raise ConfigError(f"{token.source}: client {token.client!r} is {token.role} here "
                              f"but {first.role} in {first.source}")
        twin = digests.setdefault(token.digest, token)
        if twin is not token:
            raise ConfigError(f"{token.source}: the same token hash as {twin.source}: every "
                              "token must be different")


# -- certificates ---------------------------------------------------------------------------


def _rdns(name: str) -> list[tuple[str, str]]:
    """The attribute=value pairs of an RFC 4514 name (the TLS extension's client_cert_name).

    Backslash escapes are undone (`\\,` and hex pairs such as `\\C3\\A9`, which are UTF-8
    bytes); `,` and `+` separate pairs.
    """
    pairs: list[tuple[str, str]] = []
    attr: str | None = None
    current = bytearray()
    i, n = 0, len(name)
    while i < n:
        c = name[i]
        if c == "\\" and i + 1 < n:
            pair = name[i + 1:i + 3]
            if len(pair) == 2 and all(ch in "0123456789abcdefABCDEF" for ch in pair):
                current.append(int(pair, 16))
                i += 3
            else:
                current += name[i + 1].encode("utf-8", "surrogateescape")
                i += 2
            continue
        if c == "=" and attr is None:
            attr = current.decode("utf-8", "replace").strip()
            current = bytearray()
        elif c in ",+":
            pairs.append((attr or "", current.decode("utf-8", "replace")))
            attr, current = None, bytearray()
        else:
            current += c.encode("utf-8", "surrogateescape")
        i += 1
    if attr is not None:
        pairs.append((attr, current.decode("utf-8", "replace")))
    return pairs


def common_name(rfc4514: str) -> str | None:
    """The subject's one CN, or None when it has none or several."""
    names = [value for attr, value in _rdns(rfc4514) if attr.upper() in ("CN", "2.5.4.3")]
    return names[0] if len(names) == 1 else None


# -- the authenticator ----------------------------------------------------------------------


class Authenticator:
    """Turns a request's credentials into a Client (or refuses them)."""

    def __init__(self, tokens: Sequence[Token] = (), *, certificates: bool = False,
                 admins: Iterable[str] = ()) -> None:
        _check_consistent(tokens)
        self.tokens = tuple(tokens)
        self.certificates = certificates
        self.admins = frozenset(admins)

    @property
    def enabled(self) -> bool:
        return bool(self.tokens) or self.certificates

    @classmethod
    def from_config(cls, config: Config, environ: Mapping[str, str] | None = None,
                    ) -> Authenticator:
        """Tokens from the file and the environment, certificates when a client CA is set."""
        environ = os.environ if environ is None else environ
        tokens: list[Token] = []
        if config.tokens_file is not None:
            tokens.extend(load_token_file(config.tokens_file))
        tokens.extend(tokens_from_environ(environ))
        authenticator = cls(tokens, certificates=config.tls_client_ca is not None,
                            admins=config.tls_admins)
        if config.tokens_file is not None and not tokens:
            log.warning("JOBD_TOKENS_FILE %s holds no tokens: only certificates (if any) "
                        "get in", config.tokens_file)
        return authenticator

    def describe(self) -> str:
        """One line for the start-up log (never a token or hash)."""
        if not self.enabled:
            return "authentication off"
        parts = []
        if self.tokens:
            names = sorted({t.client for t in self.tokens})
            parts.append(f"{len(self.tokens)} token(s) for {len(names)} client(s)")
        if self.certificates:
            parts.append("client certificates")
        return "authentication on: " + ", ".join(parts)

    def authenticate(self, scope: Scope, now: float | None = None) -> Client:
        """The Client of an HTTP request; Unauthorized without usable credentials."""
        authorization = [v for k, v in scope["headers"] if k == b"authorization"]
        if len(authorization) > 1:
            raise Unauthorized("more than one Authorization header", invalid=True)
        if authorization:
            return self.by_token(_bearer(authorization[0]), now)
        tls = (scope.get("extensions") or {}).get("tls") or {}
        subject = tls.get("client_cert_name")
        if self.certificates and subject:
            return self.by_certificate(subject)
        how = "Authorization: Bearer <token>"
        if self.certificates:
            how += " or a client certificate"
        raise Unauthorized(f"authentication required: send {how}")

    def by_token(self, token: str, now: float | None = None) -> Client:
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found: Token | None = None
        for candidate in self.tokens:  # no early exit: the time does not depend on the match
            if hmac.compare_digest(digest, candidate.digest):
                found = candidate
        if found is None:
            raise Unauthorized("invalid token", invalid=True)
        now = time.time() if now is None else now
        if found.expires is not None and now >= found.expires:
            raise Unauthorized("the token has expired", invalid=True)
        return Client(found.client, found.role, "token")

    def by_certificate(self, subject: str) -> Client:
        name = common_name(subject)
        if name is None or not name.strip():
            raise Unauthorized("the client certificate's subject must hold exactly one CN",
                               invalid=True)
        return Client(name, ADMIN if name in self.admins else CLIENT, "certificate")


def _bearer(header: bytes) -> str:
    scheme, _, token = header.decode("latin-1").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("the Authorization header must be `Bearer <token>`", invalid=True)
    if not _TOKEN.fullmatch(token):
        raise Unauthorized("invalid token", invalid=True)
    return token


class AuthMiddleware:
    """Authenticate every HTTP request (pure ASGI); 401 in the error shape when it fails."""

    def __init__(self, app: ASGIApp, *, authenticator: Authenticator) -> None:
        self.app = app
        self.authenticator = authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = ANONYMOUS
        if self.authenticator.enabled and scope["path"] not in OPEN_PATHS:
            try:
                client = self.authenticator.authenticate(scope)
            except Unauthorized as exc:
                challenge = 'Bearer realm="jobd"'
                if exc.invalid:
                    challenge += f', error="invalid_token", error_description="{exc}"'
                log.info("401 %s %s: %s", scope["method"], scope["path"], exc)
                await error(401, str(exc), headers={"WWW-Authenticate": challenge})(
                    scope, receive, send)
                return
        scope.setdefault("state", {})["client"] = client
        await self.app(scope, receive, send)


# -- authorization --------------------------------------------------------------------------


def client_of(request: HTTPConnection) -> Client:
    """The request's Client, with the per-job secret it carries (header or `?secret=`)."""
    client = request.scope.get("state", {}).get("client", ANONYMOUS)
    if not isinstance(client, Client):
        client = ANONYMOUS
    secret = request.headers.get(SECRET_HEADER) or request.query_params.get(SECRET_QUERY)
    return replace(client, secret=secret) if secret else client


def allows(client: Client, record: Mapping[str, Any]) -> bool:
    """Whether `client` may see and manage the job `record` (see the module notes)."""
    if client.is_admin:
        return True
    if not client.is_anonymous:
        return record.get("owner") == client.name
    stored = record.get("secret_hash")
    if not stored:
        return True
    return check_secret(client.secret, stored)


def owner_of(client: Client) -> str | None:
    """What a new job records as its owner."""
    return client.name


def visible_to(client: Client) -> Callable[[Mapping[str, Any]], bool]:
    """A record filter for listings: what `client` may see (secret jobs stay hidden from
    anonymous callers even with a secret: a listing is not a request for one job)."""
    anonymous = replace(client, secret=None) if client.is_anonymous else client
    return lambda record: allows(anonymous, record)


def visible_text(client: Client) -> Callable[[str], bool] | None:
    """What a record's stored JSON text (`storage.dumps`) must contain for `visible_to` to
    accept it, as a cheap first test (None: nothing to test). For a named client, its
    name as the owner; the test may pass a record `visible_to` then refuses, never the
    reverse."""
    if client.is_admin or client.is_anonymous:
        return None
    needle = '"owner":' + json.dumps(client.name)
    return lambda text: needle in text
