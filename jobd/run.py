"""The local executor: runs a job's entry point as a child process of the daemon.

Each job runs in its own session (process group), so cancel and timeout reach every descendant
with one `killpg`; with a cgroup (`cgroup.py`) they also reach descendants that left the
session. stdout and stderr go straight to the job's log file (no pipe through the daemon, so
output costs jobd nothing). Exits are collected by the `Reaper`.

The start gate. A job's limits and cgroup must be in place before its first instruction, or a
process it forks at once escapes them. The usual tool, `Popen(preexec_fn=...)`, runs Python in
the child between fork and exec, which is hazardous in a threaded process (jobd's `to_thread`
workers may hold a lock the child then needs: it deadlocks). `prlimit` and a cgroup.procs write
from the parent right after spawn are safe but racy: the job may fork first. So the child is
spawned as `/bin/sh -c 'read _ || exit 111; exec "$@" </dev/null' <argv>`: what happens in the
child before that is C code in `_posixsubprocess` (new session, setgroups, setgid, setuid,
chdir); the shell waits on its stdin pipe while the parent moves it into the job's cgroup and
sets its rlimits with `prlimit`; then the parent writes one line and the shell execs the job in
the same process. No window, ~1 ms. If jobd cannot finish the setup it closes the pipe without
writing and kills the child: the job never runs unconfined.

One exception: the kernel lets `prlimit` reach a process of another uid only with
CAP_SYS_RESOURCE, which Docker drops by default. A job switched to another uid by a jobd without
it gets its rlimits from a `preexec_fn` that calls `setrlimit` and nothing else (no import, no
lock, no I/O: nothing another thread can hold at fork time).
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from jobd.cgroup import CgroupError, JobCgroup
from jobd.reaper import Reaper, exit_status
from jobd.resources import Limits
from jobd.users import Identity

log = logging.getLogger("jobd.run")

# What every job gets from the daemon's environment, whatever JOBD_PASS_ENV says.
MINIMAL_ENV = ("PATH", "LANG", "LC_ALL", "TZ")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

GATE_SHELL = "/bin/sh"
_CAP_SYS_RESOURCE = 24
# The shell adds PWD (and OLDPWD) to what it passes on; the job's environment stays as given.
GATE = 'unset PWD OLDPWD; read _ || exit 111; exec "$@" </dev/null'

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
    oom_kills: int = 0  # processes the kernel's OOM killer ended (cgroup memory.events)


def command_for(workdir: Path, entry: str, args: Sequence[str] = ()) -> list[str]:
    """The argv that runs `entry`: directly when it has a shebang, else through an interpreter.

    A `run.sh` without the exec bit or without a shebang still runs, with `/bin/sh`, as users of
    the classic jobd expect.
    """
    path = workdir / entry
    with open(path, "rb") as handle:
        head = handle.readline(256)
    if head.startswith(b"#!"):
        words = head[2:].split()
        interpreter = words[0].decode(errors="replace") if words else ""
        if interpreter.startswith("/") and not os.path.exists(interpreter):
            raise StartError(f"{entry} names the interpreter {interpreter}, which does not exist")
        mode = path.stat().st_mode
        if mode & 0o100 == 0:
            os.chmod(path, mode | 0o111)
        return ["./" + entry, *args]
    suffix = path.suffix.lower()
    interpreter = INTERPRETERS.get(suffix, "/bin/sh")
    if entry == "run.sh":
        interpreter = "/bin/sh"
    return [interpreter, entry, *args]


def check_program(argv: Sequence[str], env: Mapping[str, str], cwd: Path) -> None:
    """StartError when the program of `argv` is nowhere (not in cwd, not on the job's PATH).

    The gate shell would notice too, but then a missing interpreter would be an exit status
    127 in the log rather than a clear "could not start" message. The shell still does the
    search itself, as the job's user: what root finds may not be executable by that user.
    """
    program = argv[0]
    if "/" in program:
        if not (cwd / program).exists():
            raise StartError(f"could not start {program}: no such file")
    elif shutil.which(program, path=env.get("PATH", DEFAULT_PATH)) is None:
        raise StartError(f"could not start {program}: not found on PATH")


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
    """A started job process: wait for it, or terminate all of it."""

    def __init__(self, popen: subprocess.Popen, exited: asyncio.Future[int],
                 cgroup: JobCgroup | None = None) -> None:
        self.pid = popen.pid
        self.cgroup = cgroup
        self._popen = popen
        self._exited = exited
        self._reason: str | None = None

    async def wait(self) -> Outcome:
        """Until the job's first process exits; then what is left of the job is killed."""
        status = await asyncio.shield(self._exited)
        code, signum = exit_status(status)
        # Tell Popen the child is gone, so it never waitpid()s a recycled pid later.
        self._popen.returncode = code if code is not None else -(signum or 0)
        self._kill(signal.SIGKILL)  # leftovers of the job die with it
        oom_kills = 0
        if self.cgroup is not None:
            oom_kills = self.cgroup.oom_kills()
            await self.cgroup.remove()
        return Outcome(code, signum, self._reason, oom_kills)

    @property
    def running(self) -> bool:
        return not self._exited.done()

    async def terminate(self, reason: str, grace: float) -> None:
        """SIGTERM to the whole job, SIGKILL after `grace` seconds if still running."""
        if self._reason is None:
            self._reason = reason
        self._kill(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), grace)
        except asyncio.TimeoutError:
            log.info("job process %d ignored SIGTERM for %.1fs: SIGKILL", self.pid, grace)
            self._kill(signal.SIGKILL)

    def _kill(self, signum: int) -> None:
        """The process group, and with a cgroup every process of the job wherever it went."""
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass  # the group is gone; the cgroup may still hold escaped descendants
        except PermissionError as exc:
            log.error("cannot signal process group %d: %s", self.pid, exc)
        if self.cgroup is not None:
            try:
                self.cgroup.signal(signum)
            except OSError as exc:
                log.error("cannot signal cgroup %s: %s", self.cgroup.path, exc)


def can_prlimit_others(status: Path = Path("/proc/self/status")) -> bool:
    """Does jobd hold CAP_SYS_RESOURCE (needed to prlimit a process of another uid)?"""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_SYS_RESOURCE & 1)
    except (OSError, ValueError, IndexError) as exc:
        log.warning("cannot read the capabilities of jobd: %s", exc)
    return False


class LocalExecutor:
    """Starts jobs on this machine."""

    name = "local"

    def __init__(self, reaper: Reaper) -> None:
        self._reaper = reaper
        self._prlimit_others = can_prlimit_others()

    def start(self, argv: Sequence[str], *, cwd: Path, log_path: Path,
              env: Mapping[str, str], identity: Identity | None = None,
              limits: Limits | None = None, cgroup: JobCgroup | None = None) -> LocalProcess:
        """Start `argv` in a new session, as `identity`, within `limits` and `cgroup`, with
        stdout and stderr appended to `log_path` (see the start gate above)."""
        check_program(argv, env, cwd)
        switching = identity is not None and identity.uid != os.geteuid()
        preexec = None
        if limits is not None and switching and not self._prlimit_others:
            preexec = limits.in_child()
            limits = None  # the child sets them itself
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            popen = subprocess.Popen(
                [GATE_SHELL, "-c", GATE, "jobd-gate", *argv], cwd=cwd, env=dict(env),
                stdin=subprocess.PIPE, stdout=log_fd, stderr=log_fd, start_new_session=True,
                close_fds=True, preexec_fn=preexec,  # noqa: PLW1509 - the one exception above
                **(identity.popen_args() if identity else {}),
            )
        except (OSError, subprocess.SubprocessError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise StartError(f"could not start {argv[0]}: {detail}") from exc
        finally:
            os.close(log_fd)
        exited = self._reaper.watch(popen.pid)
        assert popen.stdin is not None
        try:
            if cgroup is not None:
                cgroup.add(popen.pid)
            if limits is not None:
                limits.apply(popen.pid)
            popen.stdin.write(b"go\n")
            popen.stdin.close()
        except (OSError, CgroupError) as exc:
            _abort(popen)
            raise StartError(f"could not confine {argv[0]}: {exc}") from exc
        return LocalProcess(popen, exited, cgroup)


def _abort(popen: subprocess.Popen) -> None:
    """The gate never opens: the child exits 111 at EOF, and is killed to be sure."""
    assert popen.stdin is not None
    try:
        popen.stdin.close()
    except OSError as exc:
        log.debug("closing the gate of %d: %s", popen.pid, exc)
    try:
        os.kill(popen.pid, signal.SIGKILL)
    except ProcessLookupError:
        return


def leftover_processes(workdirs_under: Path, proc: Path = Path("/proc")) -> list[int]:
    """Processes started by jobs under `workdirs_under` (their JOBD_WORKDIR says so).

    After a crash of jobd alone (not of the whole container), jobs it started may still run;
    they must die before their jobs are requeued, or a job would run twice at once. A process
    that replaced its whole environment is not found this way (a cgroup finds it).
    """
    marker = f"JOBD_WORKDIR={workdirs_under.resolve()}/".encode()
    found = []
    me = os.getpid()
    with os.scandir(proc) as entries:
        for entry in entries:
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                with open(os.path.join(entry.path, "environ"), "rb") as handle:
                    environ = handle.read()
            except OSError:
                continue  # exited, a kernel thread, or not ours to read
            if any(item.startswith(marker) for item in environ.split(b"\0")):
                found.append(int(entry.name))
    return found
