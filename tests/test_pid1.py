"""jobd as a container's init: PID 1 of its own PID namespace (`unshare --pid --fork
--mount-proc`), reaping orphans and stopping cleanly on SIGTERM and SIGINT."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import Daemon, remove_cgroups, wait_until

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="PID namespaces need root"),
    pytest.mark.skipif(not (shutil.which("unshare") and shutil.which("nsenter")),
                       reason="needs unshare and nsenter (util-linux)"),
]


class InitDaemon(Daemon):
    """The zipapp as PID 1 of a new PID namespace; `init_pid` is its pid outside."""

    def start(self, timeout: float = 60.0) -> InitDaemon:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the process
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", str(self.zipapp)], env=self.env,
            cwd=self.workdir, stdout=self._log, stderr=subprocess.STDOUT)
        wait_until(self._healthy, timeout, 0.05, "the daemon to answer /health")
        return self

    @property
    def init_pid(self) -> int:
        """The pid, outside the namespace, of the namespace's PID 1 (unshare's child)."""
        assert self.proc is not None
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_bytes()
                except OSError:
                    continue
                if int(stat.rsplit(b")", 1)[1].split()[1]) == self.proc.pid:
                    return int(entry.name)
        raise AssertionError("unshare has no child")

    def inside(self, command: str) -> str:
        """Run `sh -c command` inside the daemon's PID and mount namespaces."""
        done = subprocess.run(["nsenter", "-t", str(self.init_pid), "-p", "-m", "sh", "-c",
                               command], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def processes(self) -> list[tuple[int, str, str, int]]:
        """(pid, comm, state, ppid) of every process in the namespace, as seen inside."""
        out = []
        for line in self.inside("cat /proc/[0-9]*/stat 2>/dev/null").splitlines():
            head, _, rest = line.rpartition(")")
            pid, _, comm = head.partition(" (")
            fields = rest.split()
            out.append((int(pid), comm, fields[0], int(fields[1])))
        return out


@pytest.fixture
def init_daemon(zipapp: Path, tmp_path: Path) -> Iterator[Callable[..., InitDaemon]]:
    started: list[InitDaemon] = []

    def factory(workdir: Path | None = None, **env: str) -> InitDaemon:
        where = workdir or tmp_path / f"ns{len(started)}"
        where.mkdir(parents=True, exist_ok=True)
        daemon = InitDaemon(zipapp, where, **env)
        started.append(daemon)
        return daemon.start()

    yield factory
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            os.kill(daemon.init_pid, signal.SIGKILL)  # the namespace dies with its init
            daemon.proc.wait(30)
        daemon.client.close()
    for daemon in started:  # once all are dead: daemons may share a DATAPATH
        remove_cgroups(daemon.datapath)


ORPHANS = """( sleep 1 & )
setsid sh -c 'sleep 1.5 & exit 0' &
( setsid sleep 2 & )
echo $$ > pid
"""


def test_pid1_reaps_orphans_zero_zombies(init_daemon) -> None:
    """Jobs whose children outlive them (double fork, setsid): every one is reaped by jobd."""
    # No cgroup: setsid'd orphans then live on after their job, and must still be reaped.
    daemon = init_daemon(JOBD_CGROUP="off", JOBD_LOG_LEVEL="debug")
    assert daemon.inside("cat /proc/1/cmdline | tr '\\0' ' '").count("jobd") >= 1
    for n in range(3):
        assert daemon.upload(f"orphans{n}", {"run.sh": ORPHANS}).status_code == 201
    for n in range(3):
        assert daemon.wait_done(f"orphans{n}").json()["Status"] == "SUCCESS"

    def settled() -> bool:
        # jobd's own fsync helper (jobd/syncer.py, a python3 child) stays until it idles.
        others = [p for p in daemon.processes() if p[0] != 1 and p[1] not in ("sh", "cat")
                  and not (p[1].startswith("python") and p[3] == 1)]
        return not others

    wait_until(settled, 20, 0.2, "the orphans to exit")
    zombies = [p for p in daemon.processes() if p[2] == "Z"]
    assert zombies == []
    assert daemon.log().count("reaped orphan") >= 6  # 2 setsid'd sleepers per job at least


def test_pid1_sigterm_stops_accepting_requeues_and_exits_0(init_daemon, tmp_path: Path) -> None:
    """With the default grace, a job that ignores SIGTERM: jobd exits 0 inside Docker's 10 s
    and the job runs again at the next start."""
    marks = tmp_path / "marks"
    where = tmp_path / "term"
    daemon = init_daemon(workdir=where)
    stubborn = f"trap '' TERM\necho start >> {marks}\nsleep 300\n"
    assert daemon.upload("stubborn", {"run.sh": stubborn}).status_code == 201
    assert daemon.upload("waiting", {"run.sh": "true\n"}).status_code == 201
    wait_until(marks.exists, what="the job to start")
    began = time.monotonic()
    os.kill(daemon.init_pid, signal.SIGTERM)

    def refused() -> bool:
        with socket.socket() as sock:
            sock.settimeout(1)
            return sock.connect_ex(("127.0.0.1", daemon.port)) != 0

    wait_until(refused, 3, 0.01, "the listener to close")
    assert daemon.proc is not None and daemon.proc.poll() is None  # still stopping the job
    code = daemon.proc.wait(30)
    took = time.monotonic() - began
    daemon._log.close()
    assert code == 0, daemon.log()
    assert took < 10, f"stopped in {took:.1f}s"
    log = daemon.log()
    assert "signal 15: stopping" in log and "job requeued: daemon shutting down" in log
    print(f"SIGTERM to exit: {took:.2f}s (default 6s grace, job ignoring SIGTERM)")
    again = init_daemon(workdir=where, JOBD_SHUTDOWN_GRACE="1s")
    wait_until(lambda: marks.read_text().count("start") == 2, 30, what="the requeued job")
    assert again.wait_done("waiting").json()["Status"] == "SUCCESS"


def test_pid1_sigint_exits_0(init_daemon) -> None:
    daemon = init_daemon()
    assert daemon.upload("quick", {"run.sh": "true\n"}).status_code == 201
    daemon.wait_done("quick")
    os.kill(daemon.init_pid, signal.SIGINT)
    assert daemon.proc is not None and daemon.proc.wait(30) == 0
    assert "signal 2: stopping" in daemon.log()
