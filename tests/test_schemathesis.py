"""schemathesis against the daemon's own OpenAPI document: no 5xx, no answer off the schema.

Every operation of `/openapi.json` gets generated requests (valid and invalid), bounded by
`JOBD_SCHEMATHESIS_EXAMPLES` per operation (default 25, what CI spends); each answer must not be
a server error and must match the document (status code, content type, body schema). Skipped,
with the reason, while the build serves no `/openapi.json` (the native API is another branch).

schemathesis is a test-only dependency (setup.cfg, extras `test`, CPython 3.10+); it is never
in the zipapp.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis needs CPython 3.10+")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import Daemon  # noqa: E402

EXAMPLES = int(os.environ.get("JOBD_SCHEMATHESIS_EXAMPLES", "25"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def api_daemon(zipapp: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    daemon = Daemon(zipapp, tmp_path_factory.mktemp("schemathesis"), JOBD_FSYNC="false",
                    JOBD_MAX_BODY="16M", JOBD_BODY_TIMEOUT="5s").start()
    yield daemon
    if daemon.proc is not None and daemon.proc.poll() is None:
        daemon.stop(signal.SIGTERM)
    daemon.client.close()


@pytest.fixture
def api_schema(api_daemon: Daemon) -> Any:
    response = api_daemon.client.get("/openapi.json")
    if response.status_code == 404:
        pytest.skip("GET /openapi.json answers 404: this build has no native API (branch "
                    "`api`), so there is no document to test against")
    assert response.status_code == 200, response.text[:500]
    schema = schemathesis.openapi.from_dict(response.json())
    schema.config.update(base_url=api_daemon.url, request_timeout=30)
    return schema


def test_api_conforms_to_its_document(api_schema: Any, api_daemon: Daemon) -> None:
    """Each operation in turn, with hypothesis driving schemathesis' strategies.

    (schemathesis' own pytest integration, `from_fixture`, reads a pytest attribute that
    pytest 9 no longer has, so the operations are walked here.)"""
    failures: list[str] = []
    operations = 0
    calls = [0]
    for result in api_schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            calls[0] += 1
            case.call_and_validate(checks=CHECKS)

        try:
            check()
        except Exception as exc:  # collected: every operation is tried, then all reported
            failures.append(f"{operation.label}: {exc}")
        assert api_daemon.proc is not None and api_daemon.proc.poll() is None, operation.label
    assert operations > 0
    assert not failures, "\n\n".join(failures)
    print(f"schemathesis: {operations} operations, {calls[0]} requests, no failure")
