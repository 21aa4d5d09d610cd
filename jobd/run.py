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
the same process. No window. If jobd cannot finish the setup it closes the pipe without writing and
kills the child: the job never runs unconfined. The gate holds a job only when there is
something to apply: rlimits, or cgroup limits. Moving a process into a cgroup takes the kernel's
global cgroup_threadgroup_rwsem for writing, which waits for an RCU grace period (10 to 15 ms
here; CLONE_INTO_CGROUP would avoid it, but Python's subprocess cannot use it), so it runs in a
worker thread, never on the event loop. A job with no limits that runs as jobd's own user (or
as root, when allowed) starts without the gate (one exec less) and joins its cgroup in the
background: a process it forks in those first milliseconds stays outside the cgroup. It is
still in the job's session and carries its marker (below), so it is killed with the job,
unless it deliberately leaves both (`setsid` plus `env -i`); such a process runs as that same
user, which could do more anyway. A job switched to another uid always waits at the gate.

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
import stat
import subprocess
import time
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
    oom_kills: int = 0  # > 0: the kernel's OOM killer ended the job (cgroup memory.events)
    refused_forks: int = 0  # forks refused at the cgroup's pids.max (pids.events)


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


def missing_interpreter(script: Path, env: Mapping[str, str], cwd: Path) -> str | None:
    """The interpreter `script`'s #! line names, when it is surely not there; else None.

    Read as the kernel reads it: the first word after `#!`, ended by a space, a tab, a NUL
    or the newline (a carriage return is part of it), a relative path from the working
    directory `cwd` the job starts in. `env NAME` is followed to NAME on the job's PATH,
    unless `env` gets options or assignments. When in doubt (unreadable, a name only the
    job's user may see), None: the start then says what happened.
    """
    first = _head(script, 256).split(b"\n", 1)[0]  # unreadable: b"", the start reports it
    if not first.startswith(b"#!"):
        return None
    words = [w for w in first[2:].split(b"\0", 1)[0].replace(b"\t", b" ").split(b" ") if w]
    if not words:
        return None
    interpreter = os.fsdecode(words[0])
    if _surely_missing(cwd / interpreter):
        return interpreter
    if os.path.basename(interpreter) != "env" or len(words) < 2:
        return None
    name = os.fsdecode(words[1])
    if name.startswith("-") or "=" in name:
        return None  # env options or assignments: env decides
    if "/" in name:
        return name if _surely_missing(cwd / name) else None
    path = os.pathsep.join(str(cwd / entry) for entry in
                           env.get("PATH", DEFAULT_PATH).split(os.pathsep))
    return name if shutil.which(name, path=path) is None and _none_readable(path) else None


def _head(path: Path, size: int) -> bytes:
    """The first `size` bytes of the regular file `path`; b"" for anything else or when it
    cannot be read. Never blocks or follows a link: it is the job's own file, maybe a link
    to a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        return os.read(fd, size) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
    except OSError:
        return b""
    finally:
        os.close(fd)


def _kind(path: Path) -> str:
    """"ELF" for a binary (its loader is what is missing), else "?" (unknown)."""
    return "ELF" if _head(path, 4) == b"\x7fELF" else "?"


def _surely_missing(path: Path) -> bool:
    """Does `path` not exist (not: cannot be looked at)?"""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False  # there, or not: it cannot be told
    return False


def _none_readable(path: str) -> bool:
    """Can every directory of the search path `path` be listed (so a name not found there
    is surely not there)?"""
    return all(os.access(entry, os.R_OK | os.X_OK) or _surely_missing(Path(entry))
               for entry in path.split(os.pathsep) if entry)


def _interpreter_error(program: str, interpreter: str) -> StartError:
    if interpreter == "ELF":
        return StartError(f"could not start {program}: its ELF interpreter (the dynamic "
                          "loader it was linked for) was not found: built for another system?")
    if interpreter.endswith("\r"):
        return StartError(f"could not start {program}: its #! line ends in a carriage return "
                          f"(Windows line endings), so the interpreter "
                          f"{interpreter.rstrip()!r} + CR was not found")
    return StartError(f"could not start {program}: the interpreter of its #! line "
                      f"({interpreter}) was not found")


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
    """A started job process: wait for it, or terminate all of it.

    Its process group, its cgroup when there is one, and descendants that left the group
    (`setsid`, a daemonising double fork) found by the marker in their environment
    (`JOBD_WORKDIR=<this job's directory>`, unique per daemon and job): no process of a job
    outlives it.
    """

    def __init__(self, popen: subprocess.Popen, exited: asyncio.Future[int],
                 cgroup: JobCgroup | None = None, marker: bytes | None = None,
                 joining: asyncio.Future[bool] | None = None) -> None:
        self.pid = popen.pid
        self.cgroup = cgroup
        self._popen = popen
        self._exited = exited
        self._reason: str | None = None
        self._marker = marker
        self._joining = joining  # the move into the cgroup of a job started without the gate
        self._started = time.monotonic()

    async def wait(self) -> Outcome:
        """Until the job's first process exits; then what is left of the job is killed."""
        status = await asyncio.shield(self._exited)
        code, signum = exit_status(status)
        # Tell Popen the child is gone, so it never waitpid()s a recycled pid later.
        self._popen.returncode = code if code is not None else -(signum or 0)
        if self._joining is not None:
            try:
                joined = await asyncio.shield(self._joining)
            except Exception:  # an unforeseen error in the thread: still clean up below
                log.exception("job process %d: joining its cgroup failed", self.pid)
                joined = True
            if not joined:
                self.cgroup = None  # never made: the job ended first, or mkdir failed
        cgroup, self.cgroup = self.cgroup, None  # the group and the marker first, then it
        await self._kill_all(signal.SIGKILL)  # leftovers of the job die with it
        oom_kills = refused = 0
        if cgroup is not None:  # one hop for all of it, off the loop (see CgroupTree.plan)
            oom_kills, refused, removed = await asyncio.to_thread(cgroup.end)
            if not removed:
                await cgroup.remove()
        return Outcome(code, signum, self._reason, oom_kills, refused)

    @property
    def running(self) -> bool:
        return not self._exited.done()

    async def terminate(self, reason: str, grace: float) -> None:
        """SIGTERM to the whole job, SIGKILL after `grace` seconds if still running."""
        if self._reason is None:
            self._reason = reason
        await self._kill_all(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), grace)
        except asyncio.TimeoutError:
            log.info("job process %d ignored SIGTERM for %.1fs: SIGKILL", self.pid, grace)
            await self._kill_all(signal.SIGKILL)

    async def _kill_all(self, signum: int) -> None:
        self._kill(signum)
        if self._marker is None:
            return
        if time.monotonic() - self._started < _SHORT_JOB:  # few pids to look at: no thread hop
            kill_marked(self._marker, signum, since=self.pid)
        else:
            await asyncio.to_thread(kill_marked, self._marker, signum)

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


def _pid_max() -> int:
    try:
        with open("/proc/sys/kernel/pid_max", "rb") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return 4_194_304  # the kernel's ceiling; only makes the window test looser


_PID_MAX = _pid_max()
# A job younger than this has its leftovers looked for among the pids allocated since it
# started (`created_since`), not in all of /proc: the time in which the pid counter cannot go
# round, even at 100,000 forks a second (0.33 s where pid_max is 32768).
_SHORT_JOB = min(1.0, _PID_MAX / 100_000)
# Up to this many pids allocated since a job started are looked up one by one.
_PROBE_SPAN = 64


def _last_pid() -> int | None:
    """The pid the kernel allocated last (the last field of /proc/loadavg)."""
    try:
        with open("/proc/loadavg", "rb") as handle:
            return int(handle.read().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def created_since(first: int, proc: str = "/proc") -> list[int] | None:
    """Pids allocated from `first` on (a few may have ended since); None when unknown.

    The kernel hands out pids cyclically up to pid_max, so the processes a job started
    since its first process `first` are those in the cyclic range from `first` to the pid
    allocated last. Only valid while the counter cannot have gone round since then, which
    `_SHORT_JOB` ensures (no machine forks pid_max processes in that time).
    """
    last = _last_pid()
    if last is None:
        return None
    span = (last - first) % _PID_MAX
    if span < _PROBE_SPAN:  # the usual short job: those few pids, not a listing of /proc
        # (thread ids among them too, which /proc answers for: harmless, since a signal
        # sent to a thread's id reaches its whole process)
        return [(first + k) % _PID_MAX for k in range(span + 1)]
    return [pid for pid in map(int, filter(str.isdigit, os.listdir(proc)))
            if (pid - first) % _PID_MAX <= span]


def marked_processes(marker: bytes, since: int | None = None) -> list[int]:
    """Pids of live processes whose environment holds `marker` (a `NAME=value` entry).

    With `since` (a pid), only processes created after it are read (`created_since`).
    """
    found = []
    own = os.getpid()
    pids = created_since(since) if since is not None else None
    if pids is None:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    for pid in pids:
        if pid == own:
            continue
        name = str(pid)
        try:
            with open(f"/proc/{name}/environ", "rb") as handle:
                environ = handle.read()
        except OSError:
            continue  # gone meanwhile, a zombie, or another user's process
        if marker in environ.split(b"\0"):
            found.append(int(name))
    return found


def kill_marked(marker: bytes, signum: int, rounds: int = 3, since: int | None = None) -> int:
    """Signal every process carrying `marker`; repeated, since one may fork meanwhile.
    `since`: see `marked_processes`."""
    total = 0
    for _ in range(rounds):
        pids = marked_processes(marker, since)
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
        self._prlimit_others = can_prlimit_others()

    async def start(self, argv: Sequence[str], *, cwd: Path, log_path: Path,
                    env: Mapping[str, str], identity: Identity | None = None,
                    limits: Limits | None = None, cgroup: JobCgroup | None = None
                    ) -> LocalProcess:
        """Start `argv` in a new session, as `identity`, within `limits` and `cgroup`, with
        stdout and stderr appended to `log_path` (see the start gate above)."""
        check_program(argv, env, cwd)
        switching = identity is not None and identity.uid != os.geteuid()
        preexec = None
        if limits is not None and not limits.rlimits():
            limits = None
        if limits is not None and switching and not self._prlimit_others:
            preexec = limits.in_child()
            limits = None  # the child sets them itself
        # Confined before it runs: when there are limits, and when it runs as another user,
        # whose escaped process would outlive the job as a uid later given to another job.
        gated = limits is not None or (cgroup is not None and (cgroup.limited or switching))
        if gated and argv[0].startswith("./"):  # the gate's exec would only exit 127
            interpreter = missing_interpreter(cwd / argv[0], env, cwd)
            if interpreter is not None:
                raise _interpreter_error(argv[0], interpreter)
        command = [GATE_SHELL, "-c", GATE, "jobd-gate", *argv] if gated else list(argv)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            popen = subprocess.Popen(
                command, cwd=cwd, env=dict(env),
                stdin=subprocess.PIPE if gated else subprocess.DEVNULL, stdout=log_fd,
                stderr=log_fd, start_new_session=True, close_fds=True,
                preexec_fn=preexec,  # noqa: PLW1509 - the one exception above
                **(identity.popen_args() if identity else {}),
            )
        except FileNotFoundError as exc:
            if argv[0].startswith("./"):
                interpreter = (missing_interpreter(cwd / argv[0], env, cwd)
                               or _kind(cwd / argv[0]))
                raise _interpreter_error(argv[0], interpreter) from exc
            raise StartError(f"could not start {argv[0]}: not installed "
                             "(not found on PATH)") from exc
        except (OSError, subprocess.SubprocessError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise StartError(f"could not start {argv[0]}: {detail}") from exc
        finally:
            os.close(log_fd)
        exited = self._reaper.watch(popen.pid)
        joining = None
        if gated:
            if not await _open_gate(popen, argv[0], limits, cgroup):
                cgroup = None
        elif cgroup is not None:
            joining = asyncio.ensure_future(asyncio.to_thread(_join, cgroup, popen.pid, exited))
        marker = None
        if env.get("JOBD_WORKDIR"):
            marker = f"JOBD_WORKDIR={env['JOBD_WORKDIR']}".encode("utf-8", "surrogateescape")
        return LocalProcess(popen, exited, cgroup, marker, joining)


async def _open_gate(popen: subprocess.Popen, program: str, limits: Limits | None,
                     cgroup: JobCgroup | None) -> bool:
    """Confine the gated child, then let it exec the job; on any failure it never runs.
    Whether it is in `cgroup` (False: none, or it could not be made and the job runs
    without, as the log says)."""
    assert popen.stdin is not None
    joined = False
    try:
        if cgroup is not None:
            joined = await asyncio.to_thread(_make_and_add, cgroup, popen.pid)
        if limits is not None:
            limits.apply(popen.pid)
        popen.stdin.write(b"go\n")
        popen.stdin.close()
    except (OSError, CgroupError) as exc:
        _abort(popen)
        raise StartError(f"could not confine {program}: {exc}") from exc
    except BaseException:  # cancelled meanwhile: the job must not run unconfined either
        _abort(popen)
        raise
    return joined


def _make_and_add(cgroup: JobCgroup, pid: int) -> bool:
    """Make the cgroup and move the gated `pid` in (worker thread). False when the cgroup
    cannot be made: the job then runs without it, and so without its cgroup limits, as the
    error in the log says (a delegated cgroup that stops working must not stop every job).
    A failed move raises: the cgroup exists, so the job must not run outside it."""
    try:
        cgroup.make()
    except CgroupError as exc:
        log.error("%s runs without a cgroup: %s", cgroup.path.name, exc)
        return False
    cgroup.add(pid)
    return True


def _join(cgroup: JobCgroup, pid: int, exited: asyncio.Future[int]) -> bool:
    """Make the cgroup of a job started without the gate and move it in (in a worker
    thread). Whether the cgroup exists: a job that ended first gets none (its process group
    and marker find what it left), which spares short jobs the cgroup's cost.

    The pid cannot belong to another process yet: pids are allocated cyclically up to
    pid_max, and the job's exit is checked first.
    """
    if exited.done():
        return False
    try:
        cgroup.make()
    except CgroupError as exc:
        log.error("%s runs without a cgroup: %s", cgroup.path.name, exc)
        return False
    if exited.done():  # making it may have waited: the pid must still be the job's
        return True
    try:
        cgroup.add(pid)
    except (OSError, CgroupError) as exc:
        if not (isinstance(exc, ProcessLookupError) or exited.done()):  # not: it ended
            log.warning("job process %d runs outside its cgroup %s: %s", pid, cgroup.path, exc)
    return True


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


def leftover_processes(workdirs_under: Path, proc: Path = Path("/proc"),
                       only: set[str] | None = None) -> list[int]:
    """Processes started by jobs under `workdirs_under` (their JOBD_WORKDIR says so).

    After a crash of jobd alone (not of the whole container), jobs it started may still run;
    they must die before their jobs are requeued, or a job would run twice at once. A process
    that replaced its whole environment is not found this way (a cgroup finds it). `only`
    limits the search to those job ids (Slurm jobs on this node are not ours to kill).
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
            for item in environ.split(b"\0"):
                if item.startswith(marker):
                    job_id = item[len(marker):].split(b"/", 1)[0].decode(errors="replace")
                    if only is None or job_id in only:
                        found.append(int(entry.name))
                    break
    return found
