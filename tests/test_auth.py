"""auth.py without a server: token files, variables, the authenticator, secrets, the rule."""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobd import auth
from jobd.auth import ADMIN, ANONYMOUS, CLIENT, Authenticator, Client, Unauthorized
from jobd.config import Config, ConfigError
from jobd.connection import rfc4514

ALICE, BOB, ROOT = "alice-token-0123456789", "bob-token-0123456789", "root-token-0123456789"


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def scope(*headers: tuple[bytes, bytes], subject: str | None = None) -> dict[str, Any]:
    found: dict[str, Any] = {"type": "http", "method": "GET", "path": "/api/get/x",
                             "headers": list(headers)}
    if subject is not None:
        found["extensions"] = {"tls": {"client_cert_name": subject}}
    return found


def bearer(token: str) -> tuple[bytes, bytes]:
    return (b"authorization", f"Bearer {token}".encode())


@pytest.fixture
def authenticator() -> Authenticator:
    lines = f"""
# comment lines and blank lines are skipped

alice:client:{sha(ALICE)}
bob::{sha(BOB)}
root:admin:{sha(ROOT)}
old:client:{sha("old-token")}:2001-01-01T00:00:00Z
"""
    return Authenticator(auth.parse_token_lines(lines, "tokens"))


# -- the files and variables ------------------------------------------------------------------


def test_lines_format(authenticator: Authenticator) -> None:
    by_name = {t.client: t for t in authenticator.tokens}
    assert by_name["alice"].role == CLIENT and by_name["bob"].role == CLIENT
    assert by_name["root"].role == ADMIN
    assert by_name["old"].expires == 978307200.0
    assert by_name["alice"].source == "tokens:4"


def test_toml_format(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(f"""
[[token]]
client = "alice"
sha256 = "{sha(ALICE)}"
expires = 2030-01-02T03:04:05Z

[[token]]
client = "root"
role = "admin"
sha256 = "{sha(ROOT)}"
expires = 2030-01-02
""")
    tokens = auth.load_token_file(path)
    assert [(t.client, t.role) for t in tokens] == [("alice", CLIENT), ("root", ADMIN)]
    assert tokens[0].expires == 1893553445.0
    assert tokens[1].expires == 1893542400.0  # a date: the start of that day, UTC


@pytest.mark.parametrize(("text", "message"), [
    ("alice:client", "expected name:role:sha256"),
    (f"alice:boss:{sha(ALICE)}", "role 'boss' must be admin or client"),
    ("alice:client:plain-token", "expected the SHA-256 of the token"),
    (f"al ice:client:{sha(ALICE)}", "client name 'al ice'"),
    (f"../x:client:{sha(ALICE)}", "client name '../x'"),
    (f"alice:client:{sha(ALICE)}:next tuesday", "expires must be"),
    (f"alice:client:{sha(ALICE)}\nalice:admin:{sha(BOB)}", "client 'alice' is admin here"),
    (f"alice:client:{sha(ALICE)}\nbob:client:{sha(ALICE)}", "the same token hash"),
])
def test_bad_lines_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        Authenticator(auth.parse_token_lines(text, "tokens"))
    assert "tokens:" in str(info.value)


@pytest.mark.parametrize(("text", "message"), [
    ("[token]\nclient = 'a'", "array of tables"),
    ("[[token]]\nclient = 'a'\nsha256 = 'x'", "SHA-256"),
    (f"[[token]]\nclient = 'a'\nsha256 = '{sha(ALICE)}'\ntoken = 'x'", "unknown key"),
    ("[[tokens]]\nclient = 'a'", "unknown key"),
    ("[[token]\n", "tokens.toml"),
])
def test_bad_toml(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        auth.load_token_file(path)


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="JOBD_TOKENS_FILE: cannot read"):
        auth.load_token_file(tmp_path / "missing")


def test_environment_tokens_hold_hashes_only() -> None:
    tokens = auth.tokens_from_environ({
        "JOBD_TOKEN_ALICE": sha(ALICE), "JOBD_TOKEN_ROOT": f"admin:{sha(ROOT)}",
        "JOBD_TOKEN_CI_BOT": f"client:{sha(BOB)}:2030-01-01", "JOBD_TOKENS_FILE": "x",
        "PATH": "/bin"})
    assert [(t.client, t.role) for t in tokens] == [("alice", CLIENT), ("ci_bot", CLIENT),
                                                   ("root", ADMIN)]
    with pytest.raises(ConfigError, match=r"JOBD_TOKEN_EVE.*SHA-256"):
        auth.tokens_from_environ({"JOBD_TOKEN_EVE": "my-plain-token"})


def test_from_config_combines_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"alice:client:{sha(ALICE)}\n")
    config = Config.load({"JOBD_TOKENS_FILE": str(path)})
    both = Authenticator.from_config(config, {"JOBD_TOKEN_ROOT": f"admin:{sha(ROOT)}"})
    assert both.enabled and {t.client for t in both.tokens} == {"alice", "root"}
    assert "2 token(s) for 2 client(s)" in both.describe()
    assert ALICE not in both.describe() and sha(ALICE) not in both.describe()
    off = Authenticator.from_config(Config.load({}), {})
    assert not off.enabled and off.describe() == "authentication off"
    certs = Authenticator.from_config(Config.load({"JOBD_TLS_CLIENT_CA": "ca.pem"}), {})
    assert certs.enabled and "client certificates" in certs.describe()


# -- authentication ---------------------------------------------------------------------------


def test_tokens_name_their_clients(authenticator: Authenticator) -> None:
    assert authenticator.authenticate(scope(bearer(ALICE))) == Client("alice", CLIENT, "token")
    assert authenticator.authenticate(scope(bearer(ROOT))).is_admin
    lower = (b"authorization", f"bearer   {BOB}  ".encode())
    assert authenticator.authenticate(scope(lower)).name == "bob"


@pytest.mark.parametrize(("headers", "message", "invalid"), [
    ((), "authentication required", False),
    ((bearer("wrong"),), "invalid token", True),
    (((b"authorization", b"Basic YWxpY2U6eA=="),), "must be `Bearer <token>`", True),
    (((b"authorization", b"Bearer"),), "must be `Bearer <token>`", True),
    ((bearer(ALICE), bearer(ALICE)), "more than one Authorization header", True),
    ((bearer("old-token"),), "the token has expired", True),
    ((bearer("caf\xe9"),), "invalid token", True),
])
def test_refusals(authenticator: Authenticator, headers: tuple[tuple[bytes, bytes], ...],
                  message: str, invalid: bool) -> None:
    with pytest.raises(Unauthorized, match=message) as info:
        authenticator.authenticate(scope(*headers))
    assert info.value.invalid is invalid


def test_expiry_is_checked_at_request_time() -> None:
    line = f"alice:client:{sha(ALICE)}:{int(time.time()) + 3600}"
    authenticator = Authenticator(auth.parse_token_lines(line, "t"))
    assert authenticator.authenticate(scope(bearer(ALICE))).name == "alice"
    with pytest.raises(Unauthorized, match="expired"):
        authenticator.authenticate(scope(bearer(ALICE)), now=time.time() + 7200)


def test_certificates() -> None:
    authenticator = Authenticator(certificates=True, admins=["ops"])
    assert authenticator.authenticate(scope(subject="CN=carol,O=Lab,C=NL")) == \
        Client("carol", CLIENT, "certificate")
    assert authenticator.authenticate(scope(subject="CN=ops")).is_admin
    for subject in ("O=Lab,C=NL", "CN=a+CN=b,O=x", "CN= "):
        with pytest.raises(Unauthorized, match="exactly one CN"):
            authenticator.authenticate(scope(subject=subject))
    with pytest.raises(Unauthorized, match="or a client certificate"):
        authenticator.authenticate(scope())


def test_a_token_decides_over_a_certificate() -> None:
    tokens = auth.parse_token_lines(f"alice:client:{sha(ALICE)}", "t")
    authenticator = Authenticator(tokens, certificates=True)
    assert authenticator.authenticate(scope(bearer(ALICE), subject="CN=bob")).name == "alice"
    with pytest.raises(Unauthorized, match="invalid token"):
        authenticator.authenticate(scope(bearer("wrong"), subject="CN=bob"))


def test_certificates_ignored_unless_configured(authenticator: Authenticator) -> None:
    with pytest.raises(Unauthorized, match="authentication required"):
        authenticator.authenticate(scope(subject="CN=alice"))


def test_comparison_looks_at_every_token(authenticator: Authenticator,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: the time taken does not depend on which token matched."""
    calls = []
    real = auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for token in (ALICE, ROOT, "nobody"):
        calls.clear()
        with contextlib.suppress(Unauthorized):
            authenticator.authenticate(scope(bearer(token)))
        assert len(calls) == len(authenticator.tokens)


# -- certificate names ------------------------------------------------------------------------

VALUES = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)


@given(cn=VALUES, org=VALUES)
@settings(max_examples=300)
def test_rfc4514_round_trips_any_cn(cn: str, org: str) -> None:
    """What connection.py writes for a peer certificate, auth.py reads back exactly."""
    subject = ((("countryName", "NL"),), (("organizationName", org),),
               (("commonName", cn),))
    name = rfc4514(subject)
    assert name.startswith("CN=")
    assert auth.common_name(name) == cn


def test_rfc4514_hex_escapes_are_utf8() -> None:
    assert auth.common_name(r"CN=Andr\C3\A9,O=x") == "André"
    assert auth.common_name(r"CN=a\,b\+c,O=x") == "a,b+c"


# -- secrets and the rule ---------------------------------------------------------------------


@given(st.from_regex(r"[\x21-\x7e]{8,64}", fullmatch=True),
       st.from_regex(r"[\x21-\x7e]{8,64}", fullmatch=True))
@settings(max_examples=200)
def test_secret_hash_accepts_only_its_secret(secret: str, other: str) -> None:
    stored = auth.hash_secret(secret)
    assert secret not in stored
    assert auth.check_secret(secret, stored)
    assert auth.check_secret(other, stored) is (other == secret)
    assert not auth.check_secret(None, stored)
    assert auth.hash_secret(secret) != stored  # salted


@given(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=300),
                 st.lists(st.text()), st.dictionaries(st.text(), st.text())))
def test_secret_problem_never_raises(value: object) -> None:
    problem = auth.secret_problem(value)
    if problem is None:
        assert isinstance(value, str) and 8 <= len(value) <= 256 and value.isprintable()
        assert " " not in value and value.isascii()


def test_malformed_stored_hash_lets_nobody_in(caplog: pytest.LogCaptureFixture) -> None:
    assert not auth.check_secret("whatever-secret", "garbage")
    assert "malformed secret hash" in caplog.text


SECRET = "s3cret-for-job"


@pytest.mark.parametrize(("client", "record", "allowed"), [
    (Client("root", ADMIN), {"owner": "alice"}, True),
    (Client("root", ADMIN), {"owner": None, "secret_hash": auth.hash_secret(SECRET)}, True),
    (Client("alice"), {"owner": "alice"}, True),
    (Client("alice"), {"owner": "bob"}, False),
    (Client("alice"), {"owner": None}, False),  # made while authentication was off
    (Client("alice", secret=SECRET), {"owner": "bob", "secret_hash": auth.hash_secret(SECRET)},
     False),  # with authentication on, ownership decides
    (ANONYMOUS, {"owner": None}, True),
    (ANONYMOUS, {"owner": "alice"}, True),  # authentication off: every job without a secret
    (ANONYMOUS, {"owner": None, "secret_hash": auth.hash_secret(SECRET)}, False),
    (Client(secret="wrong-secret"), {"secret_hash": auth.hash_secret(SECRET)}, False),
    (Client(secret=SECRET), {"secret_hash": auth.hash_secret(SECRET)}, True),
])
def test_the_rule(client: Client, record: dict[str, Any], allowed: bool) -> None:
    assert auth.allows(client, record) is allowed


def test_listings_hide_secret_jobs_from_anonymous_callers() -> None:
    records = [{"id": "a", "owner": None}, {"id": "b", "secret_hash": auth.hash_secret(SECRET)},
               {"id": "c", "owner": "alice"}]
    seen = [r["id"] for r in records if auth.visible_to(Client(secret=SECRET))(r)]
    assert seen == ["a", "c"]
    assert [r["id"] for r in records if auth.visible_to(Client("alice"))(r)] == ["c"]
    assert len([r for r in records if auth.visible_to(Client("r", ADMIN))(r)]) == 3


# -- the command line -------------------------------------------------------------------------


def test_hash_token_reads_stdin_or_an_argument() -> None:
    from click.testing import CliRunner

    from jobd.cli import main

    runner = CliRunner()
    assert runner.invoke(main, ["hash-token"], input=f"  {ALICE}\n").output.strip() == sha(ALICE)
    assert runner.invoke(main, ["hash-token", ALICE]).output.strip() == sha(ALICE)
    empty = runner.invoke(main, ["hash-token"], input="\n")
    assert empty.exit_code == 2 and "no token given" in empty.output


def test_new_token_prints_a_token_and_its_line() -> None:
    from click.testing import CliRunner

    from jobd.cli import main

    result = CliRunner().invoke(main, ["new-token", "ops", "--role", "admin", "--expires",
                                       "2030-01-01T00:00:00Z"])
    assert result.exit_code == 0, result.output
    token, line = result.output.splitlines()
    assert len(token) >= 43 and line == f"ops:admin:{sha(token)}:2030-01-01T00:00:00Z"
    authenticator = Authenticator(auth.parse_token_lines(line, "new-token"))
    assert authenticator.authenticate(scope(bearer(token)), now=0) == Client("ops", ADMIN,
                                                                             "token")
    bad = CliRunner().invoke(main, ["new-token", "no/slash"])
    assert bad.exit_code == 2 and "client name" in bad.output
