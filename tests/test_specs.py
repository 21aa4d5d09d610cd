"""Job specs through the API of the built zipapp: listing, submission, artifacts, lock-down."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.conftest import Daemon, make_zip, wait_until

REVERSE = '''
description = "Reverse each line of a file"
command = ["python3", "-c", "import sys,os; d=os.environ['JOBD_ARTIFACTS_DIR']; \
open(os.path.join(d, 'out.txt'),'w').write(''.join(l[::-1] for l in open(sys.argv[1])) \
* int(sys.argv[2]))", "{input}", "{times}"]
timeout = "1m"
priority = 3

[params.input]
type = "file"
required = true

[params.times]
type = "integer"
default = 1
min = 1
max = 5
'''

ECHO = '''
command = ["sh", "-c", "printf '%s' \\"$1\\" > said.txt; env > env.txt", "sh", "{words}"]

[params.words]
type = "string"
max_length = 500

[params.mode]
type = "enum"
choices = ["fast", "slow"]
default = "fast"
'''


@pytest.fixture
def specs_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "specs"
    directory.mkdir()
    (directory / "reverse.toml").write_text(REVERSE)
    (directory / "echo.toml").write_text(ECHO)
    return directory


@pytest.fixture
def spec_daemon(daemon_factory: Callable[..., Daemon], specs_dir: Path) -> Daemon:
    return daemon_factory(JOBD_SPECS_DIR=str(specs_dir))


def finished(daemon: Daemon, job_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body = daemon.client.get(f"/api/v1/jobs/{job_id}").json()
        return body if body["status"] in ("SUCCESS", "FAILED", "CANCELLED") else None
    return wait_until(done, 30, what=f"job {job_id}")


def test_list_and_get_specs(spec_daemon: Daemon) -> None:
    listed = spec_daemon.client.get("/api/v1/specs").json()["specs"]
    assert [s["name"] for s in listed] == ["echo", "reverse"]
    reverse = spec_daemon.client.get("/api/v1/specs/reverse").json()
    assert reverse["priority"] == 3 and reverse["timeout"] == 60
    assert reverse["parameters"]["properties"]["times"]["maximum"] == 5
    assert reverse["parameters"]["required"] == ["input"]
    assert spec_daemon.client.get("/api/v1/specs/nope").status_code == 404


def test_submit_json_with_files_and_artifacts(spec_daemon: Daemon) -> None:
    body = {"id": "rev", "params": {"input": "in.txt", "times": 2},
            "input": base64.b64encode(make_zip({"in.txt": "abc\n"})).decode()}
    response = spec_daemon.client.post("/api/v1/specs/reverse/jobs", json=body)
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["spec"] == "reverse" and created["priority"] == 3
    assert created["params"] == {"INPUT": "in.txt", "TIMES": "2"}
    assert finished(spec_daemon, "rev")["status"] == "SUCCESS"
    listed = spec_daemon.client.get("/api/v1/jobs/rev/artifacts").json()["artifacts"]
    assert [(a["name"], a["size"]) for a in listed] == [("out.txt", 8)]
    import hashlib
    assert listed[0]["sha256"] == hashlib.sha256(b"\ncba\ncba").hexdigest()
    assert listed[0]["mime"] == "text/plain"
    content = spec_daemon.client.get("/api/v1/jobs/rev/files/" + listed[0]["path"]).content
    assert content == b"\ncba\ncba"


def test_submit_multipart_with_param_fields(spec_daemon: Daemon) -> None:
    response = spec_daemon.client.post(
        "/api/v1/specs/reverse/jobs", data={"id": "revm", "input": "x.txt", "times": "1"},
        files=[("file", ("x.txt", b"hello\n"))])
    assert response.status_code == 201, response.text
    assert finished(spec_daemon, "revm")["status"] == "SUCCESS"


@pytest.mark.parametrize(("params", "reason"), [
    ({}, "parameter 'input': is required"),
    ({"input": "in.txt", "times": 9}, "parameter 'times': must be at most 5"),
    ({"input": "in.txt", "times": "many"}, "parameter 'times': must be an integer"),
    ({"input": "in.txt", "colour": "red"}, "parameter 'colour': is not a parameter"),
    ({"input": "../etc/passwd"}, "parameter 'input': must be a relative path"),
    ({"input": "missing.txt"}, "parameter 'input': file 'missing.txt' is not among"),
])
def test_bad_values_are_a_400_naming_the_parameter(spec_daemon: Daemon, params: dict,
                                                   reason: str) -> None:
    body = {"params": params, "input": base64.b64encode(make_zip({"in.txt": "x"})).decode()}
    response = spec_daemon.client.post("/api/v1/specs/reverse/jobs", json=body)
    assert response.status_code == 400, response.text
    assert reason in response.json()["message"]


def test_hostile_values_reach_the_command_as_one_argument(spec_daemon: Daemon,
                                                          tmp_path: Path) -> None:
    canary = tmp_path / "pwned"
    hostile = f"$(touch {canary}); `touch {canary}` | touch {canary} ' \" \\"
    response = spec_daemon.client.post("/api/v1/specs/echo/jobs",
                                       json={"id": "evil", "params": {"words": hostile}})
    assert response.status_code == 201, response.text
    assert finished(spec_daemon, "evil")["status"] == "SUCCESS"
    said = spec_daemon.client.get("/api/v1/jobs/evil/files/said.txt").text
    assert said == hostile
    env = spec_daemon.client.get("/api/v1/jobs/evil/files/env.txt").text
    assert f"JOBD_PARAM_WORDS={hostile}" in env and "JOBD_PARAM_MODE=fast" in env
    assert not canary.exists()


def test_locked_down_mode_refuses_uploaded_code_everywhere(daemon_factory: Callable[..., Daemon],
                                                           specs_dir: Path) -> None:
    daemon = daemon_factory(JOBD_SPECS_DIR=str(specs_dir), JOBD_LOCKED="true")
    classic = daemon.upload("free", {"run.sh": "true\n"})
    assert classic.status_code == 403
    assert classic.json()["error"] == "forbidden" and "locked down" in classic.json()["message"]
    native = daemon.client.post("/api/v1/jobs", json={
        "input": base64.b64encode(make_zip({"run.sh": "true\n"})).decode()})
    assert native.status_code == 403 and "locked down" in native.json()["message"]
    multi = daemon.client.post("/api/v1/jobs", files=[("file", ("run.sh", b"true\n"))])
    assert multi.status_code == 403
    orchestrated = daemon.client.post("/submit", files=[("file", ("run.sh", b"true\n"))])
    assert orchestrated.status_code == 403
    assert daemon.client.get("/api/v1/jobs").json()["jobs"] == []
    spec_job = daemon.client.post("/api/v1/specs/echo/jobs", json={"params": {"words": "ok"}})
    assert spec_job.status_code == 201
    assert finished(daemon, spec_job.json()["id"])["status"] == "SUCCESS"


@pytest.mark.parametrize(("text", "where"), [
    ('command = ["ls"\n', "bad.toml:1"),
    ('command = ["ls"]\n\n[params.n]\ntype = "float"\n', "bad.toml:3"),
])
def test_a_broken_spec_stops_the_daemon_with_file_line_and_reason(zipapp: Path, tmp_path: Path,
                                                                  specs_dir: Path, text: str,
                                                                  where: str) -> None:
    (specs_dir / "bad.toml").write_text(text)
    result = subprocess.run(
        [str(zipapp), "serve", "--port", "0", "--specs-dir", str(specs_dir),
         "--datapath", str(tmp_path / "data"), "--db-path", str(tmp_path / "db")],
        capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SHIV_ROOT": str(tmp_path / "s"),
             "JOBD_ALLOW_ROOT": "true"})
    assert result.returncode == 2
    assert "broken job spec" in result.stderr and where in result.stderr


def test_submit_by_spec_through_the_cli(spec_daemon: Daemon, zipapp: Path,
                                        tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "JOBD_URL": spec_daemon.url,
           "SHIV_ROOT": str(tmp_path / "shiv")}
    listed = subprocess.run([str(zipapp), "specs"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "reverse\tinput*:file, times:integer" in listed.stdout
    data = tmp_path / "in.txt"
    data.write_text("xyz\n")
    out = tmp_path / "out"
    run = subprocess.run([str(zipapp), "submit", "--spec", "reverse", "--param", "input=in.txt",
                          "--param", "times=3", str(data), "--wait", "-o", str(out)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (out / "artifacts" / "out.txt").read_text() == "\nzyx" * 3
    bad = subprocess.run([str(zipapp), "submit", "--spec", "reverse", "--param", "times=9",
                          str(data)], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 3
    assert "parameter 'input': is required" in bad.stderr
    words = subprocess.run([str(zipapp), "submit", "--spec", "echo", "--param", "words=hi",
                            "--wait"], env=env, capture_output=True, text=True, timeout=120)
    assert words.returncode == 0, words.stderr
