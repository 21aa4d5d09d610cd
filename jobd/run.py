"""The local executor: runs a job's entry point as a child process of the daemon.

Each job runs in its own session (process group), so cancel and timeout reach every descendant
with one `killpg`. stdout and stderr go straight to the job's log file (no pipe through the
daemon, so output costs jobd nothing). Exits are collected by the `Reaper`.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from jobd.reaper import Reaper, exit_status

log = logging.getLogger("jobd.run")

# What every job gets from the daemon's environment, whatever JOBD_PASS_ENV says.
MINIMAL_ENV = ("PATH", "LANG", "LC_ALL", "TZ")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Interpreters for entry points without a shebang, by extension.
INTERPRETERS = {".py": "python3", ".sh": "bash", ".r": "Rscript", ".js": "node"}


class StartError(RuntimeError):
    """The entry point could not be started (missing interpreter, not executable, ...)."""


@dataclass
class Outcome:
    """How a job's process ended, and why if jobd ended it."""

    exit_code: int | None
    signal: int | None
    reason: str | None = None  # "cancelled", "timed out after 10s", ...


def command_for(workdir: Path, entry: str, args: Sequence[str] = ()) -> list[str]:
    """The argv that runs `entry`: directly when it has a shebang, else through an interpreter.

    A `run.sh` without the exec bit or without a shebang still runs, with `/bin/sh`, as users of
    the classic jobd expect.
    """
    path = workdir / entry
    with open(path, "rb") as handle:
        head = handle.read(2)
    if head == b"#!":
        mode = path.stat().st_mode
        if mode & 0o100 == 0:
            os.chmod(path, mode | 0o111)
        return ["./" + entry, *args]
    suffix = path.suffix.lower()
    interpreter = INTERPRETERS.get(suffix, "/bin/sh")
    if entry == "run.sh":
        interpreter = "/bin/sh"
    return [interpreter, entry, *args]


def job_environment(daemon_env: Mapping[str, str], pass_patterns: Sequence[str],
                    extra: Mapping[str, str]) -> dict[str, str]:
    """A clean environment: the minimal set, the allowlisted daemon variables, then `extra`."""
    env: dict[str, str] = {}
    for name, value in daemon_env.items():
        if name in MINIMAL_ENV or any(fnmatch.fnmatchcase(name, p) for p in pass_patterns):
            env[name] = value
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("LANG", "C.UTF-8")
    env.update(extra)
    return env


class LocalProcess:
    """A started job process: wait for it, or terminate its whole process group."""

    def __init__(self, popen: subprocess.Popen, exited: asyncio.Future[int]) -> None:
        self.pid = popen.pid
        self._popen = popen
        self._exited = exited
        self._reason: str | None = None

    async def wait(self) -> Outcome:
        status = await asyncio.shield(self._exited)
        code, signum = exit_status(status)
        # Tell Popen the child is gone, so it never waitpid()s a recycled pid later.
        self._popen.returncode = code if code is not None else -(signum or 0)
        self._kill_group(signal.SIGKILL)  # leftovers of the session die with the job
        return Outcome(code, signum, self._reason)

    @property
    def running(self) -> bool:
        return not self._exited.done()

    async def terminate(self, reason: str, grace: float) -> None:
        """SIGTERM to the process group, SIGKILL after `grace` seconds if still running."""
        if self._reason is None:
            self._reason = reason
        self._kill_group(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), grace)
        except asyncio.TimeoutError:
            log.info("job process %d ignored SIGTERM for %.1fs: SIGKILL", self.pid, grace)
            self._kill_group(signal.SIGKILL)

    def _kill_group(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            return  # the whole group is already gone
        except PermissionError as exc:
            log.error("cannot signal process group %d: %s", self.pid, exc)


class LocalExecutor:
    """Starts jobs on this machine."""

    name = "local"

    def __init__(self, reaper: Reaper) -> None:
        self._reaper = reaper

    def start(self, argv: Sequence[str], *, cwd: Path, log_path: Path,
              env: Mapping[str, str]) -> LocalProcess:
        """Start `argv` in a new session with stdout and stderr appended to `log_path`."""
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            popen = subprocess.Popen(
                list(argv), cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL,
                stdout=log_fd, stderr=log_fd, start_new_session=True, close_fds=True,
            )
        except OSError as exc:
            raise StartError(f"could not start {argv[0]}: {exc.strerror or exc}") from exc
        finally:
            os.close(log_fd)
        return LocalProcess(popen, self._reaper.watch(popen.pid))
