"""The classic jobd protocol against the built zipapp on a loopback port."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import Daemon, make_zip, python39, result_files, wait_until

RECORD_KEYS = ["LastUpdated", "ID", "Status", "Path", "Input", "Output", "Message", "SlurmID",
               "Slurml"]


def test_health(daemon: Daemon) -> None:
    response = daemon.client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "healthy"}


@pytest.mark.skipif(not all(shutil.which(t) for t in ("jq", "curl", "zip", "unzip", "base64")),
                    reason="needs jq, curl, zip, unzip and base64")
def test_jq_curl_flow_byte_for_byte(daemon: Daemon, tmp_path: Path) -> None:
    """The spec's shell client, unchanged: zip, base64 (wrapped), jq, curl, poll, unzip."""
    work = tmp_path / "client"
    work.mkdir()
    (work / "run.sh").write_text("#!/bin/sh\ntr a-z A-Z < input.pdb > output.pdb\n")
    (work / "input.pdb").write_text("atom 1 ca\n")
    script = f"""
set -eu
cd {work}
zip -q files.zip run.sh input.pdb
jq -n --arg id "my-job" --arg input "$(base64 files.zip)" '{{id: $id, input: $input}}' > job.json
grep -q '\\\\n' job.json   # the base64 is wrapped: the JSON string holds newlines
curl -s -o upload.json -w '%{{http_code}}' -X POST {daemon.url}/api/upload \
     -H "Content-Type: application/json" -d @job.json > upload.code
for i in $(seq 1 300); do
  code=$(curl -s -o result.json -w '%{{http_code}}' {daemon.url}/api/get/my-job)
  [ "$code" = 200 ] && break
  sleep 0.1
done
echo "$code" > get.code
jq -r .Output result.json | base64 -d > out.zip
mkdir -p out && cd out && unzip -q ../out.zip
"""
    subprocess.run(["bash", "-c", script], check=True, timeout=60)
    assert (work / "upload.code").read_text() == "201"
    upload = json.loads((work / "upload.json").read_text())
    assert list(upload) == RECORD_KEYS
    assert upload["ID"] == "my-job" and upload["Status"] == "QUEUED" and upload["Input"] == ""
    assert (work / "get.code").read_text().strip() == "200"
    result = json.loads((work / "result.json").read_text())
    assert list(result) == RECORD_KEYS
    assert result["Status"] == "SUCCESS"
    assert result["Message"] == "job finished successfully"
    assert result["Input"] == "" and result["Path"] == ""
    assert (work / "out" / "output.pdb").read_text() == "ATOM 1 CA\n"
    assert (work / "out" / "input.pdb").read_text() == "atom 1 ca\n"  # the whole directory


def test_record_timestamp_is_rfc3339(daemon: Daemon) -> None:
    record = daemon.upload("ts", {"run.sh": "true\n"}).json()
    assert record["LastUpdated"].endswith("Z") and "T" in record["LastUpdated"]


@pytest.mark.parametrize(("body", "message"), [
    (b"not json", "error reading job from request"),
    (b'{"id": "x", "input": ', "error reading job from request"),
    (b"[1, 2]", "error reading job from request"),
    (b'{"input": "UEsFBgAAAAAAAAAAAAAAAAAAAAAAAA=="}', "error validating job job id is required"),
    (b'{"id": "", "input": "aGVsbG8="}', "error validating job job id is required"),
    (b'{"id": 5, "input": "aGVsbG8="}', "job id must be a string"),
    (b'{"id": "../etc", "input": "aGVsbG8="}', "job id must be"),
    (b'{"id": "a/b", "input": "aGVsbG8="}', "job id must be"),
    (b'{"id": ".hidden", "input": "aGVsbG8="}', "job id must be"),
    (b'{"id": "a b", "input": "aGVsbG8="}', "job id must be"),
    (('{"id": "' + "x" * 129 + '", "input": "aGVsbG8="}').encode(), "job id must be"),
    (b'{"id": "noinput"}', "input is required"),
    (b'{"id": "empty", "input": ""}', "input is required"),
    (b'{"id": "notb64", "input": "@@@@"}', "error validating job input is not valid base64"),
    (b'{"id": "notzip", "input": "aGVsbG8gd29ybGQ="}', "not a zip"),
    (b'{"id": "slurml", "input": "aGVsbG8=", "slurml": "yes"}', "slurml"),
])
def test_bad_uploads_get_a_clear_400_and_store_nothing(daemon: Daemon, body: bytes,
                                                       message: str) -> None:
    response = daemon.client.post("/api/upload", content=body,
                                  headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    answer = response.json()
    assert answer["error"] == "bad_request" and answer["status"] == 400
    assert message in answer["message"]
    assert [p.name for p in daemon.datapath.iterdir() if not p.name.startswith(".")] == []
    assert list((daemon.datapath / ".incoming").iterdir()) == []


def test_damaged_zip_and_missing_run_sh(daemon: Daemon) -> None:
    good = make_zip({"run.sh": "echo hi\n", "data.txt": "x" * 1000})
    damaged = good[: len(good) // 2]
    response = daemon.client.post("/api/upload", json={
        "id": "damaged", "input": base64.b64encode(damaged).decode()})
    assert response.status_code == 400
    assert "zip" in response.json()["message"]
    response = daemon.upload("norun", {"other.sh": "echo hi\n"})
    assert response.status_code == 400
    assert response.json()["message"] == \
        "error validating job run.sh does not exist in the input file"
    assert daemon.client.get("/api/get/norun").status_code == 404


def test_keys_are_case_insensitive(daemon: Daemon) -> None:
    body = {"ID": "upper", "INPUT": base64.b64encode(make_zip({"run.sh": "true\n"})).decode()}
    assert daemon.client.post("/api/upload", json=body).status_code == 201
    assert daemon.wait_done("upper").json()["Status"] == "SUCCESS"


def test_duplicate_id(daemon: Daemon) -> None:
    assert daemon.upload("dup", {"run.sh": "true\n"}).status_code == 201
    again = daemon.upload("dup", {"run.sh": "true\n"})
    assert again.status_code == 400
    assert again.json() == {"error": "bad_request", "message": "job already exists",
                            "status": 400}


def test_unknown_job_is_404(daemon: Daemon) -> None:
    response = daemon.client.get("/api/get/nope")
    assert response.status_code == 404
    assert response.json() == {"error": "not_found", "message": "job not found", "status": 404}
    assert daemon.client.get("/api/get/..%2F..%2Fetc").status_code == 404


def test_running_job_answers_202_then_200(daemon: Daemon, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    daemon.upload("slow", {"run.sh": f"while [ ! -e {gate} ]; do sleep 0.02; done\necho done\n"})
    wait_until(lambda: daemon.client.get("/api/get/slow").status_code == 202, what="202")
    response = daemon.client.get("/api/get/slow")
    assert response.json() == {"error": "no_content", "message": "job not ready", "status": 202}
    gate.touch()
    assert daemon.wait_done("slow").status_code == 200


def test_wait_holds_the_answer_until_the_job_is_done(daemon: Daemon, tmp_path: Path) -> None:
    """`?wait=` (an extension): one request instead of a polling loop; bounded; validated."""
    gate = tmp_path / "gate"
    daemon.upload("held", {"run.sh": f"while [ ! -e {gate} ]; do sleep 0.02; done\necho ok\n"})
    started = time.monotonic()
    response = daemon.client.get("/api/get/held", params={"wait": "0.5"})
    assert response.status_code == 202  # not done within the wait
    assert time.monotonic() - started >= 0.45

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(daemon.client.get, "/api/get/held", params={"wait": "30"})
        time.sleep(0.3)
        assert not pending.done()
        gate.touch()
        response = pending.result(timeout=15)
    assert response.status_code == 200
    assert response.json()["Status"] == "SUCCESS"
    assert "run.sh" in result_files(response)

    finished = time.monotonic()
    assert daemon.client.get("/api/get/held", params={"wait": "30"}).status_code == 200
    assert time.monotonic() - finished < 2  # a finished job answers at once
    for bad in ("-1", "301", "soon", "nan"):
        response = daemon.client.get("/api/get/held", params={"wait": bad})
        assert response.status_code == 400, bad
        assert response.json()["error"] == "bad_request"
    assert daemon.client.get("/api/get/nope", params={"wait": "1"}).status_code == 404


def test_wait_ends_when_the_daemon_stops(daemon: Daemon) -> None:
    daemon.upload("forever", {"run.sh": "sleep 60\n"})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(daemon.client.get, "/api/get/forever", params={"wait": "300"})
        time.sleep(0.3)
        started = time.monotonic()
        assert daemon.stop(signal.SIGTERM) == 0
        assert pending.result(timeout=20).status_code == 202
    assert time.monotonic() - started < 15


def test_failing_job_keeps_its_files_and_names_the_exit_code(daemon: Daemon) -> None:
    daemon.upload("fails", {"run.sh": "#!/bin/sh\necho partial > out.txt\nexit 3\n"})
    response = daemon.wait_done("fails")
    assert response.status_code == 200
    record = response.json()
    assert record["Status"] == "FAILED"
    assert record["Message"] == "could not finish the job, error: exit status 3"
    assert result_files(response)["out.txt"] == b"partial\n"


def test_job_killed_by_a_signal_names_it(daemon: Daemon) -> None:
    daemon.upload("killed", {"run.sh": "kill -KILL $$\n"})
    record = daemon.wait_done("killed").json()
    assert record["Status"] == "FAILED"
    assert "SIGKILL" in record["Message"]


def test_run_sh_without_exec_bit_or_shebang_runs_with_sh(daemon: Daemon) -> None:
    daemon.upload("plain", {"run.sh": "echo $0 > shell.txt\n"})
    response = daemon.wait_done("plain")
    assert response.json()["Status"] == "SUCCESS"
    assert result_files(response)["shell.txt"].strip() == b"run.sh"


def test_shebang_script_runs_with_its_interpreter(daemon: Daemon) -> None:
    script = "#!/usr/bin/env python3\nimport sys\nopen('v.txt', 'w').write(sys.version)\n"
    daemon.upload("py", {"run.sh": script}, )
    response = daemon.wait_done("py")
    assert response.json()["Status"] == "SUCCESS", response.json()["Message"]
    assert b"." in result_files(response)["v.txt"]


def test_output_is_logged_outside_the_working_directory(daemon: Daemon) -> None:
    daemon.upload("logs", {"run.sh": "echo to-stdout\necho to-stderr >&2\n"})
    response = daemon.wait_done("logs")
    assert "log" not in result_files(response)
    log = (daemon.datapath / "logs" / "log").read_text()
    assert "to-stdout" in log and "to-stderr" in log


def test_job_runs_in_its_own_session_with_a_clean_environment(daemon: Daemon) -> None:
    script = "ps -o sid= -p $$ > sid.txt 2>/dev/null || cat /proc/self/sessionid > sid.txt\n" \
             "echo $$ > pid.txt\nenv > env.txt\n"
    daemon.upload("session", {"run.sh": script})
    files = result_files(daemon.wait_done("session"))
    env = dict(line.split("=", 1) for line in files["env.txt"].decode().splitlines()
               if "=" in line)
    assert env["JOBD_JOB_ID"] == "session"
    assert env["JOBD_WORKDIR"].endswith("/session/work")
    assert "DATAPATH" not in env and "DB_PATH" not in env  # daemon settings do not leak
    pid = files["pid.txt"].strip()
    assert files["sid.txt"].strip() == pid  # session leader: its own process group


def test_new_upload_starts_at_once_not_on_the_next_poll(daemon_factory) -> None:
    daemon = daemon_factory(JOBD_POLL_INTERVAL="30s")
    daemon.upload("fast", {"run.sh": "true\n"})
    assert daemon.wait_done("fast", timeout=5).json()["Status"] == "SUCCESS"


def test_restart_with_queued_jobs(daemon_factory, tmp_path: Path) -> None:
    """Jobs queued (and one running) when the daemon stops all complete after a restart."""
    runs = tmp_path / "runs.txt"
    workdir = tmp_path / "restart"
    daemon = daemon_factory(workdir=workdir, JOBD_SLOTS="1", JOBD_SHUTDOWN_GRACE="1s")
    script = f"echo $JOBD_JOB_ID >> {runs}\nsleep 0.3\n"
    for n in range(4):
        assert daemon.upload(f"q{n}", {"run.sh": script}).status_code == 201
    assert daemon.stop(signal.SIGTERM) == 0
    again = daemon_factory(workdir=workdir, JOBD_SLOTS="1")
    for n in range(4):
        assert again.wait_done(f"q{n}").json()["Status"] == "SUCCESS"


def test_kill_9_then_restart_requeues_the_running_job(daemon_factory, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    workdir = tmp_path / "crash"
    daemon = daemon_factory(workdir=workdir, JOBD_SLOTS="1")
    script = f"echo $$ > {tmp_path}/pid.$JOBD_JOB_ID\nwhile [ ! -e {gate} ]; do sleep 0.02; done\n"
    daemon.upload("victim", {"run.sh": script})
    daemon.upload("waiting", {"run.sh": "true\n"})
    pid_file = tmp_path / "pid.victim"
    wait_until(pid_file.exists, what="the job to start")
    daemon.stop(signal.SIGKILL)
    os.killpg(int(pid_file.read_text()), signal.SIGKILL)  # the container dies whole
    gate.touch()
    again = daemon_factory(workdir=workdir, JOBD_SLOTS="1")
    assert again.wait_done("victim").json()["Status"] == "SUCCESS"
    assert again.wait_done("waiting").json()["Status"] == "SUCCESS"
    assert "daemon restarted" in again.log()


def test_retention_deletes_old_jobs(daemon_factory) -> None:
    daemon = daemon_factory(JOBD_RETENTION="1s", JOBD_RETENTION_INTERVAL="0.2s")
    daemon.upload("old", {"run.sh": "true\n"})
    daemon.wait_done("old")
    wait_until(lambda: daemon.client.get("/api/get/old").status_code == 404, 10,
               what="retention")
    assert not (daemon.datapath / "old").exists()


def test_many_uploads_at_once(daemon_factory, tmp_path: Path) -> None:
    """50 concurrent uploads: every one acknowledged completes, and runs exactly once."""
    daemon = daemon_factory(JOBD_SLOTS="4")
    runs = tmp_path / "runs"
    runs.mkdir()
    script = f"echo x >> {runs}/$JOBD_JOB_ID\n"

    def submit(n: int) -> int:
        return daemon.upload(f"c{n}", {"run.sh": script}).status_code

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(submit, range(50)))
        same = list(pool.map(lambda _: daemon.upload("same", {"run.sh": "true\n"}).status_code,
                             range(10)))
    assert codes == [201] * 50
    assert sorted(same) == [201] + [400] * 9
    for n in range(50):
        assert daemon.wait_done(f"c{n}").json()["Status"] == "SUCCESS"
    assert sorted(p.name for p in runs.iterdir()) == sorted(f"c{n}" for n in range(50))
    assert all(p.read_text() == "x\n" for p in runs.iterdir())


def test_starts_with_an_unwritable_home(daemon_factory) -> None:
    daemon = daemon_factory(HOME="/nonexistent/home")
    daemon.upload("home", {"run.sh": "true\n"})
    assert daemon.wait_done("home").json()["Status"] == "SUCCESS"


@pytest.mark.skipif(python39() is None, reason="no CPython 3.9 on this machine")
def test_zipapp_runs_on_python_3_9(daemon_factory) -> None:
    daemon = daemon_factory(interpreter=python39())
    daemon.upload("py39", {"run.sh": "echo ok > ok.txt\n"})
    response = daemon.wait_done("py39")
    assert result_files(response)["ok.txt"] == b"ok\n"


def test_sigterm_exits_zero(daemon: Daemon) -> None:
    assert daemon.stop(signal.SIGTERM) == 0


def test_a_second_sigterm_while_stopping_still_exits_zero(daemon: Daemon) -> None:
    """A supervisor that repeats its SIGTERM (or `docker stop` twice) while jobd winds down,
    even after its handlers are gone, sees a clean exit."""
    assert daemon.proc is not None
    daemon.upload("slow", {"run.sh": "sleep 30\n"})
    wait_until(lambda: daemon.client.get("/api/v1/jobs/slow").json()["status"] == "RUNNING",
               10, 0.02, "the job to run")
    daemon.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "jobd stopped" in daemon.log() or daemon.proc.poll() is not None,  # type: ignore[union-attr]
               30, 0.001, "jobd to stop")
    assert daemon.stop(signal.SIGTERM) == 0
