"""Resource limits of a job: what they are, how a job asks for its own, how they are applied.

Two mechanisms, one set of numbers:

- `setrlimit`, always (applied with `prlimit` to the job's first process while it waits at the
  start gate of `run.py`, so every process of the job inherits them). They are per process
  (memory, CPU time, open files, file size) or per uid (processes), and the kernel refuses an
  allocation rather than killing the job, so a job over its memory limit usually ends with
  MemoryError / "Cannot allocate memory" in its log.
- cgroup v2, when jobd found a delegated cgroup (`cgroup.py`): memory.max, cpu.max, pids.max and
  io.max apply to the job as a whole, and the kernel reports OOM kills, so jobd can say for sure
  that a job was killed for memory.

Memory uses RLIMIT_DATA, not RLIMIT_AS: since Linux 4.7 it counts every private writable mapping
(heap, anonymous mmap, thread stacks), which is what "memory" means to a user, while RLIMIT_AS
also counts address space merely reserved (Java heaps, Go arenas, glibc malloc arenas), which
breaks such runtimes far below the limit.

The daemon's settings are the defaults and, when not 0, also the ceilings: a job may ask for
less (or for any value where the daemon sets none), never for more.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from jobd.config import Config, parse_duration, parse_size

# Seconds of CPU between SIGXCPU (the soft limit: catchable) and SIGKILL (the hard limit).
CPU_KILL_MARGIN = 5

# What a process prints when an allocation failed; used only to say "probably" in a message.
_ALLOCATION_FAILURES = (b"MemoryError", b"Cannot allocate memory", b"std::bad_alloc",
                        b"out of memory", b"Out of memory", b"cannot allocate vector",
                        b"OutOfMemoryError")
_LOG_TAIL = 64 * 1024


class LimitError(ValueError):
    """A job's `limits` option is malformed or above the daemon's ceiling."""


def human_size(size: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    if size >= 1 << 20:
        return f"{size / (1 << 20):.1f}M"
    return f"{size}B"


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a whole number, got {value!r}")
    return value


def _size(value: Any) -> int:
    if isinstance(value, str):
        return parse_size(value)
    return _count(value)


def _seconds(value: Any) -> float:
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected seconds or a duration such as 90s, got {value!r}")
    return float(value)


def _cpus(value: Any) -> float:
    if isinstance(value, str):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number of CPUs such as 1.5, got {value!r}")
    return float(value)


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "memory": _size, "cpu_time": _seconds, "cpus": _cpus, "nofile": _count, "nproc": _count,
    "fsize": _size, "io": _size,
}


@dataclass(frozen=True)
class Limits:
    """One job's limits; 0 means none (for `nofile`: jobd's own)."""

    memory: int = 0        # bytes: RLIMIT_DATA, memory.max
    cpu_time: float = 0.0  # seconds of CPU per process: RLIMIT_CPU
    cpus: float = 0.0      # CPUs: cpu.max (cgroup only)
    nofile: int = 0        # open files per process: RLIMIT_NOFILE
    nproc: int = 0         # processes: pids.max, RLIMIT_NPROC (per uid)
    fsize: int = 0         # bytes per file: RLIMIT_FSIZE
    io: int = 0            # bytes per second read and written on DATAPATH's disk (cgroup only)

    @classmethod
    def from_config(cls, config: Config) -> Limits:
        return cls(memory=config.limit_memory, cpu_time=config.limit_cpu_time,
                   cpus=config.limit_cpus, nofile=config.limit_nofile,
                   nproc=config.limit_nproc, fsize=config.limit_fsize, io=config.limit_io)

    def for_job(self, requested: Any) -> Limits:
        """These defaults with a job's `limits` option applied; LimitError when it is invalid.

        Keys: memory, cpu_time, cpus, nofile, nproc, fsize, io. Sizes may be numbers (bytes)
        or strings such as "64M", cpu_time seconds or "5m".
        """
        if requested is None:
            return self
        if not isinstance(requested, Mapping):
            raise LimitError("limits must be an object such as {\"memory\": \"1G\"}")
        changes: dict[str, Any] = {}
        for key, raw in requested.items():
            parse = _PARSERS.get(key)
            if parse is None:
                raise LimitError(f"unknown limit {key!r} (known: {', '.join(_PARSERS)})")
            try:
                value = parse(raw)
            except ValueError as exc:
                raise LimitError(f"limits.{key}: {exc}") from None
            if value < 0 or (isinstance(value, float) and not math.isfinite(value)):
                raise LimitError(f"limits.{key} must be 0 or more, got {raw!r}")
            ceiling = getattr(self, key)
            if ceiling and (value == 0 or value > ceiling):
                raise LimitError(f"limits.{key} {raw!r} is above jobd's limit "
                                 f"{self.show(key, ceiling)}")
            changes[key] = value
        return dataclasses.replace(self, **changes)

    @staticmethod
    def show(key: str, value: float) -> str:
        if key in ("memory", "fsize"):
            return human_size(int(value))
        if key == "io":
            return human_size(int(value)) + "/s"
        if key == "cpu_time":
            return f"{value:g}s"
        return f"{value:g}"

    def describe(self) -> str:
        """`memory=64M nproc=100`, or `none`."""
        parts = [f"{f.name}={self.show(f.name, getattr(self, f.name))}"
                 for f in dataclasses.fields(self) if getattr(self, f.name)]
        return " ".join(parts) or "none"

    def to_options(self) -> dict[str, Any]:
        """The non-zero limits, as stored in a job's options."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name)}

    # -- setrlimit --------------------------------------------------------------------------

    def rlimits(self) -> list[tuple[int, tuple[int, int]]]:
        """(resource, (soft, hard)) pairs to set on the job's first process."""
        out: list[tuple[int, tuple[int, int]]] = []
        if self.memory:
            out.append((resource.RLIMIT_DATA, (self.memory, self.memory)))
        if self.cpu_time:
            soft = max(1, math.ceil(self.cpu_time))
            out.append((resource.RLIMIT_CPU, (soft, soft + CPU_KILL_MARGIN)))
        if self.nofile:
            out.append((resource.RLIMIT_NOFILE, (self.nofile, self.nofile)))
        if self.nproc:
            out.append((resource.RLIMIT_NPROC, (self.nproc, self.nproc)))
        if self.fsize:
            out.append((resource.RLIMIT_FSIZE, (self.fsize, self.fsize)))
        return out

    def apply(self, pid: int) -> None:
        """Set the rlimits of process `pid` (which has not run the job's code yet)."""
        for which, values in self.rlimits():
            resource.prlimit(pid, which, values)

    def in_child(self) -> Callable[[], None] | None:
        """A `preexec_fn` that sets the rlimits in the child itself, or None if there are none.

        Only for a job running as another uid when jobd lacks CAP_SYS_RESOURCE (see
        `run.py`). It calls setrlimit and nothing else: no import, no allocation beyond a
        loop over a prepared list, no lock, which is what makes running Python between fork
        and exec hazardous in a threaded process.
        """
        pairs = self.rlimits()
        if not pairs:
            return None
        setrlimit = resource.setrlimit

        def set_limits() -> None:
            for which, values in pairs:
                setrlimit(which, values)

        return set_limits

    # -- what a limit did to a job -------------------------------------------------------------

    def reason(self, exit_code: int | None, signum: int | None, oom_kills: int,
               log_path: Path, refused_forks: int = 0) -> str | None:
        """Why a failed job failed, when a limit explains it; honest about certainty.

        Only a cgroup's OOM-kill count proves a memory kill. Without one, an allocation failure
        in the log of a job that had a memory rlimit is reported as "probably". Forks refused
        at pids.max are named last: a job may survive them and fail for another reason.
        """
        if exit_code == 0:
            return None
        if oom_kills > 0:
            # memory.oom.group: one OOM kill ends every process of the job. No count: the
            # kernel's oom_kill counter is not one (see JobCgroup.oom_kills).
            limit = f" {human_size(self.memory)}" if self.memory else ""
            return f"out of memory: the kernel killed the job at its memory limit{limit}"
        cpu_time = self.show("cpu_time", self.cpu_time)
        for signum_of_limit, value, what in (
                (signal.SIGXCPU, self.cpu_time, f"CPU time limit {cpu_time}"),
                (signal.SIGXFSZ, self.fsize, f"file size limit {human_size(self.fsize)}")):
            if not value:
                continue
            if signum == signum_of_limit:
                return f"{what} reached"
            if exit_code == 128 + signum_of_limit:  # how a shell reports a child's death
                return (f"{what} was probably reached (a process of the job ended by "
                        f"{signal.Signals(signum_of_limit).name})")
        if self.memory and _log_reports_allocation_failure(log_path):
            return (f"memory limit {human_size(self.memory)} was probably reached "
                    f"(the log reports a failed allocation)")
        if refused_forks > 0 and self.nproc:
            return (f"process limit {self.nproc} reached: the kernel refused {refused_forks} "
                    f"fork(s)")
        return None


def _log_reports_allocation_failure(log_path: Path) -> bool:
    try:
        with open(log_path, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - _LOG_TAIL))
            tail = handle.read()
    except OSError:
        return False
    return any(marker in tail for marker in _ALLOCATION_FAILURES)
