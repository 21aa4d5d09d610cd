"""`GET /metrics`: the Prometheus text format, parsed by a small strict parser written here."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
from starlette.routing import Mount, Route

from jobd.metrics import CONTENT_TYPE, Metrics, route_template
from tests.conftest import Daemon, wait_until

_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def parse(text: str) -> tuple[dict[str, dict[str, str]], dict[tuple[str, tuple], float]]:
    """({family: {"help", "type"}}, {(sample name, sorted labels): value}), strictly.

    Every sample must belong to a family whose TYPE came before it; HELP and TYPE appear once
    per family; label values are unescaped; no sample appears twice.
    """
    assert text.endswith("\n")
    families: dict[str, dict[str, str]] = {}
    samples: dict[tuple[str, tuple], float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            kind, name, rest = [*line.split(" ", 3)[1:], ""][:3]
            assert kind in ("HELP", "TYPE"), line
            entry = families.setdefault(name, {})
            key = kind.lower()
            assert key not in entry, f"second {kind} for {name}"
            if kind == "TYPE":
                assert rest in ("counter", "gauge", "histogram", "summary", "untyped"), line
            entry[key] = rest
            continue
        match = _SAMPLE.fullmatch(line)
        assert match, f"not a sample line: {line!r}"
        name, _, label_text, value = match.groups()
        labels = []
        if label_text:
            pos = 0
            while pos < len(label_text):
                label = _LABEL.match(label_text, pos)
                assert label, f"bad labels in {line!r}"
                raw = label.group(2)
                labels.append((label.group(1), re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(
                    m.group(1), m.group(1)), raw)))
                pos = label.end()
        family = name
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name[:-len(suffix)] in families:
                family = name[:-len(suffix)]
        assert "type" in families.get(family, {}), f"{name} has no TYPE before it"
        if families[family]["type"] == "counter":
            assert name.endswith("_total"), name
        key = (name, tuple(sorted(labels)))
        assert key not in samples, f"duplicate sample {key}"
        samples[key] = float(value)  # "+Inf" parses too
    for name, entry in families.items():
        assert "help" in entry and "type" in entry, name
    return families, samples


def check_histograms(families: dict, samples: dict) -> None:
    """Buckets cumulative and ordered, +Inf equal to _count, per label set."""
    for family, entry in families.items():
        if entry["type"] != "histogram":
            continue
        series: dict[tuple, list[tuple[float, float]]] = {}
        for (name, labels), value in samples.items():
            if name == f"{family}_bucket":
                rest = tuple(kv for kv in labels if kv[0] != "le")
                le = dict(labels)["le"]
                series.setdefault(rest, []).append((float(le), value))
        for rest, buckets in series.items():
            buckets.sort()
            counts = [c for _, c in buckets]
            assert counts == sorted(counts), f"{family}{rest} buckets are not cumulative"
            assert math.isinf(buckets[-1][0])
            assert samples[(f"{family}_count", rest)] == counts[-1]
            assert (f"{family}_sum", rest) in samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# -- units ------------------------------------------------------------------------------------


def test_render_parses_without_a_manager() -> None:
    metrics = Metrics()
    families, _ = parse(metrics.render(None))
    assert families["jobd_job_duration_seconds"]["type"] == "histogram"
    assert "jobd_jobs" not in families


def test_render_with_counts_histogram_and_escaping() -> None:
    metrics = Metrics()
    scheduler = SimpleNamespace(queue_length=3, running_count=2, slots=4)
    store = SimpleNamespace(counts=lambda: {"QUEUED": 3, "RUNNING": 2, "SUCCESS": 7},
                            syncer=SimpleNamespace(running=False, deaths=2))
    manager = SimpleNamespace(store=store, scheduler=scheduler)
    for seconds in (0.5, 3, 3, 100, 10**6):
        metrics.observe_job({"status": "SUCCESS", "started": 1000.0, "finished": 1000 + seconds})
    metrics.observe_job({"status": "FAILED", "started": None, "finished": 5.0})  # never ran
    metrics.observe_request("GET", '/odd"route\\x\ny', 200, 0, 10)
    metrics.observe_request("BREW", "/api/get/{id}", 404, 5, 0)
    families, samples = parse(metrics.render(manager))
    check_histograms(families, samples)
    assert value(samples, "jobd_jobs", status="SUCCESS") == 7
    assert value(samples, "jobd_jobs", status="CANCELLED") == 0
    assert ("jobd_jobs", (("status", "CANCELLED"),)) in samples  # zero-filled
    assert value(samples, "jobd_queue_length") == 3
    assert value(samples, "jobd_running_jobs") == 2
    assert value(samples, "jobd_slots") == 4
    assert value(samples, "jobd_fsync_helper_running") == 0  # stopped when idle
    assert value(samples, "jobd_fsync_helper_deaths_total") == 2
    assert value(samples, "jobd_job_duration_seconds_count", status="SUCCESS") == 5
    assert value(samples, "jobd_job_duration_seconds_bucket", status="SUCCESS", le="5") == 3
    assert value(samples, "jobd_job_duration_seconds_bucket", status="SUCCESS", le="+Inf") == 5
    assert value(samples, "jobd_job_duration_seconds_sum", status="SUCCESS") == 1000106.5
    assert ("jobd_job_duration_seconds_count", (("status", "FAILED"),)) not in samples
    assert value(samples, "jobd_http_requests_total", method="GET", route='/odd"route\\x\ny',
                 code="200") == 1
    assert value(samples, "jobd_http_requests_total", method="other", route="/api/get/{id}",
                 code="404") == 1
    assert value(samples, "jobd_http_request_body_bytes_total", route="/api/get/{id}") == 5


def _endpoint() -> None:
    raise AssertionError("never called")


@pytest.mark.parametrize(("method", "path", "expected"), [
    ("GET", "/api/get/abc", "/api/get/{id}"),
    ("POST", "/api/get/abc", "/api/get/{id}"),  # 405, same route
    ("GET", "/api/v1/jobs/42/files/a/b.txt", "/api/v1/jobs/{id}/files/{path:path}"),
    ("GET", "/api/v1/jobs", "/api/v1/jobs"),
    ("GET", "/api/v1/nothing", "other"),
    ("GET", "/nothing/at/all", "other"),
])
def test_route_template(method: str, path: str, expected: str) -> None:
    routes = [
        Route("/api/get/{id}", _endpoint, methods=["GET"]),
        Mount("/api/v1", routes=[
            Route("/jobs", _endpoint, methods=["GET", "POST"]),
            Route("/jobs/{id}/files/{path:path}", _endpoint, methods=["GET"]),
        ]),
    ]
    scope = {"type": "http", "method": method, "path": path, "root_path": ""}
    assert route_template(routes, scope) == expected


# -- the daemon -------------------------------------------------------------------------------


def test_metrics_after_some_jobs(daemon: Daemon) -> None:
    client = daemon.client
    assert daemon.upload("m1", {"run.sh": "echo ok\n"}).status_code == 201
    assert daemon.upload("m2", {"run.sh": "exit 2\n"}).status_code == 201
    body = [("file", ("run.sh", b"head -c 5000 /dev/zero > out.bin\n")),
            ("file", ("in.txt", b"x" * 3000))]
    submitted = client.post("/submit", files=body)
    payload_id = submitted.json()["id"]
    blocker = client.post("/submit", files=[("file", ("run.sh", b"sleep 300\n"))]).json()
    daemon.wait_done("m1")
    daemon.wait_done("m2")
    wait_until(lambda: client.get(f"/retrieve/{payload_id}").headers["content-type"]
               == "application/zip", 30, 0.05, "the payload to complete")
    result = client.get(f"/retrieve/{payload_id}")
    wait_until(lambda: client.get(f"/retrieve/{blocker['id']}").json()["status"] == "Running",
               30, 0.05, "the blocker to run")
    assert client.get("/no/such/path").status_code == 404
    assert client.get("/api/get/unknown-job").status_code == 404

    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE
    families, samples = parse(response.text)
    check_histograms(families, samples)
    for family, kind in [("jobd_jobs", "gauge"), ("jobd_queue_length", "gauge"),
                         ("jobd_running_jobs", "gauge"), ("jobd_slots", "gauge"),
                         ("jobd_job_duration_seconds", "histogram"),
                         ("jobd_http_requests_total", "counter"),
                         ("jobd_http_request_body_bytes_total", "counter"),
                         ("jobd_http_response_body_bytes_total", "counter"),
                         ("jobd_http_fast_path_requests_total", "counter"),
                         ("jobd_fsync_helper_running", "gauge"),
                         ("jobd_fsync_helper_deaths_total", "counter")]:
        assert families[family]["type"] == kind and families[family]["help"]

    assert value(samples, "jobd_jobs", status="SUCCESS") == 2
    assert value(samples, "jobd_jobs", status="FAILED") == 1
    assert value(samples, "jobd_jobs", status="RUNNING") == 1
    assert value(samples, "jobd_running_jobs") == 1
    assert value(samples, "jobd_queue_length") == 0
    assert value(samples, "jobd_slots") == 2
    assert value(samples, "jobd_fsync_helper_running") == 1  # jobs were just stored
    assert value(samples, "jobd_fsync_helper_deaths_total") == 0
    assert value(samples, "jobd_job_duration_seconds_count", status="SUCCESS") == 2
    assert value(samples, "jobd_job_duration_seconds_count", status="FAILED") == 1

    requests = {labels: n for (name, labels), n in samples.items()
                if name == "jobd_http_requests_total"}
    routes = {dict(labels)["route"] for labels in requests}
    assert routes <= {"/api/upload", "/api/get/{id}", "/submit", "/retrieve/{id}", "/health",
                      "/openapi.json", "other"}, routes  # the schema check reads the document
    assert value(samples, "jobd_http_requests_total", method="POST", route="/api/upload",
                 code="201") == 2
    assert value(samples, "jobd_http_requests_total", method="POST", route="/submit",
                 code="200") == 2
    assert value(samples, "jobd_http_requests_total", method="GET", route="other",
                 code="404") == 1
    assert value(samples, "jobd_http_requests_total", method="GET", route="/api/get/{id}",
                 code="404") == 1
    assert value(samples, "jobd_http_fast_path_requests_total", route="/api/get/{id}") >= 1
    assert value(samples, "jobd_http_request_body_bytes_total", route="/submit") > 3000
    assert value(samples, "jobd_http_response_body_bytes_total",
                 route="/retrieve/{id}") >= len(result.content)

    client.post(f"/kill/{blocker['id']}", timeout=60)
    _, later = parse(client.get("/metrics").text)
    assert value(later, "jobd_job_duration_seconds_count", status="CANCELLED") == 1
    assert value(later, "jobd_jobs", status="CANCELLED") == 1
    assert value(later, "jobd_http_requests_total", method="GET", route="/metrics",
                 code="200") == 1


def test_classic_uploads_count_as_bytes_in(daemon: Daemon) -> None:
    for i in range(5):
        assert daemon.upload(f"j{i}", {"run.sh": "true\n", "blob": "y" * 10000}).status_code == 201
    for i in range(5):
        daemon.wait_done(f"j{i}")
    _, samples = parse(daemon.client.get("/metrics").text)
    assert value(samples, "jobd_jobs", status="SUCCESS") == 5
    assert value(samples, "jobd_http_request_body_bytes_total", route="/api/upload") > 5 * 100
