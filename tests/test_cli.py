"""The command line's client commands: the built dist/jobd run as a subprocess against a real
daemon on a loopback port (and, for what a daemon cannot be made to do on demand, against a
small stdlib HTTP server that records what the client sent)."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import pytest

from jobd.client import exit_codes_markdown
from tests.conftest import ROOT, Daemon, free_port, make_zip, python39, wait_until

EXAMPLE_JOB = ROOT / "examples" / "job"
REVERSED = ">chain A\nRQKAIYATKM\n>chain B\nVPDELMHSG\n"


@pytest.fixture(scope="session")
def shiv_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One unpack of the zipapp for every command run by these tests."""
    return tmp_path_factory.mktemp("cli-shiv")


class Cli:
    """Runs `dist/jobd ARGS` with JOBD_URL pointing at a daemon."""

    def __init__(self, zipapp: Path, url: str, shiv_root: Path, cwd: Path,
                 interpreter: str | None = None) -> None:
        self.zipapp = zipapp
        self.url = url
        self.cwd = cwd
        self.interpreter = interpreter
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd),
                    "SHIV_ROOT": str(shiv_root), "JOBD_URL": url, "LC_ALL": "C.UTF-8"}

    def argv(self, *args: str | Path) -> list[str]:
        head = [self.interpreter, str(self.zipapp)] if self.interpreter else [str(self.zipapp)]
        return head + [str(a) for a in args]

    def __call__(self, *args: str | Path, timeout: float = 120, env: dict[str, str] | None = None,
                 ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout,
                              cwd=self.cwd, env={**self.env, **(env or {})})

    def popen(self, *args: str | Path, **kwargs: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*args), cwd=self.cwd, env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def native_daemon(daemon_factory: Callable[..., Daemon], **env: str) -> Daemon:
    """A daemon with the native API (skips, saying why, when this build has none yet)."""
    daemon = daemon_factory(JOBD_FSYNC="false", **env)
    answer = daemon.client.get("/api/v1/jobs")
    if answer.status_code == 404 and "job" not in answer.text:
        pytest.skip("this build has no native API (/api/v1) yet: the CLI needs branch api")
    return daemon


@pytest.fixture
def native(daemon_factory: Callable[..., Daemon]) -> Daemon:
    return native_daemon(daemon_factory)


@pytest.fixture
def cli(zipapp: Path, native: Daemon, shiv_root: Path, tmp_path: Path) -> Cli:
    work = tmp_path / "cwd"
    work.mkdir()
    return Cli(zipapp, native.url, shiv_root, work)


def write_job(where: Path, script: str, **files: str) -> Path:
    """A job directory: run.sh (executable) and other files."""
    where.mkdir(parents=True, exist_ok=True)
    run = where / "run.sh"
    run.write_text("#!/bin/sh\n" + script)
    run.chmod(0o755)
    for name, content in files.items():
        (where / name).write_text(content)
    return where


def job_id_of(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stdout.split()
    assert lines, f"no job id on stdout; stderr: {result.stderr}"
    return lines[0]


def status_of(cli: Cli, job_id: str) -> dict[str, Any]:
    result = cli("status", job_id, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_status(cli: Cli, job_id: str, wanted: str, timeout: float = 30) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        result = cli("status", job_id, "--json")
        if result.returncode == 4:  # not submitted yet
            return None
        assert result.returncode == 0, result.stderr
        record = json.loads(result.stdout)
        return record if record["status"] == wanted else None

    return wait_until(reached, timeout, 0.1, f"{job_id} to be {wanted}")


# -- submit ----------------------------------------------------------------------------------


def test_submit_directory_wait_and_unpack(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "result"
    result = cli("submit", EXAMPLE_JOB, "--id", "fasta-1", "--wait", "-o", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "fasta-1\n"
    assert "fasta-1: SUCCESS: job finished successfully" in result.stderr
    assert (out / "reversed.fasta").read_text() == REVERSED
    assert (out / "input.fasta").exists() and os.access(out / "run.sh", os.X_OK)


def test_submit_list_of_files_and_a_zip(cli: Cli, tmp_path: Path) -> None:
    files = [EXAMPLE_JOB / "run.sh", EXAMPLE_JOB / "input.fasta", EXAMPLE_JOB / "reverse.py"]
    result = cli("submit", *files, "--wait", "-o", tmp_path / "from-files")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "from-files" / "reversed.fasta").read_text() == REVERSED

    archive = tmp_path / "job.zip"
    archive.write_bytes(make_zip({"run.sh": "echo zipped > out.txt\n"}, modes={"run.sh": 0o755}))
    result = cli("submit", archive, "--wait", "-o", tmp_path / "from-zip")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "from-zip" / "out.txt").read_text() == "zipped\n"
    assert not (tmp_path / "from-zip" / "job.zip").exists()  # sent as it is, not zipped again


def test_submit_options_reach_the_job(cli: Cli, tmp_path: Path) -> None:
    job = write_job(tmp_path / "job", "exit 99\n")
    go = job / "go.sh"
    go.write_text('#!/bin/sh\necho "args: $*"\necho "N=$JOBD_PARAM_N NAME=$JOBD_PARAM_NAME"\n')
    go.chmod(0o755)
    result = cli("submit", job, "--id", "opts", "--entry", "go.sh", "--arg", "one",
                 "--arg", "two words", "--param", "N=3", "--param", "NAME=007",
                 "--priority", "5", "--label", "project=x", "--label", "run=7",
                 "--timeout", "5m", "--wait")
    assert result.returncode == 0, result.stderr
    record = status_of(cli, "opts")
    assert record["entry"] == "go.sh"
    assert record["args"] == ["one", "two words"]
    assert record["params"] == {"N": 3, "NAME": "007"}
    assert record["priority"] == 5
    assert record["labels"] == {"project": "x", "run": "7"}
    assert record["timeout"] == 300
    logs = cli("logs", "opts")
    assert logs.stdout == "args: one two words\nN=3 NAME=007\n"


@pytest.mark.parametrize(("script", "expected"), [
    ("exit 0\n", 0),
    ("exit 3\n", 3),
    ("exit 200\n", 200),
    ("kill -9 $$\n", 128 + 9),
])
def test_wait_exit_code_follows_the_job(cli: Cli, tmp_path: Path, script: str,
                                        expected: int) -> None:
    result = cli("submit", write_job(tmp_path / "job", script), "--wait")
    assert result.returncode == expected, result.stderr
    status = "SUCCESS" if expected == 0 else "FAILED"
    assert f"{job_id_of(result)}: {status}" in result.stderr


def test_wait_on_a_timed_out_and_a_cancelled_job(cli: Cli, tmp_path: Path) -> None:
    slow = write_job(tmp_path / "slow", "sleep 60\n")
    result = cli("submit", slow, "--timeout", "1s", "--wait")
    assert result.returncode in (128 + 15, 128 + 9), result.stderr  # TERM, or KILL after grace
    assert "FAILED" in result.stderr

    waiting = cli.popen("submit", slow, "--id", "to-cancel", "--wait")
    wait_status(cli, "to-cancel", "RUNNING")
    assert cli("cancel", "to-cancel").returncode == 0
    _, stderr = waiting.communicate(timeout=60)
    assert waiting.returncode == 9, stderr
    assert "to-cancel: CANCELLED" in stderr


def test_follow_prints_the_log_while_the_job_runs(cli: Cli, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    job = write_job(tmp_path / "job", f"echo first\nwhile [ ! -e {gate} ]; do sleep 0.05; done\n"
                    "echo second >&2\nexit 4\n")
    follower = cli.popen("submit", job, "--follow")
    assert follower.stdout is not None
    assert follower.stdout.readline() == "first\n"  # while the job still waits for the gate
    gate.touch()
    rest, stderr = follower.communicate(timeout=60)
    assert rest == "second\n"
    assert follower.returncode == 4, stderr
    assert re.search(r"^submitted \S+$", stderr, re.M)


def test_logs_follow(cli: Cli, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    job = write_job(tmp_path / "job", f"echo one\nwhile [ ! -e {gate} ]; do sleep 0.05; done\n"
                    "echo two\n")
    job_id = job_id_of(cli("submit", job))
    follower = cli.popen("logs", "-f", job_id)
    assert follower.stdout is not None
    assert follower.stdout.readline() == "one\n"
    gate.touch()
    rest, stderr = follower.communicate(timeout=60)
    assert (rest, follower.returncode) == ("two\n", 0), stderr
    assert cli("logs", job_id).stdout == "one\ntwo\n"


def test_submit_streams_without_holding_the_payload(cli: Cli, tmp_path: Path) -> None:
    """64 MiB of incompressible input (85 MiB of base64) with a client far smaller than that."""
    job = write_job(tmp_path / "job", "wc -c < blob > size.txt\n")
    with open(job / "blob", "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
    probe = ("import resource, subprocess, sys\n"
             "code = subprocess.run(sys.argv[1:]).returncode\n"
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
             "sys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", probe, *cli.argv("submit", job, "--wait",
                                                                     "-o", tmp_path / "out")],
                            capture_output=True, text=True, timeout=300, cwd=cli.cwd, env=cli.env)
    assert result.returncode == 0, result.stderr
    peak_kib = int(result.stdout.split()[-1])
    assert peak_kib < 60 * 1024, f"client peaked at {peak_kib} KiB"
    assert (tmp_path / "out" / "size.txt").read_text().strip() == str(64 << 20)


def test_submit_under_python39(zipapp: Path, native: Daemon, shiv_root: Path,
                               tmp_path: Path) -> None:
    interpreter = python39()
    if interpreter is None:
        pytest.skip("no CPython 3.9 on this machine")
    cli = Cli(zipapp, native.url, shiv_root.parent / "shiv39", tmp_path, interpreter)
    result = cli("submit", EXAMPLE_JOB, "--wait", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "reversed.fasta").read_text() == REVERSED
    assert cli("list").returncode == 0


# -- inspecting and managing jobs --------------------------------------------------------------


def test_list_table_json_filters(cli: Cli, tmp_path: Path) -> None:
    job = write_job(tmp_path / "job", "exit 0\n")
    for n in range(4):
        cli("submit", job, "--id", f"l{n}", "--label", f"batch={'a' if n < 3 else 'b'}", "--wait")
    failed = write_job(tmp_path / "bad", "exit 2\n")
    cli("submit", failed, "--id", "lf", "--label", "batch=a", "--wait")

    table = cli("list").stdout.splitlines()
    assert table[0].split() == ["ID", "STATUS", "AGE", "DURATION", "EXIT", "LABELS"]
    assert [line.split()[0] for line in table[1:]] == ["lf", "l3", "l2", "l1", "l0"]
    for column in ("STATUS", "AGE", "DURATION", "EXIT", "LABELS"):  # aligned columns
        at = table[0].index(column)
        assert all(line[at - 2:at] == "  " and line[at] != " " for line in table)
    assert table[1].split()[1] == "FAILED" and table[1].split()[4] == "2"

    as_json = json.loads(cli("list", "--json", "--label", "batch=a").stdout)
    assert [j["id"] for j in as_json] == ["lf", "l2", "l1", "l0"]
    only_failed = json.loads(cli("list", "--json", "--status", "failed").stdout)
    assert [j["id"] for j in only_failed] == ["lf"]
    two = json.loads(cli("list", "--json", "--limit", "2").stdout)
    assert [j["id"] for j in two] == ["lf", "l3"]
    bad = cli("list", "--status", "DONE")
    assert bad.returncode == 2 and "unknown status" in bad.stderr


def test_list_follows_cursors_past_one_page(cli: Cli, native: Daemon) -> None:
    for n in range(105):
        assert native.upload(f"p{n:03d}", {"run.sh": "true\n"}).status_code == 201
    everything = json.loads(cli("list", "--json", "--limit", "0").stdout)
    assert len(everything) == 105
    assert len({j["id"] for j in everything}) == 105
    assert everything[0]["id"] == "p104" and everything[-1]["id"] == "p000"
    assert len(json.loads(cli("list", "--json", "--limit", "101").stdout)) == 101


def test_status_cancel_restart_delete(cli: Cli, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    job = write_job(tmp_path / "job", f"while [ ! -e {gate} ]; do sleep 0.05; done\necho done\n")
    assert cli("submit", job, "--id", "life").returncode == 0
    wait_status(cli, "life", "RUNNING")
    shown = cli("status", "life").stdout
    assert re.search(r"^status:\s+RUNNING$", shown, re.M)
    assert re.search(r"^id:\s+life$", shown, re.M)

    refused = cli("delete", "life")
    assert refused.returncode == 3
    assert "cancel it before deleting it (HTTP 409)" in refused.stderr

    cancelled = cli("cancel", "life")
    assert (cancelled.returncode, cancelled.stdout) == (0, "life: CANCELLED\n")
    again = cli("cancel", "life")
    assert again.stdout == "life: CANCELLED (already finished)\n"

    gate.touch()
    restarted = cli("restart", "life")
    assert (restarted.returncode, restarted.stdout) == (0, "life: QUEUED\n")
    wait_status(cli, "life", "SUCCESS")
    assert cli("logs", "life").stdout == "done\n"

    deleted = cli("delete", "life")
    assert (deleted.returncode, deleted.stdout) == (0, "deleted life\n")
    gone = cli("status", "life")
    assert gone.returncode == 4
    assert gone.stderr == "Error: job not found (HTTP 404)\n"


def test_download_formats_and_destinations(cli: Cli, tmp_path: Path) -> None:
    assert cli("submit", EXAMPLE_JOB, "--id", "dl", "--wait").returncode == 0

    assert cli("download", "dl").returncode == 0
    with zipfile.ZipFile(cli.cwd / "dl.zip") as zf:
        assert zf.read("reversed.fasta").decode() == REVERSED

    target = tmp_path / "r.tar.gz"
    assert cli("download", "dl", "--format", "tar.gz", "-o", target).returncode == 0
    with tarfile.open(target) as tf:
        member = tf.extractfile("reversed.fasta")
        assert member is not None and member.read().decode() == REVERSED

    piped = subprocess.run(cli.argv("download", "dl", "-o", "-"), capture_output=True,
                           timeout=60, cwd=cli.cwd, env=cli.env)
    assert piped.returncode == 0 and piped.stderr == b""
    with zipfile.ZipFile(io.BytesIO(piped.stdout)) as zf:
        assert "run.sh" in zf.namelist()

    unpacked = tmp_path / "unpacked"
    assert cli("download", "dl", "-o", f"{unpacked}/").returncode == 0
    assert (unpacked / "reversed.fasta").read_text() == REVERSED
    again = cli("download", "dl", "-o", unpacked)
    assert again.returncode == 8
    assert "is not empty" in again.stderr


def test_clean_deletes_only_finished_jobs_older_than_the_age(cli: Cli, tmp_path: Path) -> None:
    done = write_job(tmp_path / "done", "exit 0\n")
    for name in ("c1", "c2"):
        assert cli("submit", done, "--id", name, "--wait").returncode == 0
    gate = tmp_path / "gate"
    running = write_job(tmp_path / "run", f"while [ ! -e {gate} ]; do sleep 0.05; done\n")
    cli("submit", running, "--id", "c3")
    wait_status(cli, "c3", "RUNNING")

    kept = cli("clean", "--older-than", "1h")
    assert (kept.returncode, kept.stdout) == (0, "")
    assert "0 job(s) deleted" in kept.stderr
    dry = cli("clean", "--older-than", "0s", "--dry-run")
    assert sorted(dry.stdout.splitlines()) == ["would delete c1", "would delete c2"]

    time.sleep(0.01)
    cleaned = cli("clean", "--older-than", "0s")
    assert cleaned.returncode == 0, cleaned.stderr
    assert sorted(cleaned.stdout.splitlines()) == ["deleted c1", "deleted c2"]
    assert [j["id"] for j in json.loads(cli("list", "--json").stdout)] == ["c3"]
    gate.touch()
    refused = cli("clean", "--older-than", "1d", "--status", "RUNNING")
    assert refused.returncode == 2 and "only deletes finished jobs" in refused.stderr


# -- errors and exit codes -----------------------------------------------------------------------


def test_clear_errors_and_exit_codes(cli: Cli, tmp_path: Path) -> None:
    port = free_port()
    nobody = cli("list", "--url", f"http://127.0.0.1:{port}")
    assert nobody.returncode == 6
    assert nobody.stderr.startswith(f"Error: cannot reach jobd at http://127.0.0.1:{port}: ")
    assert "Traceback" not in nobody.stderr

    no_run = tmp_path / "norun"
    no_run.mkdir()
    (no_run / "data.txt").write_text("x")
    refused = cli("submit", no_run)
    assert refused.returncode == 3
    assert "run.sh" in refused.stderr and "(HTTP 400)" in refused.stderr

    job = write_job(tmp_path / "job", "exit 0\n")
    assert cli("submit", job, "--id", "twice").returncode == 0
    duplicate = cli("submit", job, "--id", "twice")
    assert duplicate.returncode == 3 and "already exists" in duplicate.stderr

    missing = cli("submit", tmp_path / "nothing-here")
    assert missing.returncode == 8 and "no such file or directory" in missing.stderr

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    before = cli("list", "--json").stdout
    not_empty = cli("submit", job, "-o", busy)
    assert not_empty.returncode == 8 and "is not empty" in not_empty.stderr
    assert cli("list", "--json").stdout == before  # refused before anything was sent

    assert cli("submit", job, "--id", "../x").returncode == 2
    assert cli("submit", job, "--label", "novalue").returncode == 2
    assert cli("status", "no-such-job").returncode == 4


def test_a_body_too_large_is_reported_not_a_broken_pipe(
        zipapp: Path, daemon_factory: Callable[..., Daemon], shiv_root: Path,
        tmp_path: Path) -> None:
    """The daemon answers 413 before the upload is over and closes: the client reads it."""
    small = native_daemon(daemon_factory, JOBD_MAX_BODY="1M")
    cli = Cli(zipapp, small.url, shiv_root, tmp_path)
    job = write_job(tmp_path / "job", "true\n")
    (job / "blob").write_bytes(os.urandom(16 << 20))
    result = cli("submit", job)
    assert result.returncode == 3, result.stderr
    assert result.stderr == "Error: request body is larger than 1048576 bytes (HTTP 413)\n"


def test_ctrl_c_while_waiting_leaves_the_job_running(cli: Cli, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    job = write_job(tmp_path / "job", f"while [ ! -e {gate} ]; do sleep 0.05; done\n")
    waiting = cli.popen("submit", job, "--id", "interrupted", "--wait")
    wait_status(cli, "interrupted", "RUNNING")
    waiting.send_signal(signal.SIGINT)
    stdout, stderr = waiting.communicate(timeout=60)
    assert waiting.returncode == 130
    assert (stdout, stderr) == ("interrupted\n", "interrupted\n")
    assert status_of(cli, "interrupted")["status"] == "RUNNING"
    gate.touch()
    wait_status(cli, "interrupted", "SUCCESS")


def test_version_and_help_document_the_exit_codes(zipapp: Path, shiv_root: Path) -> None:
    env = {"PATH": os.environ["PATH"], "SHIV_ROOT": str(shiv_root)}
    version = subprocess.run([zipapp, "--version"], capture_output=True, text=True, env=env)
    assert version.returncode == 0 and re.fullmatch(r"jobd, version \S+\n", version.stdout)
    for argv in ([zipapp, "--help"], [zipapp, "submit", "--help"]):
        shown = subprocess.run(argv, capture_output=True, text=True, env=env).stdout
        assert "Exit codes" in shown and "cannot reach the daemon" in shown
    assert exit_codes_markdown() in (ROOT / "README.md").read_text(), \
        "README's exit code table is out of date: paste jobd.client.exit_codes_markdown()"


# -- progress on a terminal only -----------------------------------------------------------------


def _run_with_tty_stderr(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    main, secondary = pty.openpty()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=secondary, env=env, cwd=cwd)
    os.close(secondary)
    seen = b""
    while True:
        ready, _, _ = select.select([main], [], [], 60)
        if not ready:
            proc.kill()
            raise AssertionError("no output from the terminal for 60 s")
        try:
            data = os.read(main, 65536)
        except OSError:  # EIO: the last writer closed the terminal
            break
        if not data:
            break
        seen += data
    proc.wait(60)
    os.close(main)
    return proc.returncode, seen.decode(errors="replace")


def test_progress_bars_on_a_terminal_only(cli: Cli, tmp_path: Path) -> None:
    job = write_job(tmp_path / "job", "head -c 3000000 /dev/zero > zeros\n")
    (job / "noise").write_bytes(os.urandom(4 << 20))
    code, terminal = _run_with_tty_stderr(
        cli.argv("submit", job, "--wait", "-o", tmp_path / "out"), cli.env, cli.cwd)
    assert code == 0, terminal
    assert re.search(r"uploading \[#+\] 100% ", terminal)
    assert "downloading" in terminal and "\r" in terminal

    piped = cli("submit", job, "--wait", "-o", tmp_path / "out2")
    assert piped.returncode == 0
    assert "\r" not in piped.stderr and "uploading" not in piped.stderr
    assert piped.stderr.splitlines() == [f"{job_id_of(piped)}: SUCCESS: job finished successfully"]


# -- what only a stand-in server can show ---------------------------------------------------------


class Recorder(BaseHTTPRequestHandler):
    """Answers from `routes` (path -> (status, body)) and records each request."""

    routes: dict[str, tuple[int, Any]] = {}
    seen: list[tuple[str, str, dict[str, str]]] = []

    def do_GET(self) -> None:
        self.seen.append(("GET", self.path, dict(self.headers)))
        status, body = self.routes.get(self.path, (404, {"error": "not_found",
                                                         "message": "job not found",
                                                         "status": 404}))
        data = json.dumps(body).encode() if not isinstance(body, bytes) else body
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def stand_in() -> Iterator[tuple[str, type[Recorder]]]:
    handler = type("Handler", (Recorder,), {"routes": {}, "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def test_token_is_sent_and_401_explained(zipapp: Path, shiv_root: Path, tmp_path: Path,
                                         stand_in: tuple[str, type[Recorder]]) -> None:
    url, handler = stand_in
    cli = Cli(zipapp, url, shiv_root, tmp_path)
    handler.routes["/api/v1/jobs/j1"] = (200, {"id": "j1", "status": "QUEUED"})
    assert cli("status", "j1", env={"JOBD_TOKEN": "s3cret"}).returncode == 0
    assert handler.seen[-1][2].get("Authorization") == "Bearer s3cret"
    assert cli("status", "j1").returncode == 0
    assert "Authorization" not in handler.seen[-1][2]

    handler.routes["/api/v1/jobs/j1"] = (401, {"error": "unauthorized",
                                               "message": "a bearer token is required",
                                               "status": 401})
    denied = cli("status", "j1")
    assert denied.returncode == 5
    assert denied.stderr == ("Error: a bearer token is required (HTTP 401) "
                             "(JOBD_TOKEN is not set)\n")
    handler.routes["/api/v1/jobs/j1"] = (502, b"<html>bad gateway</html>")
    assert cli("status", "j1").returncode == 7


def test_list_pages_through_cursors(zipapp: Path, shiv_root: Path, tmp_path: Path,
                                    stand_in: tuple[str, type[Recorder]]) -> None:
    url, handler = stand_in
    cli = Cli(zipapp, url, shiv_root, tmp_path)
    jobs = [{"id": f"j{n}", "status": "SUCCESS", "labels": {}} for n in range(5)]
    handler.routes.update({
        "/api/v1/jobs?limit=100&status=SUCCESS&label=a%3Db": (200, {"jobs": jobs[:2],
                                                                    "next_cursor": "c2"}),
        "/api/v1/jobs?limit=100&cursor=c2&status=SUCCESS&label=a%3Db": (
            200, {"jobs": jobs[2:4], "next_cursor": "c4"}),
        "/api/v1/jobs?limit=100&cursor=c4&status=SUCCESS&label=a%3Db": (
            200, {"jobs": jobs[4:], "next_cursor": None}),
    })
    result = cli("list", "--json", "--limit", "0", "--status", "SUCCESS", "--label", "a=b")
    assert result.returncode == 0, result.stderr
    assert [j["id"] for j in json.loads(result.stdout)] == ["j0", "j1", "j2", "j3", "j4"]
    assert len(handler.seen) == 3
