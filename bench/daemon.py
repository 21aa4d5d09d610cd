"""The built zipapp as a real process on a loopback port, and what /proc says about it."""

from __future__ import annotations

import functools
import os
import resource
import signal
import socket
import subprocess
import time
from pathlib import Path

from bench.records import prefill
from bench.wire import Conn

ROOT = Path(__file__).resolve().parent.parent
# The zipapp measured: dist/jobd, or JOBD_ZIPAPP (as in the tests).
ZIPAPP = Path(os.environ.get("JOBD_ZIPAPP") or ROOT / "dist" / "jobd")
_TICK = os.sysconf("SC_CLK_TCK")


@functools.cache
def python() -> str:
    """The interpreter `python3` on PATH resolves to.

    The zipapp's shebang is `/usr/bin/env python3`; where that is a wrapper (pyenv's shim is
    a bash script that runs several more, 0.3 s here), every start would measure the
    wrapper. Containers run a real python3, so the daemon is started with this one.
    """
    out = subprocess.run(["python3", "-c", "import sys; print(sys.executable)"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _raise_nofile() -> None:
    """In the child before exec: room for the load test's 1,000 connections."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))


class Jobd:
    """dist/jobd with its own DATAPATH, DB_PATH and port under `workdir`."""

    def __init__(self, workdir: Path, *, zipapp: Path = ZIPAPP, shiv_root: Path | None = None,
                 stored: int = 0, **env: str) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.zipapp = zipapp
        self.port = free_port()
        self.datapath = workdir / "data"
        self.db_path = workdir / "db"
        self.log_path = workdir / "daemon.log"
        if stored:
            prefill(self.db_path, stored)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir),
            "SHIV_ROOT": str(shiv_root or workdir / "shiv"), "PORT": str(self.port),
            "JOBD_HOST": "127.0.0.1", "DATAPATH": str(self.datapath),
            "DB_PATH": str(self.db_path),
            # Jobs run as the daemon's user, as webhook's do, and write marks the bench reads.
            "JOBD_ALLOW_ROOT": "true", **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 120.0) -> Jobd:
        """Start and wait for the first 200 from /health; `start_seconds` is how long it took."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        began = time.perf_counter()
        try:
            self.proc = subprocess.Popen([python(), str(self.zipapp)], env=self.env,
                                         cwd=self.workdir,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=_raise_nofile)  # noqa: PLW1509
        finally:
            log.close()
        deadline = began + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jobd exited with {self.proc.returncode}:\n{self.log()}")
            if self._healthy():
                break
            if time.perf_counter() > deadline:
                raise RuntimeError(f"jobd did not answer /health within {timeout}s")
            time.sleep(0.002)
        self.start_seconds = time.perf_counter() - began
        return self

    def _healthy(self) -> bool:
        try:
            with Conn("127.0.0.1", self.port, timeout=5) as conn:
                return conn.request("GET", "/health").status == 200
        except OSError:
            return False

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> Jobd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def conn(self) -> Conn:
        return Conn("127.0.0.1", self.port)

    # -- what /proc says ------------------------------------------------------------------

    def status_kib(self, field: str) -> int:
        """A `Vm...` line of /proc/<pid>/status, in KiB (VmRSS, VmHWM)."""
        return proc_status_kib(self.pid, field)

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS (Linux 4.0+, writing 5 to clear_refs)."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def cpu_seconds(self) -> float:
        """User + system CPU of the daemon (all its threads, alive or gone)."""
        return cpu_seconds(self.pid)

    def cpu_ns(self) -> int:
        """CPU time of the daemon's live threads in ns (schedstat: finer than 10 ms ticks)."""
        return cpu_ns(self.pid)


def proc_status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def children_cpu_seconds(pid: int) -> float:
    """User + system CPU of the children `pid` waited for (a daemon's jobs)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[13]) + int(fields[14])) / _TICK


def helpers(pid: int) -> list[int]:
    """The live children of `pid` that are jobd's fsync helper (jobd/syncer.py: the same
    interpreter run with `-I -S -c`), not jobs."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[1:4] == [b"-I", b"-S", b"-c"]:
                found.append(int(child))
    return found


def helper_cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid`'s live fsync helpers."""
    total = 0.0
    for helper in helpers(pid):
        try:
            total += cpu_seconds(helper)
        except OSError:
            continue  # it stopped meanwhile (its CPU is then among the children's)
    return total


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent on anything but idling (or waiting for I/O) so far."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq + steal) / _TICK


def cpu_ns(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
    return total
