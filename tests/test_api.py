"""The native API (/api/v1) against the built zipapp on a loopback port.

Every answer these tests receive is also checked against the OpenAPI document the daemon serves
(see conftest.py and openapi_check.py).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ZIPAPP, Daemon, make_zip, python39, wait_until

FINAL = ("SUCCESS", "FAILED", "CANCELLED")
GATE_WAIT = 'while [ ! -e gate ]; do sleep 0.02; done\n'


def create(daemon: Daemon, files: dict[str, str | bytes], *,
           modes: dict[str, int] | None = None, **fields: Any) -> httpx.Response:
    body = {"input": base64.b64encode(make_zip(files, modes=modes)).decode(), **fields}
    return daemon.client.post("/api/v1/jobs", json=body)


def created(daemon: Daemon, files: dict[str, str | bytes], **fields: Any) -> dict[str, Any]:
    response = create(daemon, files, **fields)
    assert response.status_code == 201, response.text
    return response.json()


def get(daemon: Daemon, job_id: str) -> dict[str, Any]:
    response = daemon.client.get(f"/api/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


def wait_status(daemon: Daemon, job_id: str, statuses: tuple[str, ...] = FINAL,
                timeout: float = 60.0) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        record = get(daemon, job_id)
        return record if record["status"] in statuses else None
    return wait_until(reached, timeout, 0.02, f"job {job_id} to be {'/'.join(statuses)}")


def open_gate(daemon: Daemon, job_id: str) -> None:
    """Let a job waiting in GATE_WAIT go on (the test plays the part of an outside event)."""
    (daemon.datapath / job_id / "work" / "gate").write_text("go")


def test_get_with_wait_is_a_long_poll(daemon: Daemon) -> None:
    created(daemon, {"run.sh": GATE_WAIT + "echo done\n"}, id="lp")
    started = time.monotonic()
    assert get_waiting(daemon, "lp", "0.4")["status"] in ("QUEUED", "RUNNING")
    assert time.monotonic() - started >= 0.35
    open_gate_when_running(daemon, "lp")
    assert get_waiting(daemon, "lp", "30")["status"] == "SUCCESS"
    response = daemon.client.get("/api/v1/jobs/lp", params={"wait": "1e9"})
    assert response.status_code == 400
    assert "wait must be between 0 and 300" in response.json()["message"]


def get_waiting(daemon: Daemon, job_id: str, wait: str) -> dict[str, Any]:
    response = daemon.client.get(f"/api/v1/jobs/{job_id}", params={"wait": wait})
    assert response.status_code == 200, response.text
    return response.json()


def open_gate_when_running(daemon: Daemon, job_id: str) -> None:
    wait_status(daemon, job_id, ("RUNNING",))
    open_gate(daemon, job_id)


def log_of(daemon: Daemon, job_id: str) -> str:
    response = daemon.client.get(f"/api/v1/jobs/{job_id}/logs")
    assert response.status_code == 200
    return response.text


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# -- create ---------------------------------------------------------------------------------------


def test_create_generates_an_id_and_the_job_runs(daemon: Daemon) -> None:
    response = create(daemon, {"run.sh": "echo hello > out.txt\n"})
    assert response.status_code == 201
    job = response.json()
    assert len(job["id"]) == 32 and all(c in "0123456789abcdef" for c in job["id"])
    assert response.headers["location"] == f"/api/v1/jobs/{job['id']}"
    assert job["status"] in ("QUEUED", "RUNNING")
    assert job["protocol"] == "native" and job["entry"] == "run.sh" and job["executor"] == "local"
    assert job["input_size"] > 0 and job["output_size"] is None
    done = wait_status(daemon, job["id"])
    assert done["status"] == "SUCCESS" and done["message"] == "job finished successfully"
    assert done["exit_code"] == 0 and done["signal"] is None and done["attempt"] == 1
    assert done["created"].endswith("Z") and done["started"] and done["finished"]
    assert done["duration"] is not None and done["duration"] >= 0
    assert done["output_size"] > 0


def test_create_with_every_option(daemon: Daemon) -> None:
    script = ("#!/bin/sh\necho \"args=$*\"\necho \"n=$JOBD_PARAM_N name=$JOBD_PARAM_NAME\"\n"
              "echo \"token=$JOBD_PARAM_API_TOKEN\"\n")
    job = created(daemon, {"bin/main.sh": script, "data.txt": "x"}, id="opts-1",
                  entry="./bin/main.sh", args=["-v", "two words"],
                  params={"n": 3, "Name": "blue", "api_token": "s3cret"},
                  timeout="2h", priority=5, labels={"project": "p1", "team/x": "a b"},
                  executor="local")
    assert job["id"] == "opts-1" and job["entry"] == "bin/main.sh"
    assert job["args"] == ["-v", "two words"] and job["timeout"] == 7200.0
    assert job["priority"] == 5 and job["labels"] == {"project": "p1", "team/x": "a b"}
    # parameters are shown upper-cased, and a credential-like one never is
    assert job["params"] == {"N": 3, "NAME": "blue", "API_TOKEN": "<redacted>"}
    assert wait_status(daemon, "opts-1")["status"] == "SUCCESS"
    assert log_of(daemon, "opts-1") == "args=-v two words\nn=3 name=blue\ntoken=s3cret\n"
    listed = daemon.client.get("/api/v1/jobs").json()["jobs"][0]
    assert listed["params"]["API_TOKEN"] == "<redacted>"


def test_numeric_timeout_ends_the_job(daemon_factory: Any) -> None:
    daemon = daemon_factory(JOBD_KILL_GRACE="1s")
    created(daemon, {"run.sh": "echo started\nexec sleep 60\n"}, id="slow", timeout=1)
    done = wait_status(daemon, "slow", timeout=30)
    assert done["status"] == "FAILED"
    assert done["message"] == "could not finish the job: timed out after 1s (signal: SIGTERM (15))"
    assert done["signal"] == "SIGTERM" and 0.9 < done["duration"] < 20


ZIP = base64.b64encode(make_zip({"run.sh": "true\n"})).decode()


@pytest.mark.parametrize(("body", "message"), [
    ({"input": ZIP, "colour": "red", "Size": 3},
     "unknown fields 'colour', 'size' (allowed: id, input, entry"),
    ({"input": ZIP, "params": {"1x": 1}}, "parameter name '1x' is not allowed"),
    ({"input": ZIP, "params": {"a-b": 1}}, "parameter name 'a-b' is not allowed"),
    ({"input": ZIP, "params": {"A" * 65: 1}}, "is not allowed"),
    ({"input": ZIP, "params": {"n": 1, "N": 2}}, "parameter N is given twice"),
    ({"input": ZIP, "params": {"N": 1.5}}, "parameter N must be a string or an integer"),
    ({"input": ZIP, "params": {"N": True}}, "parameter N must be a string or an integer"),
    ({"input": ZIP, "params": ["N"]}, "params must be an object"),
    ({"input": ZIP, "args": "-v"}, "args must be a list of strings"),
    ({"input": ZIP, "args": ["a", 2]}, "args[1] must be a string, not an integer"),
    ({"input": ZIP, "labels": {"": "x"}}, "label key '' is not allowed"),
    ({"input": ZIP, "labels": {"k": 1}}, "label k must be a string"),
    ({"input": ZIP, "executor": "slurm"},
     "executor 'slurm' is not configured on this daemon (available: local)"),
    ({"input": ZIP, "timeout": "soon"}, "timeout: expected a duration"),
    ({"input": ZIP, "timeout": -1}, "timeout must be zero or more seconds"),
    ({"input": ZIP, "priority": "high"}, "priority must be an integer"),
    ({"input": ZIP, "entry": "../run.sh"}, "entry must stay inside the working directory"),
    ({"input": ZIP, "entry": "/bin/sh"}, "entry must be a relative path"),
    ({"input": ZIP, "entry": "main.py"}, "main.py does not exist in the input file"),
    ({"input": ZIP, "function": "main"}, "function needs a Python entry point"),
    ({"input": ZIP, "function": "run.sh:main"}, "function needs a Python entry point (.py)"),
    ({"input": ZIP, "id": "../x"}, "id must be 1 to 128 characters"),
    ({"input": ZIP, "id": 7}, "id must be 1 to 128 characters"),
    ({"id": "x"}, "input is required"),
    ({"input": ""}, "input is required"),
    ({"input": "not base64!"}, "input is not valid base64"),
    ({"input": base64.b64encode(b"plain text").decode()}, "input is not a zip file"),
])
def test_bad_creates_are_a_400_naming_the_problem(daemon: Daemon, body: dict[str, Any],
                                                  message: str) -> None:
    response = daemon.client.post("/api/v1/jobs", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "bad_request"
    assert message in response.json()["message"]
    assert daemon.client.get("/api/v1/jobs").json()["jobs"] == []  # nothing stored


def test_body_that_is_not_json(daemon: Daemon) -> None:
    response = daemon.client.post("/api/v1/jobs", content=b"id=3",
                                  headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["message"].startswith("the body is not a JSON object")


def test_taken_id_is_a_409(daemon: Daemon) -> None:
    created(daemon, {"run.sh": "true\n"}, id="twice")
    response = create(daemon, {"run.sh": "true\n"}, id="twice")
    assert response.status_code == 409
    assert response.json() == {"error": "conflict", "message": "job twice already exists",
                               "status": 409}


def test_multipart_create_with_files_and_fields(daemon: Daemon) -> None:
    files = [("file", ("run.sh", b"echo $JOBD_PARAM_N $1 > out.txt\n")),
             ("file", ("data.txt", b"hello"))]
    response = daemon.client.post("/api/v1/jobs", files=files, data={
        "id": "multi", "args": '["x"]', "params": '{"n": 3}', "labels": '{"k": "v"}'})
    assert response.status_code == 201, response.text
    assert response.json()["labels"] == {"k": "v"}
    daemon.wait_done("multi")
    out = daemon.client.get("/api/v1/jobs/multi/files/out.txt")
    assert out.text == "3 x\n"
    assert daemon.client.get("/api/v1/jobs/multi/files/data.txt").text == "hello"


def test_multipart_create_from_one_tar_gz(daemon: Daemon, tmp_path: Path) -> None:

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "run.sh").write_text("cat sub/in.txt > out.txt\n")
    (src / "sub" / "in.txt").write_text("from tar")
    bundle = tmp_path / "job.tar.gz"
    with tarfile.open(bundle, "w:gz") as tar:
        tar.add(src / "run.sh", "run.sh")
        tar.add(src / "sub", "sub")
    response = daemon.client.post("/api/v1/jobs", data={"id": "fromtar"},
                                  files=[("file", ("job.tar.gz", bundle.read_bytes()))])
    assert response.status_code == 201, response.text
    assert daemon.wait_done("fromtar").json()["Status"] == "SUCCESS"
    assert daemon.client.get("/api/v1/jobs/fromtar/files/out.txt").text == "from tar"


@pytest.mark.parametrize(("files", "data", "message"), [
    ([("file", ("other.sh", b"true"))], {}, "run.sh does not exist"),
    ([("file", ("run.sh", b"true"))], {"colour": "red"}, "unknown field"),
    ([("file", ("run.sh", b"true"))], {"params": "{not json"}, "JSON text"),
    ([("file", ("../run.sh", b"true")), ("file", ("run.sh", b"x"))], {}, ""),
])
def test_multipart_create_errors(daemon: Daemon, files: list, data: dict,
                                 message: str) -> None:
    response = daemon.client.post("/api/v1/jobs", files=files, data=data)
    assert response.status_code == 400, response.text
    assert message in response.json()["message"]
    malformed = daemon.client.post("/api/v1/jobs", content=b"--x\r\nbroken",
                                   headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert malformed.status_code == 400
    assert "malformed multipart body" in malformed.json()["message"]


def test_body_over_the_limit_is_a_413(daemon_factory: Any) -> None:
    daemon = daemon_factory(JOBD_MAX_BODY="4K")
    big = os.urandom(8192)
    response = create(daemon, {"run.sh": "true\n", "big.bin": big})
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"


# -- entry points -----------------------------------------------------------------------------


def test_entry_points_run_with_the_interpreter_of_their_extension(daemon: Daemon) -> None:
    jobs = {
        "py": ({"main.py": "import sys\nprint('python', sys.version_info[0], sys.argv[1:])\n"},
               "main.py", "python 3 ['a', 'b']\n"),
        "sh": ({"main.sh": 'echo "bash ${BASH_VERSION:+yes}" "$@"\n'}, "main.sh",
               "bash yes a b\n"),
        "run-sh": ({"run.sh": 'echo "sh ${BASH_VERSION:-no-bash}" "$@"\n'}, "run.sh",
                   None),
    }
    if shutil.which("node"):
        jobs["js"] = ({"main.js": "console.log('node', process.argv.slice(2).join(' '))\n"},
                      "main.js", "node a b\n")
    for name, (files, entry, _) in jobs.items():
        created(daemon, files, id=f"entry-{name}", entry=entry, args=["a", "b"])
    for name, (_, _, expected) in jobs.items():
        done = wait_status(daemon, f"entry-{name}")
        assert done["status"] == "SUCCESS", (name, done["message"], log_of(daemon, done["id"]))
        if expected is not None:
            assert log_of(daemon, done["id"]) == expected
    assert log_of(daemon, "entry-run-sh").startswith("sh ")  # /bin/sh, as the classic jobd


@pytest.mark.skipif(shutil.which("Rscript") is not None, reason="Rscript is installed here")
def test_missing_interpreter_fails_the_job_with_its_name(daemon: Daemon) -> None:
    created(daemon, {"analysis.R": "print(1)\n"}, id="r-job", entry="analysis.R")
    done = wait_status(daemon, "r-job")
    assert done["status"] == "FAILED"
    assert done["message"].startswith("could not start the job: analysis.R needs Rscript, "
                                      "which is not installed (not found on PATH")


def test_js_entry_without_node_fails_clearly(daemon_factory: Any, tmp_path: Path) -> None:
    """A PATH with python3 and the shell tools but no node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "bash", "env", "sleep", "cat"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    (bin_dir / "python3").symlink_to(os.path.realpath(sys.executable))
    daemon = daemon_factory(PATH=str(bin_dir))
    created(daemon, {"app.js": "console.log('hi')\n"}, id="js", entry="app.js")
    done = wait_status(daemon, "js")
    assert done["status"] == "FAILED"
    assert done["message"] == ("could not start the job: app.js needs node, which is not "
                               f"installed (not found on PATH {bin_dir})")


TOOL_PY = """\
import sys

def main(*args):
    print("main got", list(args), "argv", sys.argv[1:])
    return int(args[0]) if args else None

def greet(name):
    return "hello " + name

class Model:
    @staticmethod
    def run(x):
        print("model", x)

if __name__ == "__main__":
    print("ran as a script")
"""


def test_function_entry_point(daemon: Daemon) -> None:
    first = created(daemon, {"tool.py": TOOL_PY}, id="fn-exit", function="tool.py:main",
                    args=["3", "x"])
    assert first["entry"] == "tool.py" and first["function"] == "main"
    created(daemon, {"tool.py": TOOL_PY}, id="fn-ok", entry="tool.py", function="main")
    created(daemon, {"lib/tool.py": TOOL_PY}, id="fn-print", function="lib/tool.py:greet",
            args=["ada"])
    created(daemon, {"tool.py": TOOL_PY}, id="fn-dotted", function="tool.py:Model.run",
            args=["7"])
    created(daemon, {"tool.py": TOOL_PY}, id="fn-missing", function="tool.py:nope")
    done = {i: wait_status(daemon, i) for i in ("fn-exit", "fn-ok", "fn-print", "fn-dotted",
                                                 "fn-missing")}
    assert done["fn-exit"]["status"] == "FAILED" and done["fn-exit"]["exit_code"] == 3
    assert log_of(daemon, "fn-exit") == "main got ['3', 'x'] argv ['3', 'x']\n"
    assert done["fn-ok"]["status"] == "SUCCESS"
    assert log_of(daemon, "fn-ok") == "main got [] argv []\n"  # not "ran as a script"
    assert done["fn-print"]["status"] == "SUCCESS"
    assert log_of(daemon, "fn-print") == "hello ada\n"
    assert log_of(daemon, "fn-dotted") == "model 7\n"
    assert done["fn-missing"]["status"] == "FAILED"
    assert "tool.py has no function nope" in log_of(daemon, "fn-missing")


# -- list -----------------------------------------------------------------------------------------


def test_list_filters_and_cursor_pages_over_120_jobs(daemon_factory: Any) -> None:
    daemon = daemon_factory(JOBD_FSYNC="false", JOBD_SLOTS="4")
    for i in range(120):
        created(daemon, {"run.sh": "exit 1\n" if i % 10 == 0 else "true\n"}, id=f"j{i:03d}",
                labels={"group": "abc"[i % 3], **({"odd": "yes"} if i % 2 else {})})
    wait_until(lambda: daemon.client.get("/api/v1/overview").json()["counts"]["SUCCESS"] == 108
               and daemon.client.get("/api/v1/overview").json()["counts"]["FAILED"] == 12,
               60, 0.1, "all 120 jobs to finish")

    def walk(**params: Any) -> list[str]:
        ids: list[str] = []
        cursor = None
        while True:
            query = {**params, **({"cursor": cursor} if cursor else {})}
            page = daemon.client.get("/api/v1/jobs", params=query)
            assert page.status_code == 200, page.text
            body = page.json()
            ids += [j["id"] for j in body["jobs"]]
            assert len(body["jobs"]) <= int(params.get("limit", 50))
            cursor = body["next_cursor"]
            if cursor is None:
                return ids

    everything = walk(limit=50)
    assert everything == [f"j{i:03d}" for i in reversed(range(120))]  # newest first, no repeat
    assert walk() == everything  # default limit 50
    assert walk(limit=7) == everything
    failed = walk(status="FAILED", limit=5)
    assert failed == [f"j{i:03d}" for i in reversed(range(0, 120, 10))]
    assert walk(status="failed,success", limit=100) == everything  # case-insensitive, a list
    assert walk(status=["FAILED", "SUCCESS"]) == everything  # repeated
    assert walk(status="QUEUED") == []
    group_a = walk(label="group=a", limit=9)
    assert group_a == [f"j{i:03d}" for i in reversed(range(0, 120, 3))]
    both = walk(label=["group=b", "odd"], limit=10)  # key=value and key present: all must match
    assert both == [f"j{i:03d}" for i in reversed(range(120)) if i % 3 == 1 and i % 2]
    assert walk(label="group=a", status="FAILED") == ["j090", "j060", "j030", "j000"]

    # a cursor stays valid while jobs come and go
    first = daemon.client.get("/api/v1/jobs", params={"limit": 10}).json()
    created(daemon, {"run.sh": "true\n"}, id="newer")
    assert daemon.client.delete("/api/v1/jobs/j105").status_code == 204
    second = daemon.client.get("/api/v1/jobs", params={"limit": 10,
                                                        "cursor": first["next_cursor"]}).json()
    assert [j["id"] for j in second["jobs"]] == [f"j{i:03d}" for i in range(109, 99, -1)
                                                  if i != 105] + ["j099"]

    for params, message in [({"status": "DONE"}, "unknown status 'DONE'"),
                            ({"limit": "0"}, "limit must be between 1 and 1000"),
                            ({"limit": "1001"}, "limit must be between 1 and 1000"),
                            ({"limit": "ten"}, "limit must be an integer"),
                            ({"cursor": "zz"}, "invalid cursor 'zz'"),
                            ({"label": "=x"}, "label filter '=x' must be key=value or key"),
                            ({"sort": "id"}, "unknown query parameter 'sort'")]:
        response = daemon.client.get("/api/v1/jobs", params=params)
        assert response.status_code == 400, params
        assert message in response.json()["message"]


# -- logs -----------------------------------------------------------------------------------------


def test_logs_whole_and_from_an_offset(daemon: Daemon) -> None:
    created(daemon, {"run.sh": "echo one\necho two >&2\necho three\n"}, id="lg")
    wait_status(daemon, "lg")
    whole = daemon.client.get("/api/v1/jobs/lg/logs")
    assert whole.text == "one\ntwo\nthree\n"
    assert whole.headers["content-type"] == "text/plain; charset=utf-8"
    assert whole.headers["x-next-offset"] == "14"
    tail = daemon.client.get("/api/v1/jobs/lg/logs", params={"offset": 4})
    assert tail.text == "two\nthree\n" and tail.headers["x-next-offset"] == "14"
    past = daemon.client.get("/api/v1/jobs/lg/logs", params={"offset": 100})
    assert past.text == "" and past.headers["x-next-offset"] == "100"
    # following a finished job gives the rest and ends at once
    follow = daemon.client.get("/api/v1/jobs/lg/logs", params={"offset": 8, "follow": "true"})
    assert follow.text == "three\n"
    bad = daemon.client.get("/api/v1/jobs/lg/logs", params={"offset": "-1"})
    assert bad.status_code == 400
    assert daemon.client.get("/api/v1/jobs/nope/logs").status_code == 404


def test_followers_see_lines_before_the_job_ends(daemon: Daemon) -> None:
    created(daemon, {"run.sh": "echo first\n" + GATE_WAIT + "echo second\n"}, id="live")
    quitter = daemon.new_client()
    with daemon.client.stream("GET", "/api/v1/jobs/live/logs",
                              params={"follow": "true"}) as one, \
            daemon.client.stream("GET", "/api/v1/jobs/live/logs",
                                 params={"follow": "1"}) as two, \
            quitter.stream("GET", "/api/v1/jobs/live/logs", params={"follow": "true"}) as three:
        assert one.headers["content-type"] == "text/plain; charset=utf-8"
        lines_one, lines_two, lines_three = one.iter_lines(), two.iter_lines(), \
            three.iter_lines()  # kept: a dropped iterator closes its connection
        assert next(lines_one) == "first"
        assert next(lines_two) == "first"
        assert next(lines_three) == "first"
        assert get(daemon, "live")["status"] == "RUNNING"  # seen before the job ended
        overview = daemon.client.get("/api/v1/overview").json()
        assert overview["log_followers"] == 3
        three.close()
        quitter.close()  # this follower goes away: its stream must stop costing anything
        wait_until(lambda: daemon.client.get("/api/v1/overview").json()["log_followers"] == 2,
                   15, 0.05, "the departed follower to be dropped")
        open_gate(daemon, "live")
        assert list(lines_one) == ["second"]  # and then the stream ends with the job
        assert list(lines_two) == ["second"]
    assert get(daemon, "live")["status"] == "SUCCESS"
    wait_until(lambda: daemon.client.get("/api/v1/overview").json()["log_followers"] == 0,
               15, 0.05, "no followers left")


def read_events(lines: Any, until: Any) -> list[dict[str, str]]:
    """SSE events (dicts of field -> value, data lines joined) until `until(event)`."""
    events: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in lines:
        if line == "":
            if current:
                events.append(current)
                if until(current):
                    return events
            current = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        current[name] = current[name] + "\n" + value if name in current else value
    raise AssertionError(f"the stream ended before the expected event: {events}")


def test_sse_events_carry_offsets_and_resume_with_last_event_id(daemon: Daemon) -> None:
    created(daemon, {"run.sh": "echo one\nprintf 'two\\r\\nthree\\n'\n" + GATE_WAIT +
                     "echo four\nprintf 'no newline'\n"}, id="sse")
    headers = {"Accept": "text/event-stream"}
    with daemon.client.stream("GET", "/api/v1/jobs/sse/logs", headers=headers) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = read_events(stream.iter_lines(), lambda e: "three" in e.get("data", ""))
    data = [e for e in events if "data" in e]
    assert "\n".join(e["data"] for e in data) == "one\ntwo\nthree"
    last_id = data[-1]["id"]
    assert last_id == str(len(b"one\ntwo\r\nthree\n"))
    assert get(daemon, "sse")["status"] == "RUNNING"
    open_gate(daemon, "sse")
    with daemon.client.stream("GET", "/api/v1/jobs/sse/logs",
                              headers={**headers, "Last-Event-ID": last_id}) as stream:
        events = read_events(stream.iter_lines(), lambda e: e.get("event") == "end")
    assert "\n".join(e["data"] for e in events if "event" not in e and "data" in e) == \
        "four\nno newline"
    end = events[-1]
    assert json.loads(end["data"]) == {"status": "SUCCESS", "exit_code": 0, "signal": None,
                                       "message": "job finished successfully"}
    assert end["id"] == str(len(b"one\ntwo\r\nthree\nfour\nno newline"))
    bad = daemon.client.get("/api/v1/jobs/sse/logs",
                            headers={**headers, "Last-Event-ID": "abc"})
    assert bad.status_code == 400


# -- cancel, restart, delete ----------------------------------------------------------------------

DAEMONIZE = """\
import os, sys
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        with open("pids", "a") as f:
            f.write(f"{os.getpid()}\\n")
        os.execvp("sleep", ["sleep", "1000"])
    os._exit(0)
os.wait()
"""

SPAWNER = f"""\
trap '' TERM
sleep 1000 & echo $! >> pids
sleep 1000 & echo $! >> pids
sleep 1000 & echo $! >> pids
( sleep 1000 & echo $! >> pids )
setsid sh -c 'echo $$ >> pids; exec sleep 1000' &
python3 daemonize.py
echo ready
{GATE_WAIT}
"""


def test_cancel_leaves_no_process_of_the_job_alive(daemon_factory: Any) -> None:
    daemon = daemon_factory(JOBD_KILL_GRACE="1s")
    created(daemon, {"run.sh": SPAWNER, "daemonize.py": DAEMONIZE}, id="forky")

    def pids() -> list[int] | None:
        response = daemon.client.get("/api/v1/jobs/forky/files/pids")  # a live download
        if response.status_code != 200:
            return None
        found = [int(line) for line in response.text.split()]
        return found if len(found) == 6 else None

    children = wait_until(pids, 30, 0.05, "the job to start its six children")
    wait_until(lambda: "ready" in log_of(daemon, "forky"), 30, 0.05, "the job to be ready")
    assert all(alive(pid) for pid in children)
    started = time.monotonic()
    response = daemon.client.post("/api/v1/jobs/forky/cancel")
    assert response.status_code == 200
    body = response.json()
    assert body["changed"] is True and body["message"] == "job cancelled"
    assert body["job"]["status"] == "CANCELLED" and body["job"]["signal"] == "SIGKILL"
    assert time.monotonic() - started < 20  # SIGTERM ignored: SIGKILL after the 1 s grace
    wait_until(lambda: not any(alive(pid) for pid in children), 15, 0.05,
               f"every child of the job to be gone: {[p for p in children if alive(p)]}")
    again = daemon.client.post("/api/v1/jobs/forky/cancel").json()
    assert again["changed"] is False
    assert again["message"] == "job already finished (CANCELLED): nothing to cancel"


def test_cancel_a_queued_job_and_a_finished_one(daemon_factory: Any) -> None:
    daemon = daemon_factory(JOBD_SLOTS="1")
    created(daemon, {"run.sh": GATE_WAIT}, id="blocker")
    wait_status(daemon, "blocker", ("RUNNING",))
    created(daemon, {"run.sh": "echo should not run > ran\n"}, id="waiting")
    overview = daemon.client.get("/api/v1/overview").json()
    assert overview["queue_length"] == 1 and overview["free_slots"] == 0
    assert overview["running"] == 1 and overview["slots"] == 1
    assert overview["oldest_queued_age"] is not None and overview["oldest_queued_age"] >= 0
    body = daemon.client.post("/api/v1/jobs/waiting/cancel").json()
    assert body["changed"] is True and body["job"]["status"] == "CANCELLED"
    assert body["job"]["started"] is None and body["job"]["attempt"] == 0
    assert daemon.client.get("/api/v1/overview").json()["queue_length"] == 0
    open_gate(daemon, "blocker")
    assert wait_status(daemon, "blocker")["status"] == "SUCCESS"
    # the slot is free: a job queued after the cancelled one runs, the cancelled one does not
    created(daemon, {"run.sh": "true\n"}, id="probe")
    assert wait_status(daemon, "probe")["status"] == "SUCCESS"
    assert get(daemon, "waiting")["status"] == "CANCELLED"
    assert not (daemon.datapath / "waiting" / "work").exists()
    finished = daemon.client.post("/api/v1/jobs/blocker/cancel").json()
    assert finished["changed"] is False and finished["job"]["status"] == "SUCCESS"
    assert finished["message"] == "job already finished (SUCCESS): nothing to cancel"
    assert daemon.client.post("/api/v1/jobs/nope/cancel").status_code == 404


def test_restart_runs_again_in_a_fresh_directory(daemon: Daemon) -> None:
    script = "[ -e marker ] && { echo dirty; exit 1; }\ntouch marker\necho clean\n" + GATE_WAIT
    created(daemon, {"run.sh": script}, id="again")
    wait_status(daemon, "again", ("RUNNING",))
    running = daemon.client.post("/api/v1/jobs/again/restart")
    assert running.status_code == 409
    assert running.json()["message"] == "job is RUNNING: only a finished job can be restarted"
    wait_until(lambda: (daemon.datapath / "again" / "work").exists(), what="the work dir")
    open_gate(daemon, "again")
    first = wait_status(daemon, "again")
    assert first["status"] == "SUCCESS"
    restarted = daemon.client.post("/api/v1/jobs/again/restart")
    assert restarted.status_code == 200
    job = restarted.json()
    assert job["status"] in ("QUEUED", "RUNNING") and job["finished"] is None
    wait_until(lambda: (daemon.datapath / "again" / "work" / "marker").exists(),
               what="the second run")
    open_gate(daemon, "again")
    second = wait_status(daemon, "again")
    assert second["status"] == "SUCCESS" and second["attempt"] == 1
    assert second["created"] == first["created"] and second["started"] > first["started"]
    assert log_of(daemon, "again") == "clean\n"
    assert daemon.client.post("/api/v1/jobs/nope/restart").status_code == 404


def test_delete(daemon: Daemon) -> None:
    created(daemon, {"run.sh": GATE_WAIT}, id="busy")
    wait_status(daemon, "busy", ("RUNNING",))
    refused = daemon.client.delete("/api/v1/jobs/busy")
    assert refused.status_code == 409
    assert refused.json() == {"error": "conflict", "status": 409,
                              "message": "job is RUNNING: cancel it before deleting it"}
    open_gate(daemon, "busy")
    wait_status(daemon, "busy")
    assert (daemon.datapath / "busy" / "result.zip").exists()
    response = daemon.client.delete("/api/v1/jobs/busy")
    assert response.status_code == 204 and response.content == b""
    assert daemon.client.get("/api/v1/jobs/busy").status_code == 404
    assert not (daemon.datapath / "busy").exists()
    assert daemon.client.delete("/api/v1/jobs/busy").status_code == 404


# -- files ----------------------------------------------------------------------------------------


def test_snapshot_of_a_running_job_then_its_result(daemon: Daemon) -> None:
    script = "mkdir -p out\necho partial > out/a.txt\nln -s a.txt out/link\n" + GATE_WAIT + \
        "echo final > out/b.txt\n"
    created(daemon, {"run.sh": script, "in.pdb": "ATOM\n"}, id="snap")
    wait_until(lambda: (daemon.datapath / "snap" / "work" / "out" / "link").is_symlink(),
               what="the job's output")
    listing = daemon.client.get("/api/v1/jobs/snap/files").json()
    assert listing["live"] is True
    entries = {f["path"]: f for f in listing["files"]}
    assert entries["out"]["kind"] == "dir" and entries["out/link"]["kind"] == "symlink"
    assert entries["out/a.txt"] == {**entries["out/a.txt"], "size": 8, "mime": "text/plain",
                                    "kind": "file"}
    assert entries["in.pdb"]["mime"] == "text/plain"

    live_zip = daemon.client.get("/api/v1/jobs/snap/archive")
    assert live_zip.status_code == 200 and live_zip.headers["x-live-snapshot"] == "true"
    assert live_zip.headers["content-type"] == "application/zip"
    assert 'filename="snap.zip"' in live_zip.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(live_zip.content)) as archive:
        assert archive.read("out/a.txt") == b"partial\n"
        assert "out/b.txt" not in archive.namelist()
    live_tgz = daemon.client.get("/api/v1/jobs/snap/archive", params={"format": "tar.gz"})
    assert live_tgz.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(live_tgz.content), mode="r:gz") as archive:
        assert archive.extractfile("out/a.txt").read() == b"partial\n"  # type: ignore[union-attr]
        assert archive.getmember("out/link").issym()
    assert get(daemon, "snap")["status"] == "RUNNING"

    open_gate(daemon, "snap")
    done = wait_status(daemon, "snap")
    finished = daemon.client.get("/api/v1/jobs/snap/files").json()
    assert finished["live"] is False
    assert "out/b.txt" in {f["path"] for f in finished["files"]}
    result = daemon.client.get("/api/v1/jobs/snap/archive")
    assert result.headers.get("x-live-snapshot") is None  # the result zip itself, as a file
    assert int(result.headers["content-length"]) == done["output_size"] == len(result.content)
    assert result.content == (daemon.datapath / "snap" / "result.zip").read_bytes()
    part = daemon.client.get("/api/v1/jobs/snap/archive", headers={"Range": "bytes=0-3"})
    assert part.status_code == 206 and part.content == b"PK\x03\x04"
    tgz = daemon.client.get("/api/v1/jobs/snap/archive", params={"format": "tgz"})
    with tarfile.open(fileobj=io.BytesIO(tgz.content), mode="r:gz") as archive:
        assert archive.extractfile("out/b.txt").read() == b"final\n"  # type: ignore[union-attr]
    bad = daemon.client.get("/api/v1/jobs/snap/archive", params={"format": "rar"})
    assert bad.status_code == 400


def test_queued_job_has_no_files_yet(daemon_factory: Any) -> None:
    daemon = daemon_factory(JOBD_SLOTS="1")
    created(daemon, {"run.sh": GATE_WAIT}, id="first")
    created(daemon, {"run.sh": "true\n"}, id="second")
    assert daemon.client.get("/api/v1/jobs/second/files").json() == {"files": [],
                                                                       "live": False}
    archive = daemon.client.get("/api/v1/jobs/second/archive")
    assert archive.status_code == 409
    assert archive.json()["message"] == "job is QUEUED: it has no working directory yet"
    assert daemon.client.get("/api/v1/jobs/second/files/run.sh").status_code == 404
    wait_status(daemon, "first", ("RUNNING",))
    open_gate(daemon, "first")


def test_single_file_download_with_range(daemon: Daemon) -> None:
    data = bytes(range(256)) * 4
    script = "mkdir sub\ncp data.bin sub/part\nmv sub/part sub/data.bin\n" + GATE_WAIT
    created(daemon, {"run.sh": script, "data.bin": data}, id="dl")
    wait_until(lambda: (daemon.datapath / "dl" / "work" / "sub" / "data.bin").exists(),
               what="the copy")

    def check(label: str) -> None:
        url = "/api/v1/jobs/dl/files/sub/data.bin"
        whole = daemon.client.get(url)
        assert whole.status_code == 200 and whole.content == data, label
        assert whole.headers["accept-ranges"] == "bytes"
        assert whole.headers["content-length"] == "1024"
        part = daemon.client.get(url, headers={"Range": "bytes=10-19"})
        assert part.status_code == 206 and part.content == data[10:20], label
        assert part.headers["content-range"] == "bytes 10-19/1024"
        assert daemon.client.get(url, headers={"Range": "bytes=-5"}).content == data[-5:]
        assert daemon.client.get(url, headers={"Range": "bytes=1000-"}).content == data[1000:]
        assert daemon.client.get(url, headers={"Range": "bytes=1000-5000"}).content == \
            data[1000:]
        several = daemon.client.get(url, headers={"Range": "bytes=0-1,5-6"})
        assert several.status_code == 200 and several.content == data  # whole file
        outside = daemon.client.get(url, headers={"Range": "bytes=5000-"})
        assert outside.status_code == 416, label
        assert outside.headers["content-range"] == "bytes */1024"
        assert outside.json()["error"] == "range_not_satisfiable"
        stale = daemon.client.get(url, headers={"Range": "bytes=0-0", "If-Range": '"old"'})
        assert stale.status_code == 200 and stale.content == data
        fresh = daemon.client.get(url, headers={"Range": "bytes=0-0",
                                                "If-Range": whole.headers["etag"]})
        assert fresh.status_code == 206 and fresh.content == data[:1]
        assert whole.headers["content-security-policy"] == "sandbox"  # never a page of jobd
        assert whole.headers["x-content-type-options"] == "nosniff"
        head = daemon.client.head(url)
        assert head.status_code == 200 and head.headers["content-length"] == "1024"
        assert daemon.client.get("/api/v1/jobs/dl/files/sub/none").status_code == 404
        directory = daemon.client.get("/api/v1/jobs/dl/files/sub")
        assert directory.status_code == 400 and "'sub' is a dir" in directory.json()["message"]
        escape = daemon.client.get("/api/v1/jobs/dl/files/sub/%2E%2E/%2E%2E/input.zip")
        assert escape.status_code == 400, escape.text

    check("live")
    open_gate(daemon, "dl")
    wait_status(daemon, "dl")
    assert not (daemon.datapath / "dl" / "work").exists()
    check("from the result zip")


# -- overview, documents, errors ------------------------------------------------------------------


def test_overview_counts_and_disk(daemon: Daemon) -> None:
    empty = daemon.client.get("/api/v1/overview").json()
    assert empty["total"] == 0 and empty["oldest_queued_age"] is None
    assert empty["disk"]["jobs_bytes"] == 0
    assert 0 < empty["disk"]["free_bytes"] <= empty["disk"]["total_bytes"]
    created(daemon, {"run.sh": "true\n"}, id="ok")
    created(daemon, {"run.sh": "exit 2\n"}, id="bad")
    wait_status(daemon, "ok")
    wait_status(daemon, "bad")
    overview = daemon.client.get("/api/v1/overview").json()
    assert overview["counts"] == {"QUEUED": 0, "PREPARED": 0, "RUNNING": 0, "SUCCESS": 1,
                                  "FAILED": 1, "CANCELLED": 0}
    assert overview["total"] == 2 and overview["running"] == 0
    assert overview["slots"] == 2 and overview["free_slots"] == 2
    jobs = daemon.client.get("/api/v1/jobs").json()["jobs"]
    on_disk = sum((daemon.datapath / j["id"] / name).stat().st_size
                  for j in jobs for name in ("input.zip", "result.zip"))
    assert overview["disk"]["jobs_bytes"] == on_disk
    assert sum(j["input_size"] + j["output_size"] for j in jobs) == on_disk


def test_classic_jobs_show_in_the_native_api(daemon: Daemon) -> None:
    assert daemon.upload("old-style", {"run.sh": "echo hi\n"}).status_code == 201
    job = wait_status(daemon, "old-style")
    assert job["protocol"] == "classic" and job["entry"] == "run.sh" and job["args"] == []
    assert log_of(daemon, "old-style") == "hi\n"


def test_unknown_jobs_routes_and_methods(daemon: Daemon) -> None:
    for method, path in [("GET", "/api/v1/jobs/nope"), ("DELETE", "/api/v1/jobs/nope"),
                         ("GET", "/api/v1/jobs/nope/files"),
                         ("GET", "/api/v1/jobs/nope/files/a.txt"),
                         ("GET", "/api/v1/jobs/nope/archive"),
                         ("POST", "/api/v1/jobs/nope/cancel")]:
        response = daemon.client.request(method, path)
        assert response.status_code == 404, (method, path)
        assert response.json() == {"error": "not_found", "message": "job not found",
                                   "status": 404}
    for path in ("/api/v1/nothing", "/api/v1/jobs/..%2Fetc"):
        response = daemon.client.get(path)
        assert response.status_code == 404 and response.json()["error"] == "not_found"
    wrong = daemon.client.put("/api/v1/jobs")
    assert wrong.status_code == 405 and wrong.json()["error"] == "method_not_allowed"
    extra = daemon.client.get("/api/v1/jobs/nope", params={"verbose": "1"})
    assert extra.status_code == 400


def test_openapi_document_and_offline_docs_page(daemon: Daemon) -> None:
    document = daemon.client.get("/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    operations = {(m.upper(), p) for p, item in document["paths"].items() for m in item}
    assert operations >= {
        ("POST", "/api/v1/jobs"), ("GET", "/api/v1/jobs"), ("GET", "/api/v1/jobs/{id}"),
        ("DELETE", "/api/v1/jobs/{id}"), ("POST", "/api/v1/jobs/{id}/cancel"),
        ("POST", "/api/v1/jobs/{id}/restart"), ("GET", "/api/v1/jobs/{id}/logs"),
        ("GET", "/api/v1/jobs/{id}/files"), ("GET", "/api/v1/jobs/{id}/files/{path}"),
        ("GET", "/api/v1/jobs/{id}/archive"), ("GET", "/api/v1/overview"), ("GET", "/health"),
        ("POST", "/api/upload"), ("GET", "/api/get/{id}"), ("GET", "/openapi.json"),
        ("GET", "/docs")}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert operation["summary"] and operation["responses"], (method, path)
    page = daemon.client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "./openapi.json" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from outside
    assert len(page.content) < 20_000


def test_zipapp_carries_the_docs_page() -> None:
    with zipfile.ZipFile(ZIPAPP) as archive:
        assert "site-packages/jobd/static/docs.html" in archive.namelist()


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_examples_of_the_readme(daemon: Daemon, tmp_path: Path) -> None:
    """The README's curl calls, run as written (with the daemon's address)."""
    (tmp_path / "run.sh").write_text("echo hello from jobd\n")
    with zipfile.ZipFile(tmp_path / "job.zip", "w") as archive:
        archive.write(tmp_path / "run.sh", "run.sh")
    script = f"""
set -eu
cd {tmp_path}
J={daemon.url}/api/v1
jq -n --arg input "$(base64 job.zip)" '{{id: "demo", input: $input, params: {{n: 3}}}}' |
  curl -sf -X POST $J/jobs -H 'Content-Type: application/json' -d @- > created.json
curl -sfN "$J/jobs/demo/logs?follow=true" > log.txt
curl -sf $J/jobs/demo > job.json
curl -sf -o result.zip "$J/jobs/demo/archive"
"""
    if shutil.which("jq") is None:
        pytest.skip("needs jq")
    subprocess.run(["bash", "-c", script], check=True, timeout=60)
    assert (tmp_path / "log.txt").read_text() == "hello from jobd\n"
    assert json.loads((tmp_path / "job.json").read_text())["status"] == "SUCCESS"
    assert zipfile.ZipFile(tmp_path / "result.zip").namelist() == ["run.sh"]


@pytest.mark.skipif(python39() is None, reason="no CPython 3.9 on this machine")
def test_native_api_on_python_3_9(daemon_factory: Any) -> None:
    daemon = daemon_factory(interpreter=python39())
    created(daemon, {"run.sh": "echo one\n" + GATE_WAIT + "echo two > out.txt\n"}, id="p39")
    with daemon.client.stream("GET", "/api/v1/jobs/p39/logs",
                              headers={"Accept": "text/event-stream"}) as stream:
        lines = stream.iter_lines()
        assert read_events(lines, lambda e: e.get("data") == "one")[-1]["id"] == "4"
        assert daemon.client.get("/api/v1/jobs/p39/files").json()["live"] is True
        snapshot = daemon.client.get("/api/v1/jobs/p39/archive", params={"format": "tar.gz"})
        assert snapshot.status_code == 200
        open_gate(daemon, "p39")
        end = read_events(lines, lambda e: e.get("event") == "end")[-1]
    assert json.loads(end["data"])["status"] == "SUCCESS"
    assert daemon.client.get("/api/v1/jobs/p39/files/out.txt").content == b"two\n"
    assert daemon.client.get("/docs").status_code == 200
    assert daemon.proc is not None  # its commits went to the fsync helper, run by 3.9 too
    pid = daemon.proc.pid
    helpers = [Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[:3]
               for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    assert [python39().encode(), b"-I", b"-S"] in helpers, helpers
    assert "fsync helper" not in daemon.log()  # no warning: it started and stayed


def test_followers_end_when_the_daemon_stops(daemon: Daemon) -> None:
    created(daemon, {"run.sh": "echo waiting\n" + GATE_WAIT}, id="stuck")
    with daemon.client.stream("GET", "/api/v1/jobs/stuck/logs",
                              headers={"Accept": "text/event-stream"}) as events, \
            daemon.client.stream("GET", "/api/v1/jobs/stuck/logs",
                                 params={"follow": "true"}) as text:
        event_lines, text_lines = events.iter_lines(), text.iter_lines()
        read_events(event_lines, lambda e: e.get("data") == "waiting")
        assert next(text_lines) == "waiting"
        started = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        end = read_events(event_lines, lambda e: e.get("event") == "end")[-1]
        assert json.loads(end["data"])["status"] in ("RUNNING", "QUEUED")  # not finished
        assert list(text_lines) == []
        assert time.monotonic() - started < 10
    assert daemon.stop() == 0
