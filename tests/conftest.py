"""Shared fixtures: zip payloads, and the built zipapp running on a loopback port."""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

from jobd.cgroup import own_cgroup, tree_name
from tests.openapi_check import CHECKED, OpenApiChecker

ROOT = Path(__file__).resolve().parent.parent
ZIPAPP = ROOT / "dist" / "jobd"


def make_zip(files: dict[str, str | bytes], *, modes: dict[str, int] | None = None) -> bytes:
    """A zip holding `files` (name -> content), with optional unix modes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.external_attr = ((modes or {}).get(name, 0o644) | 0o100000) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, content)
    return buffer.getvalue()


def classic_body(job_id: str, files: dict[str, str | bytes], **extra: Any) -> dict[str, Any]:
    """A classic upload body, base64 wrapped at 76 columns like `base64 files.zip` prints."""
    return {"id": job_id, "input": base64.encodebytes(make_zip(files)).decode(), **extra}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.02,
               what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def sources_newer_than(target: Path) -> bool:
    if not target.exists():
        return True
    built = target.stat().st_mtime
    watched = [*ROOT.joinpath("jobd").rglob("*"), ROOT / "setup.cfg", ROOT / "build.sh"]
    return any(p.is_file() and p.stat().st_mtime > built for p in watched)


@pytest.fixture(scope="session")
def zipapp() -> Path:
    """The built dist/jobd (built now if missing or older than the sources)."""
    if os.environ.get("JOBD_ZIPAPP"):
        return Path(os.environ["JOBD_ZIPAPP"])
    if sources_newer_than(ZIPAPP):
        subprocess.run(["bash", str(ROOT / "build.sh")], check=True, cwd=ROOT)
    return ZIPAPP


def python39() -> str | None:
    """A CPython 3.9 to run the zipapp with, proving it still runs there."""
    for candidate in ("python3.9", "/root/.pyenv/versions/3.9.18/bin/python3.9"):
        found = shutil.which(candidate) or (candidate if os.access(candidate, os.X_OK) else None)
        if found:
            check = subprocess.run([found, "-c", "import sys; print(sys.version_info[:2])"],
                                   capture_output=True, text=True)
            if check.returncode == 0 and "(3, 9)" in check.stdout:
                return found
    return None


class Daemon:
    """The zipapp running as a real process on a loopback port."""

    def __init__(self, zipapp: Path, workdir: Path, interpreter: str | None = None,
                 **env: str) -> None:
        self.zipapp = zipapp
        self.workdir = workdir
        self.interpreter = interpreter
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.datapath = workdir / "data"
        self.db_path = workdir / "db"
        self.log_path = workdir / "daemon.log"
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(workdir),
            "SHIV_ROOT": str(workdir.parent / "shiv"),
            "PORT": str(self.port), "JOBD_HOST": "127.0.0.1",
            "DATAPATH": str(self.datapath), "DB_PATH": str(self.db_path),
            "JOBD_SLOTS": "2",
            # Test jobs write into the test's tmp_path, which only root may enter: as root,
            # run them as root. tests/test_exec.py covers the default (one uid per job).
            "JOBD_ALLOW_ROOT": "true", **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self._checker: OpenApiChecker | None = None
        self.client = self.new_client()

    def new_client(self, **options: Any) -> httpx.Client:
        """A client whose every answer is checked against the daemon's OpenAPI document."""
        options.setdefault("timeout", 30)
        return httpx.Client(base_url=self.url, event_hooks={"response": [self._check]},
                            **options)

    def _check(self, response: httpx.Response) -> None:
        if self._checker is not None:  # loaded once the daemon is up (see start)
            self._checker.check_response(response)

    def start(self, timeout: float = 30.0) -> Daemon:
        argv = [self.interpreter, str(self.zipapp)] if self.interpreter else [str(self.zipapp)]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the process
        self.proc = subprocess.Popen(argv, env=self.env, cwd=self.workdir,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        wait_until(self._healthy, timeout, 0.02, "the daemon to answer /health")
        if self._checker is None:
            document = self.client.get("/openapi.json")  # the client may speak TLS
            if document.status_code != 401:  # authentication on: answers not checked here
                document.raise_for_status()
                self._checker = OpenApiChecker(document.json())
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return self.client.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def upload(self, job_id: str, files: dict[str, str | bytes], **extra: Any) -> httpx.Response:
        return self.client.post("/api/upload", json=classic_body(job_id, files, **extra))

    def wait_done(self, job_id: str, timeout: float = 30.0) -> httpx.Response:
        def finished() -> httpx.Response | None:
            response = self.client.get(f"/api/get/{job_id}")
            return response if response.status_code != 202 else None
        return wait_until(finished, timeout, 0.02, f"job {job_id} to finish")


@pytest.fixture
def daemon_factory(zipapp: Path, tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start daemons (stopped at the end); keyword arguments become environment variables."""
    started: list[Daemon] = []

    def factory(interpreter: str | None = None, workdir: Path | None = None,
                **env: str) -> Daemon:
        where = workdir or tmp_path / f"d{len(started)}"
        where.mkdir(parents=True, exist_ok=True)
        daemon = Daemon(zipapp, where, interpreter, **env)
        started.append(daemon)
        return daemon.start()

    yield factory
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop(signal.SIGKILL)
        daemon.client.close()
    for daemon in started:  # once all are dead: daemons may share a DATAPATH
        remove_cgroups(daemon.datapath)


def remove_cgroups(datapath: Path) -> None:
    """Kill and remove the cgroups a daemon killed with SIGKILL left behind (the host's cgroup
    tree outlives the test)."""
    own = own_cgroup()
    tree = own / tree_name(datapath) if own is not None else None
    if tree is None or not tree.is_dir():
        return
    for group in [*tree.glob("job-*"), tree]:
        try:
            (group / "cgroup.kill").write_text("1")
        except FileNotFoundError:
            continue  # already removed (or a kernel without cgroup.kill: rmdir waits)
        wait_until(lambda g=group: _empty(g), 10, what=f"{group} to empty")
        wait_until(lambda g=group: _rmdir(g), 10, what=f"{group} to go")


def _empty(group: Path) -> bool:
    try:
        return "populated 0" in (group / "cgroup.events").read_text()
    except FileNotFoundError:
        return True


def _rmdir(path: Path) -> bool:
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


@pytest.fixture
def daemon(daemon_factory: Callable[..., Daemon]) -> Daemon:
    return daemon_factory()


def result_files(response: httpx.Response) -> dict[str, bytes]:
    """The files of a classic result (`Output` is base64 of a zip)."""
    data = base64.b64decode(response.json()["Output"])
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {i.filename: archive.read(i) for i in archive.infolist() if not i.is_dir()}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """How many answers were checked against the OpenAPI document, by operation."""
    if not CHECKED:
        return
    terminalreporter.write_sep("-", f"OpenAPI: {sum(CHECKED.values())} answers checked "
                                    f"against the schemas, {len(CHECKED)} (operation, status) "
                                    "pairs")
    for (method, template, status), count in sorted(CHECKED.items()):
        terminalreporter.write_line(f"  {method.upper():6} {template} {status}: {count}")


# -- execution control (test_exec, test_pid1, test_torture) ------------------------------


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every uid may enter, with a world-writable `shared/` for job reports.

    Not pytest's tmp_path: that lies under /tmp/pytest-of-root, which pytest resets to 0700
    whenever a session starts, so jobs running as other uids could not reach it.
    """
    path = Path(tempfile.mkdtemp(prefix="jobd-exec-"))
    path.chmod(0o711)
    shared = path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    events = shared / "events"
    events.touch()
    events.chmod(0o666)
    yield path
    shutil.rmtree(path)


def report(shared: Path, what: str) -> str:
    """Shell that appends `what job pid time uid` to shared/events."""
    return (f'echo "{what} $JOBD_JOB_ID $$ $(date +%s.%N) $(id -u)" >> {shared}/events\n')


def read_events(shared: Path) -> list[tuple[str, str, int, float, int]]:
    """(kind, job id, pid, time, uid) of each line `report` wrote."""
    out = []
    for line in (shared / "events").read_text().splitlines():
        kind, job_id, pid, when, uid = line.split()
        out.append((kind, job_id, int(pid), float(when), int(uid)))
    return out


def alive(pid: int) -> bool:
    """Does `pid` exist and is it not a zombie?"""
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != b"Z"
