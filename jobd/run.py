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
import shutil
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


# Runs a function of a Python file instead of the file as a script (the `function` option).
# argv: FILE NAME ARGS...; the file is imported by path under its own stem (so an
# `if __name__ == "__main__"` block does not run), its directory goes first on sys.path, and the
# function is called with the arguments as strings. Its return value follows the convention of
# `sys.exit(main())`: None is exit 0, an int is the exit status; anything else is printed and
# the exit status is 0. An exception prints its traceback and exits 1.
FUNCTION_RUNNER = """\
import importlib.util, os, sys
path, name, args = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.argv = [path, *args]
sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
stem = os.path.splitext(os.path.basename(path))[0]
spec = importlib.util.spec_from_file_location(stem, path)
module = importlib.util.module_from_spec(spec)
sys.modules[stem] = module
spec.loader.exec_module(module)
target = module
for part in name.split("."):
    try:
        target = getattr(target, part)
    except AttributeError:
        sys.exit(f"jobd: {path} has no function {name}")
result = target(*args)
if result is None or (isinstance(result, int) and not isinstance(result, bool)):
    sys.exit(result)
print(result)
"""


def command_for(workdir: Path, entry: str, args: Sequence[str] = (), *,
                function: str | None = None, path: str | None = None) -> list[str]:
    """The argv that runs `entry`: directly when it has a shebang, else through an interpreter.

    A `run.sh` without the exec bit or without a shebang still runs, with `/bin/sh`, as users of
    the classic jobd expect; other entries without a shebang run with the interpreter of their
    extension (INTERPRETERS; `/bin/sh` for unknown ones), an ELF binary runs directly. Python
    runs unbuffered (`-u`) so live logs show output as it is printed. With `function`, the
    entry (a .py file) is imported and that function called with `args` (FUNCTION_RUNNER).
    With `path` (the job's PATH), a missing interpreter is a StartError that names it.
    """
    file = workdir / entry
    with open(file, "rb") as handle:
        head = handle.read(4)
    if function is not None:
        return [_interpreter("python3", entry, path), "-u", "-c", FUNCTION_RUNNER, entry,
                function, *args]
    if head[:2] == b"#!" or head == b"\x7fELF":
        mode = file.stat().st_mode
        if mode & 0o100 == 0:
            os.chmod(file, mode | 0o111)
        return ["./" + entry, *args]
    if entry == "run.sh":
        return ["/bin/sh", entry, *args]
    interpreter = INTERPRETERS.get(file.suffix.lower(), "/bin/sh")
    argv = [_interpreter(interpreter, entry, path)]
    if interpreter == "python3":
        argv.append("-u")
    return [*argv, entry, *args]


def _interpreter(name: str, entry: str, path: str | None) -> str:
    if path is not None and "/" not in name and shutil.which(name, path=path) is None:
        raise StartError(f"{entry} needs {name}, which is not installed "
                         f"(not found on PATH {path})")
    return name


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
    """A started job process: wait for it, or terminate its whole process group.

    Descendants that left the group (`setsid`, a daemonising double fork) are found by the
    marker in their environment (`JOBD_WORKDIR=<this job's directory>`, unique per daemon and
    job) and signalled with the group, so no process of a job outlives it.
    """

    def __init__(self, popen: subprocess.Popen, exited: asyncio.Future[int],
                 marker: bytes | None = None) -> None:
        self.pid = popen.pid
        self._popen = popen
        self._exited = exited
        self._reason: str | None = None
        self._marker = marker

    async def wait(self) -> Outcome:
        status = await asyncio.shield(self._exited)
        code, signum = exit_status(status)
        # Tell Popen the child is gone, so it never waitpid()s a recycled pid later.
        self._popen.returncode = code if code is not None else -(signum or 0)
        await self._kill_all(signal.SIGKILL)  # leftovers of the job die with it
        return Outcome(code, signum, self._reason)

    @property
    def running(self) -> bool:
        return not self._exited.done()

    async def terminate(self, reason: str, grace: float) -> None:
        """SIGTERM to the process group, SIGKILL after `grace` seconds if still running."""
        if self._reason is None:
            self._reason = reason
        await self._kill_all(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), grace)
        except asyncio.TimeoutError:
            log.info("job process %d ignored SIGTERM for %.1fs: SIGKILL", self.pid, grace)
            await self._kill_all(signal.SIGKILL)

    async def _kill_all(self, signum: int) -> None:
        self._kill_group(signum)
        if self._marker is not None:
            await asyncio.to_thread(kill_marked, self._marker, signum)

    def _kill_group(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            return  # the whole group is already gone
        except PermissionError as exc:
            log.error("cannot signal process group %d: %s", self.pid, exc)


def marked_processes(marker: bytes) -> list[int]:
    """Pids of live processes whose environment holds `marker` (a `NAME=value` entry)."""
    found = []
    own = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == own:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as handle:
                environ = handle.read()
        except OSError:
            continue  # gone meanwhile, a zombie, or another user's process
        if marker in environ.split(b"\0"):
            found.append(int(name))
    return found


def kill_marked(marker: bytes, signum: int, rounds: int = 3) -> int:
    """Signal every process carrying `marker`; repeated, since one may fork meanwhile."""
    total = 0
    for _ in range(rounds):
        pids = marked_processes(marker)
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                continue
            except PermissionError as exc:
                log.error("cannot signal process %d of a job: %s", pid, exc)
        total += len(pids)
        if not pids or signum != signal.SIGKILL:
            break
    if total:
        log.info("signalled %d process(es) that had left the job's process group with %s",
                 total, signal.Signals(signum).name)
    return total


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
        except FileNotFoundError as exc:
            if argv[0].startswith("./"):
                raise StartError(f"could not start {argv[0]}: the interpreter of its #! line "
                                 "was not found") from exc
            raise StartError(f"could not start {argv[0]}: not installed "
                             "(not found on PATH)") from exc
        except OSError as exc:
            raise StartError(f"could not start {argv[0]}: {exc.strerror or exc}") from exc
        finally:
            os.close(log_fd)
        marker = None
        if env.get("JOBD_WORKDIR"):
            marker = f"JOBD_WORKDIR={env['JOBD_WORKDIR']}".encode("utf-8", "surrogateescape")
        return LocalProcess(popen, self._reaper.watch(popen.pid), marker)
