"""Per-job cgroups (v2): limits for a job as a whole, an OOM-kill count, and a kill that
reaches every descendant, including those that left the job's session with setsid.

Used only when jobd finds a cgroup v2 directory it may write (a delegated cgroup: its own cgroup
in a container started with a writable cgroup mount, a systemd unit with `Delegate=yes`, or a
path given in JOBD_CGROUP). The tree:

    <own cgroup>/jobd-<hash of DATAPATH>/       one per daemon (found again after a crash)
        job-<id>/                               one per running job, removed when it ends

A cgroup may either hold processes or hand controllers to children, not both; when jobd's own
cgroup must enable controllers for its children, jobd first moves itself, with any helper
processes it has, into a leaf `<own cgroup>/jobd-daemon`. Controllers not available (say, a
hybrid v1/v2 host where memory still belongs to v1) are simply not used: the cgroup then still
tracks and kills the job.

A job with limits, or of another user, joins its cgroup while it waits at the start gate
(`run.py`), before any of its own code runs, so no descendant can start outside it. Other jobs
are moved in just after they start, and a job that ended by then never gets a cgroup (the
process group and the environment marker find what it left). The cgroup is made and removed
in worker threads: see `CgroupTree.plan`.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import signal
import time
from pathlib import Path

from jobd.resources import Limits

log = logging.getLogger("jobd.cgroup")

WANTED = ("memory", "cpu", "pids", "io")
CPU_PERIOD = 100_000  # microseconds: cpu.max "<quota> <period>"
_OPTIONAL = frozenset({"memory.swap.max", "memory.oom.group"})
DAEMON_LEAF = "jobd-daemon"  # where jobd moves itself so its cgroup can hand out controllers


# The files that limit a job (the others only shape how it is accounted or killed).
_LIMITS = frozenset({"memory.max", "cpu.max", "pids.max", "io.max"})


class CgroupError(RuntimeError):
    """A cgroup could not be created or configured."""


def _read(path: Path) -> str:
    return path.read_text()


def _write(path: Path, text: str) -> None:
    """One write() call, as cgroupfs wants; errors propagate."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def own_cgroup(proc_self: Path = Path("/proc/self")) -> Path | None:
    """The directory of this process's cgroup v2, or None when there is no v2 hierarchy."""
    relative = None
    for line in _read(proc_self / "cgroup").splitlines():
        if line.startswith("0::"):
            relative = line[3:]
    if relative is None:
        return None
    for line in _read(proc_self / "mountinfo").splitlines():
        fields = line.split()
        try:
            dash = fields.index("-")
        except ValueError:
            continue
        if fields[dash + 1] != "cgroup2":
            continue
        root, mount_point = fields[3], fields[4]
        if relative == root or relative.startswith(root.rstrip("/") + "/"):
            inside = relative[len(root):].lstrip("/")
            return Path(mount_point.replace("\\040", " ")) / inside
    return None


def tree_name(datapath: Path) -> str:
    """The per-daemon cgroup's name: stable across restarts, distinct per DATAPATH."""
    return "jobd-" + hashlib.sha1(str(datapath.resolve()).encode()).hexdigest()[:10]


def block_device(path: Path) -> str | None:
    """`major:minor` of the whole disk holding `path`, for io.max; None when it has none."""
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    if major == 0:
        return None  # overlay, tmpfs, NFS: no block device to throttle
    sysfs = Path(f"/sys/dev/block/{major}:{minor}")
    if (sysfs / "partition").exists():
        parent = sysfs.resolve().parent / "dev"
        if parent.exists():
            return _read(parent).strip()
    return f"{major}:{minor}"


class JobCgroup:
    """The cgroup of one running job."""

    def __init__(self, path: Path, has_kill: bool,
                 settings: list[tuple[str, str]] | None = None) -> None:
        self.path = path
        self._has_kill = has_kill
        self.settings = settings or []  # (file, value) pairs `make` writes
        # Limits to write (memory.max, cpu.max, pids.max, io.max): the job must be inside
        # before it runs. Without, the cgroup serves containment only (see run.py's gate).
        self.limited = any(name in _LIMITS for name, _ in self.settings)

    def make(self) -> None:
        """Create the cgroup, empty, with its settings written (blocking: in a worker thread,
        since every cgroup operation may wait for another's move, see `CgroupTree.plan`)."""
        if self.path.exists():
            try:
                self.kill()
                os.rmdir(self.path)
            except OSError as exc:
                raise CgroupError(f"stale cgroup {self.path} cannot be removed: {exc}") from exc
        try:
            self.path.mkdir()
        except OSError as exc:
            raise CgroupError(f"cannot create cgroup {self.path}: {exc}") from exc
        for name, value in self.settings:
            if name in _OPTIONAL and not (self.path / name).exists():
                continue  # no swap accounting, or an older kernel
            try:
                _write(self.path / name, value)
            except OSError as exc:
                log.warning("%s: cannot set %s to %r: %s", self.path.name, name, value, exc)

    def add(self, pid: int) -> None:
        _write(self.path / "cgroup.procs", str(pid))

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in _read(self.path / "cgroup.procs").split()]
        except FileNotFoundError:
            return []

    def populated(self) -> bool:
        try:
            events = _read(self.path / "cgroup.events")
        except FileNotFoundError:
            return False
        return "populated 1" in events

    def signal(self, signum: int) -> None:
        """Send `signum` to every process of the job."""
        if signum == signal.SIGKILL:
            self.kill()
            return
        for pid in self.pids():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                continue

    def kill(self) -> None:
        """SIGKILL every process in the cgroup, including ones forking right now."""
        if self._has_kill:
            try:
                _write(self.path / "cgroup.kill", "1")
            except FileNotFoundError:
                return
            return
        # Before Linux 5.14: freeze, kill what is there, thaw (fatal signals end frozen tasks).
        freeze = self.path / "cgroup.freeze"
        frozen = freeze.exists()
        if frozen:
            _write(freeze, "1")
        try:
            for _ in range(100):
                pids = self.pids()
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
        finally:
            if frozen:
                _write(freeze, "0")

    def _event(self, file: str, key: str) -> int:
        """The counter `key` of the events file `file` (0 without its controller)."""
        try:
            events = _read(self.path / file)
        except FileNotFoundError:
            return 0
        for line in events.splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
        return 0

    def refused_forks(self) -> int:
        """Forks the pids controller refused at pids.max (pids.events `max`; 0 without it)."""
        return self._event("pids.events", "max")

    def oom_kills(self) -> int:
        """OOM kills the kernel counted in this cgroup (0 without the memory controller).

        Proof of a memory kill, not a number of processes: with memory.oom.group the kernel
        kills its victim, then every process of the group, and counts the victim once or twice
        and a process already exiting not at all (seen on Linux 6.1).
        """
        return self._event("memory.events", "oom_kill")

    def end(self, wait: float = 1.0) -> tuple[int, int, bool]:
        """After the job's first process exited (blocking, in a worker thread): kill what is
        left, read the OOM kills and refused forks, remove the cgroup once its killed
        processes are gone (up to `wait` seconds). Whether it is gone; if not, `remove`
        goes on waiting."""
        self.kill()
        oom_kills, refused = self.oom_kills(), self.refused_forks()
        deadline = time.monotonic() + wait
        while True:
            try:
                os.rmdir(self.path)
            except FileNotFoundError:  # gone already
                return oom_kills, refused, True
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    log.error("could not remove cgroup %s: %s", self.path, exc)
                    return oom_kills, refused, True
                if time.monotonic() > deadline:
                    return oom_kills, refused, False
                time.sleep(0.005)  # killed processes take a moment to exit
                continue
            return oom_kills, refused, True

    async def remove(self, timeout: float = 10.0) -> None:
        """Kill what is left, wait until the cgroup is empty, remove it."""
        deadline = time.monotonic() + timeout
        self.kill()
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    log.error("could not remove cgroup %s: %s", self.path, exc)
                    return
            if self.populated():
                self.kill()
            await asyncio.sleep(0.02)


class CgroupTree:
    """The per-daemon cgroup under which every job gets its own."""

    def __init__(self, path: Path, controllers: frozenset[str], has_kill: bool,
                 io_device: str | None) -> None:
        self.path = path
        self.controllers = controllers
        self.has_kill = has_kill
        self.io_device = io_device

    @classmethod
    def detect(cls, setting: str, datapath: Path) -> tuple[CgroupTree | None, str]:
        """The tree to use, or None with the reason (for the start-up log line)."""
        if setting == "off":
            return None, "cgroups off (JOBD_CGROUP=off)"
        try:
            if setting == "auto":
                own = own_cgroup()
                if own is None:
                    return None, "no cgroup v2 hierarchy (cgroup v1 only)"
                if own.name == DAEMON_LEAF:  # moved there by an earlier run of jobd
                    own = own.parent
                if not os.access(own / "cgroup.procs", os.W_OK) or not os.access(own, os.W_OK):
                    return None, f"cgroup v2 {own} is not writable (not delegated)"
                path = own / tree_name(datapath)
                _enable_controllers(own)
            else:
                path = Path(setting)
                if not (path.parent / "cgroup.controllers").exists():
                    return None, f"JOBD_CGROUP {path}: its parent is not a cgroup v2 directory"
            path.mkdir(exist_ok=True)
            available = set(_read(path / "cgroup.controllers").split())
            wanted = [c for c in WANTED if c in available]
            if wanted:
                _write(path / "cgroup.subtree_control", " ".join("+" + c for c in wanted))
            enabled = frozenset(_read(path / "cgroup.subtree_control").split())
        except OSError as exc:
            return None, f"cgroup v2 not usable: {exc}"
        io_device = None
        if "io" in enabled:
            try:
                io_device = block_device(datapath)
            except OSError as exc:
                log.warning("io.max unavailable: cannot find the disk of %s: %s", datapath, exc)
        tree = cls(path, enabled, (path / "cgroup.kill").exists(), io_device)
        return tree, tree.describe()

    def describe(self) -> str:
        used = " ".join(c for c in WANTED if c in self.controllers) or "none"
        kill = "cgroup.kill" if self.has_kill else "freeze+kill"
        return f"cgroup v2 {self.path} (controllers: {used}; {kill})"

    def stale(self) -> list[JobCgroup]:
        """Job cgroups left by a daemon that died without cleaning up."""
        return [JobCgroup(p, self.has_kill) for p in self.path.glob("job-*") if p.is_dir()]

    def plan(self, job_id: str, limits: Limits) -> JobCgroup:
        """A job's cgroup, not created yet: the executor makes it in a worker thread.

        Every cgroup operation (mkdir, rmdir, cgroup.kill) takes the kernel's cgroup mutex,
        which a move into a cgroup holds through an RCU grace period (7 to 15 ms here when the
        previous move was long ago). On the event loop, one job's move would stall every
        request and job meanwhile.
        """
        return JobCgroup(self.path / f"job-{job_id}", self.has_kill, self._settings(limits))

    def _settings(self, limits: Limits) -> list[tuple[str, str]]:
        """(file, value) pairs for a job's cgroup."""
        out: list[tuple[str, str]] = []
        if "memory" in self.controllers:
            if limits.memory:
                out.append(("memory.max", str(limits.memory)))
                # Without this the job would swap at its limit instead of being stopped.
                out.append(("memory.swap.max", "0"))
            out.append(("memory.oom.group", "1"))  # an OOM kill ends the job as a whole
        if "cpu" in self.controllers and limits.cpus:
            out.append(("cpu.max", f"{max(1000, int(limits.cpus * CPU_PERIOD))} {CPU_PERIOD}"))
        if "pids" in self.controllers and limits.nproc:
            out.append(("pids.max", str(limits.nproc)))
        if "io" in self.controllers and limits.io and self.io_device:
            out.append(("io.max", f"{self.io_device} rbps={limits.io} wbps={limits.io}"))
        return out

    def close(self) -> None:
        """Remove the per-daemon cgroup (every job's is gone by now)."""
        try:
            os.rmdir(self.path)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("could not remove cgroup %s: %s", self.path, exc)


def _enable_controllers(own: Path, wanted: tuple[str, ...] = WANTED) -> None:
    """Let `own`'s children use the wanted controllers it has, moving jobd to a leaf if needed.

    "No internal processes": a non-root cgroup that holds processes cannot hand controllers
    down. In a container jobd and its own children are usually all there is, so they move into
    `own/jobd-daemon` and jobd tries again; if other processes remain (a wrapper that started
    jobd, say), the job cgroups go without controllers and the warning names those processes.
    """
    available = set(_read(own / "cgroup.controllers").split())
    enabled = set(_read(own / "cgroup.subtree_control").split())
    missing = [c for c in wanted if c in available and c not in enabled]
    if not missing:
        return
    text = " ".join("+" + c for c in missing)
    try:
        _write(own / "cgroup.subtree_control", text)
        return
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            log.warning("cannot enable %s in %s: %s", text, own, exc)
            return
    leaf = own / DAEMON_LEAF
    leaf.mkdir(exist_ok=True)
    mine = family_in(own, os.getpid())
    for pid in mine:
        try:
            _write(leaf / "cgroup.procs", str(pid))
        except ProcessLookupError:
            continue  # a helper that ended meanwhile
    helpers = f" and {len(mine) - 1} helper process(es) of its own" if len(mine) > 1 else ""
    log.info("moved jobd%s into %s so that %s can enable controllers", helpers, leaf, own)
    try:
        _write(own / "cgroup.subtree_control", text)
    except OSError as exc:
        others = " ".join(_read(own / "cgroup.procs").split()) or "none"
        log.warning("cannot enable %s in %s (processes left there: %s): %s", text, own, others,
                    exc)


def family_in(cgroup: Path, pid: int, proc: Path = Path("/proc")) -> list[int]:
    """`pid` and those of its descendants that are in `cgroup`, `pid` first.

    They move into the leaf together: the interpreter may have started helpers before jobd's
    code ran (shiv's first unpack compiles with a process pool, which on Python 3.13 leaves
    multiprocessing's forkserver and resource tracker running as jobd's children), and any
    one of them left behind keeps `cgroup` from handing out controllers.
    """
    family = [pid]
    for member in (int(p) for p in _read(cgroup / "cgroup.procs").split()):
        if member == pid:
            continue
        ancestor = member
        for _ in range(64):  # the chain up to pid, or to init
            try:
                stat = _read(proc / str(ancestor) / "stat")
            except OSError:
                break  # ended meanwhile
            ancestor = int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm) state"
            if ancestor == pid:
                family.append(member)
                break
            if ancestor <= 1:
                break
    return family
