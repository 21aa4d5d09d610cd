"""The Slurm executor: jobs handed to a Slurm cluster with sbatch, followed with one squeue.

What it does, and why it is shaped so:

- **Shared storage.** A job's directory (`DATAPATH/<id>`) is where sbatch is told to run it
  (`--chdir work/`) and to write its output (`--output log`), and where jobd packs the result, so
  DATAPATH must be the same path on the compute nodes. jobd cannot prove that without submitting
  a probe job, so at start it checks what it can see locally (`shared_storage_problems`): a
  relative DATAPATH, one under a node-local directory (/tmp, /var/tmp, /dev/shm, /run), or one on
  tmpfs, ramfs or overlay (a container's own filesystem) cannot be shared. JOBD_SLURM_SHARED_CHECK
  makes that a failure (default), a warning (a single-node cluster) or nothing.
- **Submission.** No shell anywhere: sbatch gets an argument list and a generated batch script
  (`DATAPATH/<id>/slurm.sh`) that execs the entry point exactly as the local executor would
  (`run.command_for`). The job's clean environment is sbatch's own environment, exported with
  `--export=ALL`, so the job sees what a local job sees plus Slurm's `SLURM_*` variables.
  Per-deployment options (partition, account, QoS, extra options) come from the configuration,
  per-job resources (CPUs, memory, GPUs, time limit from the timeout) from the job's options;
  every value is checked against a strict pattern.
- **Never twice.** Each submission gets a token, written to `DATAPATH/<id>/slurm.token` before
  sbatch runs and passed as the Slurm job's comment. The Slurm job id is stored in the record
  before the job is reported submitted; if jobd dies between sbatch and that write, the next
  start finds the submission by its comment instead of submitting again. The batch script only
  runs the job if its token is still the current one, so even a submission that got through
  after jobd gave up on it cannot run the job a second time.
- **Tracking.** One `squeue --jobs=<all active> --states=all` per JOBD_SLURM_POLL_INTERVAL gives
  the state of every job and, for finished ones still in slurmctld's memory (MinJobAge), the raw
  exit status. Jobs slurmctld has forgotten are asked of `sacct` in one call when accounting
  exists. `scontrol show job` is the fallback for a finished job whose exit status squeue did
  not give.
- **An unreachable controller** leaves jobs as they are: the poll backs off (up to a minute),
  every active job's message says why, and only JOBD_SLURM_UNREACHABLE_DEADLINE without an
  answer marks them FAILED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import shlex
import shutil
import time
import uuid
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from jobd.command import CommandResult, CommandTimeout, run_command
from jobd.config import Config, parse_size
from jobd.files import JobFiles
from jobd.reaper import Reaper
from jobd.run import Outcome

log = logging.getLogger("jobd.slurm")

T = TypeVar("T")

COMMANDS = ("sbatch", "squeue", "scancel")
SCRIPT = "slurm.sh"
TOKEN = "slurm.token"
COMMENT_PREFIX = "jobd:"

# Slurm job states, by what they mean for jobd.
PENDING_STATES = frozenset({"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                            "RESV_DEL_HOLD"})
ACTIVE_STATES = frozenset({"RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING",
                           "STAGE_OUT", "RESIZING"})
# Terminal states, with the reason jobd gives when Slurm (not the job itself) ended the job.
TERMINAL_STATES: dict[str, str | None] = {
    "COMPLETED": None,
    "FAILED": None,
    "CANCELLED": "cancelled",
    "TIMEOUT": "the Slurm time limit was reached",
    "NODE_FAIL": "its Slurm node failed",
    "PREEMPTED": "Slurm preempted it",
    "BOOT_FAIL": "its Slurm node failed to boot",
    "DEADLINE": "the Slurm deadline passed",
    "OUT_OF_MEMORY": "it ran out of memory (Slurm)",
    "REVOKED": "Slurm revoked it",
    "SPECIAL_EXIT": "Slurm ended it with a special exit",
}

# Errors that mean "ask again later", not "this job is wrong".
_UNREACHABLE = ("unable to contact slurm controller", "connection refused",
                "socket timed out", "communication connection failure",
                "zero bytes were transmitted", "connection timed out",
                "unable to establish secure connection", "munge", "authentication",
                "slurmctld not responding", "transport endpoint is not connected")

# sbatch options jobd sets itself: a deployment's JOBD_SLURM_EXTRA may not change them.
OWNED_OPTIONS = frozenset({"--output", "-o", "--error", "-e", "--input", "-i", "--chdir", "-D",
                           "--job-name", "-J", "--parsable", "--export", "--export-file",
                           "--wrap", "--array", "-a", "--open-mode", "--comment", "--wait",
                           "-W", "--test-only", "--uid", "--gid", "--get-user-env"})

_SQUEUE_FIELDS = "JobID:|,State:|,exit_code:|,StartTime:|,NodeList:|,Reason:|"
_SQUEUE_CHUNK = 1000  # job ids per squeue call (keeps one argument far below the kernel's limit)
_MAX_BACKOFF = 60.0
_SUBMIT_CONCURRENCY = 4
_NODE_LOCAL_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run")
_NODE_LOCAL_FS = frozenset({"tmpfs", "ramfs", "overlay", "devtmpfs", "squashfs", "aufs"})

_GPU_TYPED = re.compile(r"[A-Za-z0-9_-]{1,32}:[0-9]{1,4}")
_MEMORY = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,3})?\s*(?:[KMGTkmgt](?:i?[Bb])?|[Bb])?")


class SlurmError(RuntimeError):
    """Slurm refused something for good (a bad partition, an invalid option): no retry helps."""


class SlurmUnavailable(RuntimeError):
    """The controller could not be asked (down, timing out, munge failing): try again later."""


class SlurmGaveUp(RuntimeError):
    """The controller stayed unreachable past JOBD_SLURM_UNREACHABLE_DEADLINE."""


class SlurmSetupError(RuntimeError):
    """The Slurm executor cannot work here; the message says why and what to change."""


class OptionError(ValueError):
    """A job option that cannot be handed to sbatch safely; the message names it."""


# -- pure helpers ---------------------------------------------------------------------------


def decode_status(raw: int) -> tuple[int | None, int | None]:
    """(exit code, signal) from the raw wait status squeue prints as `exit_code`."""
    signum = raw & 0x7F
    if signum:
        return None, signum
    return (raw >> 8) & 0xFF, None


def parse_exit_pair(text: str) -> tuple[int | None, int | None] | None:
    """(exit code, signal) from Slurm's `ExitCode` "code:signal" (sacct, scontrol)."""
    match = re.fullmatch(r"\s*(\d+):(\d+)\s*", text)
    if not match:
        return None
    code, signum = int(match.group(1)), int(match.group(2))
    if signum:
        return None, signum
    return code, None


def outcome_for(state: str, exit_code: int | None, signum: int | None,
                requested: str | None) -> Outcome:
    """The Outcome of a job Slurm says has ended.

    `requested` is jobd's own reason (cancelled, timed out), which wins as it does for local
    jobs. A state other than COMPLETED never reads as success, whatever the exit code says.
    """
    reason = requested
    if reason is None:
        reason = TERMINAL_STATES.get(state, f"Slurm reports {state}")
        if reason is None and state != "COMPLETED" and exit_code == 0 and signum is None:
            reason = f"Slurm reports {state}"
    return Outcome(exit_code, signum, reason)


def base_state(text: str) -> str:
    """`CANCELLED by 0` (sacct) and `CANCELLED+` read as `CANCELLED`."""
    word = text.strip().split(" ", 1)[0]
    return word.rstrip("+").upper()


@dataclass
class QueueRow:
    """One job as squeue shows it."""

    slurm_id: int
    state: str
    exit_code: int | None
    signal: int | None
    exit_known: bool
    start: float | None  # epoch seconds; only meaningful once the job has started
    nodes: str
    reason: str


def parse_squeue(text: str) -> dict[int, QueueRow]:
    """Rows of `squeue --noheader --Format=<_SQUEUE_FIELDS>`; other lines are skipped."""
    rows: dict[int, QueueRow] = {}
    for line in text.splitlines():
        parts = line.rstrip().rstrip("|").split("|", 5)
        if len(parts) != 6 or not parts[0].strip().isdigit():
            if line.strip():
                log.debug("squeue: skipping %r", line)
            continue
        job_text, state, raw, start, nodes, reason = (p.strip() for p in parts)
        code: int | None = None
        signum: int | None = None
        known = raw.isdigit()
        if known:
            code, signum = decode_status(int(raw))
        rows[int(job_text)] = QueueRow(int(job_text), base_state(state), code, signum, known,
                                       parse_time(start), nodes, reason)
    return rows


def parse_time(text: str) -> float | None:
    """Epoch seconds from Slurm's default time format (local time), or None (`N/A`, `Unknown`)."""
    try:
        return time.mktime(time.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def parse_sacct(text: str) -> dict[int, tuple[str, int | None, int | None]]:
    """`sacct --parsable2 --noheader --format=JobIDRaw,State,ExitCode` -> id: (state, code, sig)."""
    found: dict[int, tuple[str, int | None, int | None]] = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 3 or not parts[0].isdigit():
            continue  # steps (123.batch) and blank lines
        pair = parse_exit_pair(parts[2]) or (None, None)
        found[int(parts[0])] = (base_state(parts[1]), pair[0], pair[1])
    return found


def parse_scontrol(text: str) -> tuple[str, int | None, int | None] | None:
    """(state, code, signal) from `scontrol -o show job <id>`."""
    state = re.search(r"(?:^|\s)JobState=(\S+)", text)
    exit_pair = re.search(r"(?:^|\s)ExitCode=(\S+)", text)
    if not state:
        return None
    pair = parse_exit_pair(exit_pair.group(1)) if exit_pair else None
    code, signum = pair if pair else (None, None)
    return base_state(state.group(1)), code, signum


def parse_job_id(stdout: str) -> int:
    """The job id `sbatch --parsable` prints (`123` or `123;cluster`)."""
    first = stdout.strip().splitlines()[0] if stdout.strip() else ""
    head = first.split(";", 1)[0].strip()
    if not head.isdigit():
        raise SlurmError(f"sbatch printed no job id: {stdout.strip()[:200]!r}")
    return int(head)


def is_unreachable(stderr: str) -> bool:
    text = stderr.lower()
    return any(marker in text for marker in _UNREACHABLE)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def time_limit_minutes(timeout: float) -> int:
    """Slurm counts time limits in whole minutes. jobd enforces the exact timeout itself, so
    Slurm's limit is the next minute up plus one: a backstop for while jobd is down, late
    enough that jobd's own timeout (with its message) normally comes first."""
    return math.ceil(timeout / 60.0) + 1


def _whole(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise OptionError(f"{name} must be a whole number from {low} to {high}")
    text = str(value).strip()
    if not text.isdigit() or not low <= int(text) <= high:
        raise OptionError(f"{name} must be a whole number from {low} to {high}")
    return int(text)


def resource_options(options: Mapping[str, Any], default_timeout: float) -> list[str]:
    """sbatch options for a job's own resources: cpus, memory, gpus, and its timeout.

    Values are checked strictly (whole numbers, sizes such as `4G`, GPU counts or `type:count`),
    so nothing a client sends can become another sbatch option.
    """
    args: list[str] = []
    if options.get("cpus") is not None:
        args.append(f"--cpus-per-task={_whole(options['cpus'], 'cpus', 1, 100_000)}")
    memory = options.get("memory")
    if memory is not None:
        if isinstance(memory, bool):
            raise OptionError("memory must be a size such as 512M or 4G")
        if isinstance(memory, int):
            size = memory
        elif isinstance(memory, str) and _MEMORY.fullmatch(memory.strip()):
            size = parse_size(memory.strip())
        else:
            raise OptionError("memory must be a size such as 512M or 4G")
        if not (1 << 20) <= size <= (1 << 50):
            raise OptionError("memory must be between 1M and 1P")
        args.append(f"--mem={math.ceil(size / (1 << 20))}M")
    gpus = options.get("gpus")
    if gpus is not None:
        if isinstance(gpus, str) and _GPU_TYPED.fullmatch(gpus.strip()):
            args.append(f"--gpus={gpus.strip()}")
        else:
            try:
                args.append(f"--gpus={_whole(gpus, 'gpus', 1, 1024)}")
            except OptionError:
                raise OptionError("gpus must be a count from 1 to 1024 or type:count "
                                  "(a100:2)") from None
    timeout = options.get("timeout")
    if timeout is None:
        timeout = default_timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0 \
            or not math.isfinite(timeout):
        raise OptionError("timeout must be a number of seconds")
    if timeout > 0:
        args.append(f"--time={time_limit_minutes(float(timeout))}")
    return args


def check_extra_options(extra: Sequence[str]) -> None:
    """JOBD_SLURM_EXTRA may add options, never replace the ones jobd depends on.

    Values must be attached (`--constraint=avx2`, `-pdebug`), so every word is an option.
    """
    for word in extra:
        name = word.split("=", 1)[0]
        short = not name.startswith("--")
        if (f"-{name[1:2]}" if short else name) in OWNED_OPTIONS:
            raise SlurmSetupError(f"JOBD_SLURM_EXTRA: {word} changes an option jobd sets "
                                  "itself")


def batch_script(job_id: str, token: str, token_path: Path, workdir: Path,
                 argv: Sequence[str]) -> str:
    """The script sbatch runs: check it is the current submission, then exec the entry point."""
    quoted = " ".join(shlex.quote(a) for a in argv)
    return (
        "#!/bin/sh\n"
        f"# jobd job {job_id}: written by jobd, run by Slurm on a compute node.\n"
        "# A submission that is no longer the job's current one (token) runs nothing.\n"
        f"if [ \"$(cat {shlex.quote(str(token_path))} 2>/dev/null)\" != {shlex.quote(token)} ]; "
        "then\n"
        "    exit 0\n"
        "fi\n"
        f"cd {shlex.quote(str(workdir))} || exit 1\n"
        f"exec {quoted}\n"
    )


def mount_of(path: Path, mountinfo: str) -> tuple[str, str]:
    """(mount point, filesystem type) holding `path`, from /proc/self/mountinfo text."""
    best = ("/", "unknown")
    target = str(path)
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        fstype = right.split()[0] if right.split() else "unknown"
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, fstype)
    return best


def shared_storage_problems(configured: Path, mountinfo: str) -> list[str]:
    """Why DATAPATH cannot be on storage the compute nodes share, as far as this machine can tell.

    Checked: the configured path is absolute (compute nodes do not share jobd's working
    directory); it is not under a directory that is node-local by convention (/tmp, /var/tmp,
    /dev/shm, /run); its filesystem is not one that only exists on this machine (tmpfs, ramfs,
    overlay as in a container's root, squashfs). A network filesystem or a local disk exported
    to the nodes passes; jobd cannot tell the two apart without running a job.
    """
    problems: list[str] = []
    if not configured.is_absolute():
        problems.append(f"DATAPATH {configured} is relative: compute nodes would resolve it "
                        "against their own working directory")
    resolved = configured.resolve()
    for local in _NODE_LOCAL_DIRS:
        if resolved == Path(local) or str(resolved).startswith(local + "/"):
            problems.append(f"DATAPATH {resolved} is under {local}, which is local to each node")
            break
    point, fstype = mount_of(resolved, mountinfo)
    if fstype in _NODE_LOCAL_FS:
        problems.append(f"DATAPATH {resolved} is on {fstype} (mounted at {point}), which only "
                        "this machine sees")
    return problems


def _chunks(items: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _clock(timestamp: float) -> str:
    return time.strftime("%H:%M:%SZ", time.gmtime(timestamp))


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    if seconds >= 60:
        return f"{seconds / 60:.0f}m"
    return f"{seconds:.0f}s"


# -- the handle of one Slurm job ------------------------------------------------------------


class SlurmJob:
    """One submitted job: wait for its end, or cancel it. The executor's poll feeds it."""

    def __init__(self, executor: SlurmExecutor, job_id: str, slurm_id: int, *,
                 timeout: float, started: float | None) -> None:
        self.job_id = job_id
        self.slurm_id = slurm_id
        self._executor = executor
        self._done: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._reason: str | None = None
        self._timeout = timeout
        self._timer: asyncio.TimerHandle | None = None
        self.started = started
        self.message: str | None = None
        self.cancel_pending = False
        self.exit_unknown_since: float | None = None
        if started is not None:
            self._arm_timer(started)

    @property
    def running(self) -> bool:
        return not self._done.done()

    async def wait(self) -> Outcome:
        return await asyncio.shield(self._done)

    async def terminate(self, reason: str, grace: float) -> None:
        """scancel (Slurm sends SIGTERM, then SIGKILL after its KillWait); wait up to `grace`.

        While the controller is unreachable the cancel is retried by the poll until it gets
        through or the job ends.
        """
        if self._reason is None:
            self._reason = reason
        if not self.running:
            return
        self.cancel_pending = True
        await self._executor.cancel([self])
        try:
            await asyncio.wait_for(asyncio.shield(self._done), grace)
        except asyncio.TimeoutError:
            log.info("job %s: Slurm job %d still ending %.1fs after scancel", self.job_id,
                     self.slurm_id, grace)

    def finish(self, state: str, exit_code: int | None, signum: int | None) -> None:
        self.finish_with(outcome_for(state, exit_code, signum, self._reason))

    def finish_with(self, outcome: Outcome) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._done.done():
            self._done.set_result(outcome)

    def mark_started(self, when: float) -> None:
        if self.started is None:
            self.started = when
            self._arm_timer(when)

    def _arm_timer(self, started: float) -> None:
        if self._timeout <= 0 or self._timer is not None:
            return
        remaining = max(0.0, started + self._timeout - time.time())
        reason = f"timed out after {self._timeout:g}s"
        grace = self._executor.config.kill_grace
        self._timer = asyncio.get_running_loop().call_later(
            remaining, lambda: asyncio.ensure_future(self.terminate(reason, grace)))


# -- the executor ---------------------------------------------------------------------------


Update = Callable[[str, "dict[str, Any]"], None]


class SlurmExecutor:
    """Submits jobs with sbatch, follows them with one batched squeue, cancels with scancel."""

    name = "slurm"

    def __init__(self, config: Config, reaper: Reaper, on_update: Update) -> None:
        self.config = config
        self._reaper = reaper
        self._on_update = on_update
        self._jobs: dict[int, SlurmJob] = {}
        self._paths: dict[str, str] = {}
        self._poller: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._submit_slots: asyncio.Semaphore | None = None
        self._unreachable_since: float | None = None
        self._unreachable_error = ""
        self._accounting: bool | None = None
        self.polls = 0  # for tests and benchmarks: squeue rounds done

    # -- life cycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Check the setup (commands, shared storage, options), then start polling."""
        for name in COMMANDS:
            found = shutil.which(name)
            if found is None:
                raise SlurmSetupError(f"the Slurm executor needs {name} on PATH "
                                      f"(install the Slurm client tools, or unset JOBD_SLURM)")
            self._paths[name] = found
        for name in ("sacct", "scontrol"):
            found = shutil.which(name)
            if found is not None:
                self._paths[name] = found
        check_extra_options(self.config.slurm_extra)
        self._check_shared_storage()
        self._wake = asyncio.Event()
        self._submit_slots = asyncio.Semaphore(_SUBMIT_CONCURRENCY)
        self._poller = asyncio.get_running_loop().create_task(self._poll_forever(),
                                                              name="slurm poll")
        log.info("Slurm executor ready: %s, polling every %gs", self._paths["sbatch"],
                 self.config.slurm_poll_interval)

    async def stop(self) -> None:
        """Stop following jobs; they keep running in Slurm and are re-attached at next start."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):  # the cancel we just asked for
                await self._poller
            self._poller = None
        for handle in self._jobs.values():
            if handle._timer is not None:
                handle._timer.cancel()
        self._jobs.clear()

    def _check_shared_storage(self) -> None:
        mode = self.config.slurm_shared_check
        if mode == "off":
            return
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError as exc:
            log.warning("cannot read /proc/self/mountinfo (%s): filesystem type not checked", exc)
            mountinfo = ""
        problems = shared_storage_problems(self.config.datapath, mountinfo)
        if not problems:
            log.info("DATAPATH %s looks shareable with the Slurm compute nodes",
                     self.config.datapath.resolve())
            return
        text = "; ".join(problems)
        if mode == "fail":
            raise SlurmSetupError(
                f"DATAPATH must be on storage shared with the Slurm compute nodes: {text}. "
                "Point DATAPATH at a shared filesystem, or set JOBD_SLURM_SHARED_CHECK=warn "
                "when the compute node is this machine")
        log.warning("DATAPATH may not be shared with the Slurm compute nodes: %s", text)

    # -- commands ----------------------------------------------------------------------------

    def _query_env(self) -> dict[str, str]:
        """The daemon's environment without variables that would change the output format."""
        return {k: v for k, v in os.environ.items()
                if not k.startswith(("SQUEUE_", "SACCT_", "SCONTROL_")) and
                k != "SLURM_TIME_FORMAT"}

    async def _run(self, name: str, args: Sequence[str], *,
                   env: Mapping[str, str] | None = None,
                   cwd: Path | None = None) -> CommandResult:
        """Run a Slurm command; SlurmUnavailable when the controller did not answer."""
        path = self._paths.get(name) or name
        try:
            result = await run_command(self._reaper, [path, *args],
                                       self.config.slurm_command_timeout,
                                       env=self._query_env() if env is None else env,
                                       cwd=cwd)
        except CommandTimeout as exc:
            raise SlurmUnavailable(str(exc)) from None
        except OSError as exc:
            raise SlurmUnavailable(f"cannot run {name}: {exc.strerror or exc}") from None
        if result.returncode != 0 and is_unreachable(result.stderr):
            raise SlurmUnavailable(f"{name}: {last_line(result.stderr)}")
        return result

    def backoff(self, failures: int) -> float:
        return min(max(self.config.slurm_poll_interval, 0.5) * 2 ** max(failures - 1, 0),
                   _MAX_BACKOFF)

    def _note_unreachable(self, error: str) -> float:
        """Remember since when the controller fails; returns that time."""
        now = time.time()
        if self._unreachable_since is None:
            self._unreachable_since = now
            log.warning("Slurm controller unreachable: %s", error)
        self._unreachable_error = error
        return self._unreachable_since

    def _note_reachable(self) -> None:
        if self._unreachable_since is not None:
            log.info("Slurm controller reachable again after %s",
                     _duration(time.time() - self._unreachable_since))
            self._unreachable_since = None
            for handle in self._jobs.values():
                handle.message = None  # the next poll rewrites every message
            if self._wake is not None:
                self._wake.set()  # the poll may be deep in its backoff: poll now

    def unreachable_message(self) -> str:
        assert self._unreachable_since is not None
        deadline = self.config.slurm_unreachable_deadline
        limit = f"until {_clock(self._unreachable_since + deadline)}" if deadline > 0 \
            else "without a deadline"
        return (f"Slurm controller unreachable since {_clock(self._unreachable_since)} "
                f"({self._unreachable_error}); the job keeps its state and jobd retries "
                f"with backoff {limit}")

    def _deadline_passed(self) -> bool:
        deadline = self.config.slurm_unreachable_deadline
        return (self._unreachable_since is not None and deadline > 0
                and time.time() - self._unreachable_since >= deadline)

    async def retrying(self, operation: Callable[[], Awaitable[T]],
                       on_wait: Callable[[str], None],
                       stop: Callable[[], bool] | None = None) -> T:
        """`operation` until the controller answers; SlurmGaveUp after the deadline.

        `stop` cuts a backoff short (a cancel): the operation runs again at once and decides.
        """
        failures = 0
        while True:
            try:
                result = await operation()
            except SlurmUnavailable as exc:
                self._note_unreachable(str(exc))
                if self._deadline_passed():
                    raise SlurmGaveUp(self._gave_up_message()) from None
                failures += 1
                on_wait(self.unreachable_message())
                loop = asyncio.get_running_loop()
                until = loop.time() + self.backoff(failures)
                while loop.time() < until and not (stop is not None and stop()):
                    await asyncio.sleep(min(0.25, until - loop.time()))
                continue
            self._note_reachable()
            return result

    def _gave_up_message(self) -> str:
        since = self._unreachable_since or time.time()
        return (f"Slurm controller unreachable for {_duration(time.time() - since)} "
                f"({self._unreachable_error}): gave up following the job "
                "(JOBD_SLURM_UNREACHABLE_DEADLINE)")

    # -- submission --------------------------------------------------------------------------

    def check_options(self, options: Mapping[str, Any]) -> None:
        """OptionError when a job's options cannot become sbatch options."""
        resource_options(options, self.config.timeout)

    def sbatch_args(self, job_id: str, files: JobFiles, options: Mapping[str, Any],
                    token: str) -> list[str]:
        """sbatch's arguments (without the program): jobd's own options, the deployment's,
        then the job's resources, then the script."""
        root = files.root.resolve()
        args = ["--parsable", f"--job-name=jobd-{job_id}", f"--output={root / 'log'}",
                "--open-mode=append", f"--chdir={root / 'work'}", "--export=ALL",
                "--no-requeue", f"--comment={COMMENT_PREFIX}{token}"]
        args.extend(self.config.slurm_extra)
        if self.config.slurm_partition:
            args.append(f"--partition={self.config.slurm_partition}")
        if self.config.slurm_account:
            args.append(f"--account={self.config.slurm_account}")
        if self.config.slurm_qos:
            args.append(f"--qos={self.config.slurm_qos}")
        args.extend(resource_options(options, self.config.timeout))
        args.append(str(root / SCRIPT))
        return args

    def sbatch_env(self, job_env: Mapping[str, str]) -> dict[str, str]:
        """sbatch runs with the job's environment (exported to the job) plus what sbatch
        itself reads from the daemon's: SLURM_CONF and the SBATCH_* defaults."""
        env = dict(job_env)
        for name, value in os.environ.items():
            if name in ("SLURM_CONF", "SLURM_CLUSTERS") or name.startswith("SBATCH_"):
                env.setdefault(name, value)
        return env

    @staticmethod
    def read_token(files: JobFiles) -> str | None:
        try:
            return (files.root / TOKEN).read_text().strip() or None
        except FileNotFoundError:
            return None

    def write_submission(self, job_id: str, files: JobFiles, argv: Sequence[str]) -> str:
        """A new token and the batch script that checks it; returns the token."""
        token = uuid.uuid4().hex
        root = files.root.resolve()
        script = batch_script(job_id, token, root / TOKEN, root / "work", argv)
        _write_file(root / SCRIPT, script, 0o755)
        _write_file(root / TOKEN, token + "\n", 0o644)
        return token

    async def submit(self, job_id: str, files: JobFiles, options: Mapping[str, Any],
                     token: str, job_env: Mapping[str, str]) -> int:
        """One sbatch; the Slurm job id. SlurmError when Slurm refuses the job."""
        assert self._submit_slots is not None, "start() first"
        args = self.sbatch_args(job_id, files, options, token)
        async with self._submit_slots:
            started = time.perf_counter()
            result = await self._run("sbatch", args, env=self.sbatch_env(job_env),
                                     cwd=files.work)
        if result.returncode != 0:
            raise SlurmError(f"sbatch refused the job: {last_line(result.stderr)}")
        slurm_id = parse_job_id(result.stdout)
        log.info("job %s: submitted as Slurm job %d in %.0fms", job_id, slurm_id,
                 (time.perf_counter() - started) * 1000)
        return slurm_id

    async def find(self, job_id: str, token: str) -> int | None:
        """The Slurm job of this submission token, if slurmctld has it (recovery)."""
        result = await self._run("squeue", [f"--name=jobd-{job_id}", "--states=all",
                                            "--noheader", "--Format=JobID:|,Comment:|"])
        if result.returncode != 0:
            raise SlurmError(f"squeue failed: {last_line(result.stderr)}")
        for line in result.stdout.splitlines():
            parts = line.rstrip().rstrip("|").split("|", 1)
            if len(parts) == 2 and parts[0].strip().isdigit() and \
                    parts[1].strip() == COMMENT_PREFIX + token:
                return int(parts[0])
        return None

    def attach(self, job_id: str, slurm_id: int, *, timeout: float,
               started: float | None) -> SlurmJob:
        """Follow a submitted job (just submitted, or found again after a restart)."""
        handle = SlurmJob(self, job_id, slurm_id, timeout=timeout, started=started)
        self._jobs[slurm_id] = handle
        handle._done.add_done_callback(lambda _: self._forget(handle))
        if self._wake is not None:
            self._wake.set()
        return handle

    def _forget(self, handle: SlurmJob) -> None:
        if self._jobs.get(handle.slurm_id) is handle:
            del self._jobs[handle.slurm_id]

    @property
    def active(self) -> int:
        return len(self._jobs)

    # -- cancel ------------------------------------------------------------------------------

    async def cancel(self, handles: Sequence[SlurmJob]) -> None:
        """One scancel for all of them; left pending (retried by the poll) when unreachable."""
        pending = [h for h in handles if h.running and h.cancel_pending]
        if not pending:
            return
        try:
            result = await self._run("scancel", [str(h.slurm_id) for h in pending])
        except SlurmUnavailable as exc:
            self._note_unreachable(str(exc))
            log.warning("scancel of %s deferred: %s", ", ".join(h.job_id for h in pending), exc)
            return
        for handle in pending:
            handle.cancel_pending = False
        if result.returncode != 0:  # already finished, mostly: the poll will tell
            log.info("scancel: %s", last_line(result.stderr))
        if self._wake is not None:
            self._wake.set()

    # -- tracking ----------------------------------------------------------------------------

    async def _poll_forever(self) -> None:
        assert self._wake is not None
        failures = 0
        interval = max(self.config.slurm_poll_interval, 0.1)
        delay = interval
        while True:
            with contextlib.suppress(asyncio.TimeoutError):  # no wake-up: time for the poll
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()
            if not self._jobs:
                delay = interval
                continue
            try:
                await self.poll()
            except SlurmUnavailable as exc:
                failures += 1
                self._unreachable(str(exc))
                delay = self.backoff(failures)
                continue
            except Exception:
                log.exception("Slurm poll failed; retrying next interval")
            failures = 0
            delay = interval

    def _unreachable(self, error: str) -> None:
        """Tell every active job why nothing moves; after the deadline, fail them."""
        self._note_unreachable(error)
        if self._deadline_passed():
            message = self._gave_up_message()
            log.error("%s: failing %d job(s)", message, len(self._jobs))
            for handle in list(self._jobs.values()):
                handle.finish_with(Outcome(None, None, message))
            return
        message = self.unreachable_message()
        for handle in list(self._jobs.values()):
            self._say(handle, {"message": message})

    async def poll(self) -> None:
        """One round: one squeue for every active job (in chunks of 1000 ids), then sacct or
        scontrol only for the few that need it, then cancels that are still owed."""
        ids = sorted(self._jobs)
        rows: dict[int, QueueRow] = {}
        for chunk in _chunks(ids, _SQUEUE_CHUNK):
            result = await self._run("squeue", [
                "--jobs=" + ",".join(str(i) for i in chunk), "--states=all", "--noheader",
                f"--Format={_SQUEUE_FIELDS}"])
            if result.returncode != 0:
                if "invalid job id" in result.stderr.lower():
                    continue  # none of this chunk is known any more
                raise SlurmUnavailable(f"squeue: {last_line(result.stderr)}")
            rows.update(parse_squeue(result.stdout))
        self.polls += 1
        self._note_reachable()
        now = time.time()
        unknown_exit: list[SlurmJob] = []
        for slurm_id, row in rows.items():
            handle = self._jobs.get(slurm_id)
            if handle is None:
                continue
            if row.state in TERMINAL_STATES or (row.state not in PENDING_STATES and
                                                row.state not in ACTIVE_STATES):
                if row.state not in TERMINAL_STATES:
                    log.warning("Slurm job %d: unknown state %s, taken as ended", slurm_id,
                                row.state)
                if handle.started is None and row.start is not None:
                    # It ran and ended between two polls: record when it started all the same.
                    handle.started = min(row.start, now)
                    self._say(handle, {"status": "RUNNING", "started": handle.started,
                                       "message": f"job ran on Slurm as job {slurm_id}"})
                if row.exit_known:
                    handle.finish(row.state, row.exit_code, row.signal)
                else:
                    unknown_exit.append(handle)
            elif row.state in PENDING_STATES:
                what = "requeued by Slurm, pending" if handle.started else "pending in Slurm"
                why = f" ({row.reason})" if row.reason not in ("", "None") else ""
                self._say(handle, {"message": f"{what} as job {slurm_id}{why}"})
            else:
                handle.mark_started(min(row.start or now, now))
                where = f" on {row.nodes}" if row.nodes else ""
                state = "running" if row.state == "RUNNING" else row.state.lower()
                self._say(handle, {"status": "RUNNING", "started": handle.started,
                                   "message": f"job {state} on Slurm as job {slurm_id}{where}"})
        for handle in unknown_exit:
            await self._finish_from_scontrol(handle)
        missing = [i for i in ids if i not in rows and i in self._jobs]
        if missing:
            await self._finish_forgotten(missing)
        await self.cancel([h for h in self._jobs.values() if h.cancel_pending])

    def _say(self, handle: SlurmJob, changes: dict[str, Any]) -> None:
        """Report a change of a job to the manager, once per distinct message."""
        message = changes.get("message")
        if message is not None and message == handle.message:
            return
        handle.message = message
        self._on_update(handle.job_id, changes)

    async def scontrol_status(self, slurm_id: int) -> tuple[str, int | None, int | None] | None:
        """(state, exit code, signal) of one job from `scontrol show job`, if it knows it."""
        if "scontrol" not in self._paths:
            return None
        result = await self._run("scontrol", ["-o", "show", "job", str(slurm_id)])
        return parse_scontrol(result.stdout) if result.returncode == 0 else None

    async def _finish_from_scontrol(self, handle: SlurmJob) -> None:
        """The exit status of a finished job squeue did not give."""
        found = await self.scontrol_status(handle.slurm_id)
        if found is None:
            handle.finish_with(Outcome(None, None, f"Slurm job {handle.slurm_id} ended, but "
                                                   "Slurm gave no exit status"))
        else:
            handle.finish(*found)

    async def has_accounting(self) -> bool:
        """Whether sacct can answer (slurmdbd configured); asked once."""
        if self._accounting is None:
            if "sacct" not in self._paths:
                self._accounting = False
            else:
                result = await self._run("sacct", ["--noheader", "--parsable2", "--jobs=1",
                                                   "--format=JobIDRaw"])
                self._accounting = result.returncode == 0
                if not self._accounting:
                    log.info("Slurm accounting not available (%s): jobs slurmctld has "
                             "forgotten cannot be asked after", last_line(result.stderr))
        return self._accounting

    async def _finish_forgotten(self, ids: Sequence[int]) -> None:
        """Jobs squeue no longer shows: their end from sacct, or an honest unknown."""
        found: dict[int, tuple[str, int | None, int | None]] = {}
        if await self.has_accounting():
            result = await self._run("sacct", [
                "--jobs=" + ",".join(str(i) for i in ids), "--allocations", "--noheader",
                "--parsable2", "--format=JobIDRaw,State,ExitCode"])
            if result.returncode != 0:
                raise SlurmUnavailable(f"sacct: {last_line(result.stderr)}")
            found = parse_sacct(result.stdout)
        for slurm_id in ids:
            handle = self._jobs.get(slurm_id)
            if handle is None:
                continue
            if slurm_id in found:
                state, code, signum = found[slurm_id]
                if state in TERMINAL_STATES:
                    handle.finish(state, code, signum)
                continue  # sacct still sees it active: squeue will again
            handle.finish_with(Outcome(None, None, (
                f"Slurm no longer knows job {slurm_id} and keeps no accounting: its outcome "
                "is unknown (it ended more than MinJobAge ago while jobd was not looking)")))


def _write_file(path: Path, text: str, mode: int) -> None:
    """Write under a temporary name and rename, so Slurm never reads half a file."""
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    with open(temp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(temp, mode)
    os.replace(temp, path)
