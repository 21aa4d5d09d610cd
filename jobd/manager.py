"""The operations every protocol calls: create, get, cancel, restart, delete, and a job's run.

Protocols (classic, orchestrator, native API) translate wire formats onto these calls and
nothing else, so a rule about jobs is written once, here or in `job.py`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from jobd import archive, job, pack
from jobd.cgroup import CgroupError, CgroupTree, JobCgroup
from jobd.config import Config, parse_duration
from jobd.disk import DiskGuard
from jobd.files import DataDir, JobFiles, fsync_dir
from jobd.reaper import Reaper
from jobd.resources import LimitError, Limits
from jobd.run import (
    LocalExecutor,
    LocalProcess,
    Outcome,
    StartError,
    command_for,
    job_environment,
    leftover_processes,
)
from jobd.schedule import Scheduler
from jobd.store import JobExists, JobStore
from jobd.users import Identity, UserPolicy

log = logging.getLogger("jobd.jobs")

SHUTDOWN = "daemon shutting down"


class NotFound(LookupError):
    """No job with that id."""


class Conflict(RuntimeError):
    """The operation does not fit the job's current status; the message says why."""


class Rejected(Exception):
    """A new job is refused; every protocol answers `status` with error `code` and `headers`
    (the app maps any it does not catch itself)."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


class QueueFull(Rejected):
    """JOBD_MAX_QUEUE jobs are already waiting."""

    status = 429
    code = "too_many_requests"


class DiskFull(Rejected):
    """Free space under DATAPATH is below JOBD_MIN_FREE."""

    status = 507
    code = "insufficient_storage"


class InvalidOptions(Rejected, ValueError):
    """A job option (timeout, limits) is malformed or not allowed."""


# Seconds between two retention sweeps started by the disk guard.
_ON_DEMAND_SWEEP_GAP = 10.0
# Seconds a leftover process of a crashed daemon's job gets to die before jobd goes on.
_LEFTOVER_WAIT = 5.0
_PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class JobManager:
    """Owns the store, the scheduler and the running processes of one daemon."""

    def __init__(self, config: Config, store: JobStore, reaper: Reaper) -> None:
        self.config = config
        self.store = store
        self.data = DataDir(config.datapath)
        self.executor = LocalExecutor(reaper)
        self.limits = archive.Limits(max_size=config.max_unpacked,
                                     max_entries=config.max_entries,
                                     max_ratio=config.max_ratio)
        self.scheduler = Scheduler(store, self._execute, slots=config.effective_slots,
                                   poll_interval=config.poll_interval)
        self.default_limits = Limits.from_config(config)
        self.users = UserPolicy.from_config(config)
        self.cgroups: CgroupTree | None = None
        self.disk = DiskGuard(config.datapath, *config.min_free)
        self._uids: dict[str, int] = {}
        self._mean_run = 5.0  # seconds, moving average: the Retry-After estimate
        self._sweep_task: asyncio.Task[None] | None = None
        self._last_demand_sweep = -math.inf
        self._processes: dict[str, LocalProcess] = {}
        self._cancel_requested: set[str] = set()
        self._reserved: set[str] = set()
        self._finished: dict[str, asyncio.Event] = {}
        self._stopping = False
        self._sweeper: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.data.create()
        self.users.check_datapath(self.data.root)
        self.users.prepare_datapath(self.data.root, [self.data.incoming, self.data.trash])
        self.cgroups, how = await asyncio.to_thread(CgroupTree.detect, self.config.cgroup,
                                                    self.data.root)
        mechanism = f"setrlimit + {how}" if self.cgroups else f"setrlimit only ({how})"
        log.info("limits: %s; defaults: %s", mechanism, self.default_limits.describe())
        log.info("users: %s", self.users.describe())
        for warning in self.users.warnings():
            log.warning("%s", warning)
        await asyncio.to_thread(self._clean_disk)
        await self._kill_leftovers()
        self._recover()
        self.scheduler.start()
        if self.config.retention > 0:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    def begin_stop(self) -> None:
        """Start stopping now (on SIGTERM, while HTTP connections still drain)."""
        if self._stop_task is None:
            self._stop_task = asyncio.get_running_loop().create_task(self._stop())

    async def stop(self) -> None:
        """Stop starting jobs, stop the running ones within the grace, requeue them."""
        self.begin_stop()
        assert self._stop_task is not None
        await self._stop_task

    async def _stop(self) -> None:
        self._stopping = True
        await self.scheduler.stop()
        if self._sweeper is not None:
            self._sweeper.cancel()
        grace = self.config.shutdown_grace
        if self._processes:
            log.info("stopping %d running job(s), %.1fs grace", len(self._processes), grace)
        await asyncio.gather(*(p.terminate(SHUTDOWN, grace) for p in self._processes.values()))
        await self.scheduler.drain()
        if self._sweep_task is not None:
            self._sweep_task.cancel()
        if self.cgroups is not None:
            self.cgroups.close()

    async def _kill_leftovers(self) -> None:
        """Processes of jobs of a daemon that died without its container must not outlive it:
        their jobs are about to be requeued, and must not run twice at once."""
        if self.cgroups is not None:
            for group in self.cgroups.stale():
                log.warning("killing what is left in %s (from a previous run)", group.path)
                await group.remove()
        if not any(self.store.ids_with_status(s) for s in job.ACTIVE):
            return  # a clean stop leaves nothing running
        pids = await asyncio.to_thread(leftover_processes, self.data.root)
        if not pids:
            return
        log.warning("killing %d process(es) left by jobs of a previous run: %s", len(pids),
                    " ".join(map(str, pids[:20])))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + _LEFTOVER_WAIT
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def _recover(self) -> None:
        """Jobs that were running when the daemon died go back to the queue."""
        for status in job.ACTIVE:
            for job_id in self.store.ids_with_status(status):
                record = self.store.get(job_id)
                if record is None:
                    continue
                changes = job.requeue_fields(record, self.config.max_attempts,
                                             "the daemon restarted while it ran")
                self._move(record, changes, durable=True)

    def _clean_disk(self) -> None:
        """Remove what a crash can leave behind: half uploads, trash, directories of no job."""
        for leftover in (self.data.incoming, self.data.trash):
            for path in leftover.iterdir():
                _remove(path)
        for name in self.data.job_dirs():
            if self.store.get(name) is None:
                log.warning("removing %s: no job record (left by an interrupted upload)", name)
                _remove(self.data.root / name)

    # -- operations ---------------------------------------------------------------------------

    def files(self, job_id: str) -> JobFiles:
        return self.data.job(job_id)

    def get(self, job_id: str) -> dict[str, Any]:
        record = self.store.get(job_id) if job.is_valid_id(job_id) else None
        if record is None:
            raise NotFound(job_id)
        return record

    def exists(self, job_id: str) -> bool:
        return job_id in self._reserved or self.store.get(job_id) is not None

    def admit(self, incoming: int = 0) -> None:
        """Raise QueueFull or DiskFull when a job of about `incoming` bytes cannot be taken.

        Cheap (a counter and a cached statvfs): protocols call it before reading a body, and
        `create` calls it again, so every protocol gets the same answers.
        """
        cap = self.config.max_queue
        if cap:
            waiting = self.store.counts().get(job.QUEUED, 0) + len(self._reserved)
            if waiting >= cap:
                raise QueueFull(f"the queue is full: {waiting} jobs are waiting, at most {cap}"
                                f" (JOBD_MAX_QUEUE); try again later",
                                retry_after=self._retry_after(waiting - cap + 1))
        problem = self.disk.problem(incoming)
        if problem:
            self._sweep_on_demand()
            raise DiskFull(problem)

    def _retry_after(self, ahead: int) -> int:
        """Seconds until about `ahead` queued jobs have started, from recent run times."""
        rounds = math.ceil(ahead / max(1, self.scheduler.slots))
        return max(1, min(300, math.ceil(self._mean_run * rounds)))

    def check_options(self, options: dict[str, Any] | None) -> None:
        """InvalidOptions unless `timeout` and `limits` are usable."""
        options = options or {}
        try:
            _timeout(options.get("timeout"), 0.0)
        except ValueError as exc:
            raise InvalidOptions(f"timeout: {exc}") from None
        try:
            self.default_limits.for_job(options.get("limits"))
        except LimitError as exc:
            raise InvalidOptions(str(exc)) from None

    async def create(self, job_id: str, upload: Path, *, protocol: str,
                     options: dict[str, Any] | None = None, priority: int = 0,
                     labels: dict[str, str] | None = None, executor: str = "local",
                     owner: str | None = None) -> dict[str, Any]:
        """Store a validated upload as a QUEUED job and wake the scheduler.

        `upload` is a file under DATAPATH/.incoming, already checked; it is moved into place
        before the record is written, so a stored job always has its input.
        """
        if self.exists(job_id):
            raise JobExists(job_id)
        self.check_options(options)
        self.admit()
        self._reserved.add(job_id)
        try:
            files = self.files(job_id)
            size = upload.stat().st_size
            await asyncio.to_thread(self._place_input, upload, files)
            record = job.new_record(job_id, protocol=protocol, executor=executor,
                                    priority=priority, labels=labels, options=options,
                                    input_size=size, owner=owner)
            record = self.store.add(record)
        finally:
            self._reserved.discard(job_id)
        log.info("job %s created (%s, %d bytes)", job_id, protocol, size)
        self.scheduler.submit(record)
        return record

    def _place_input(self, upload: Path, files: JobFiles) -> None:
        if files.root.exists():
            _remove(files.root)  # a directory without a record: left by a crash
        files.root.mkdir(mode=0o700, parents=True)
        os.replace(upload, files.input)
        if self.config.fsync:
            fsync_dir(files.root)
            fsync_dir(self.data.root)

    async def cancel(self, job_id: str) -> tuple[dict[str, Any], bool]:
        """Cancel a job; idempotent. Returns the record and whether anything changed."""
        record = self.get(job_id)
        if job.is_terminal(record["status"]):
            return record, False
        if record["status"] == job.QUEUED and not self.scheduler.is_running(job_id):
            self.scheduler.discard(job_id)
            record = self._move(record, {"status": job.CANCELLED, "message": "job cancelled",
                                         "finished": time.time()}, durable=True)
            return record, True
        self._cancel_requested.add(job_id)
        process = self._processes.get(job_id)
        if process is not None:
            await process.terminate("cancelled", self.config.kill_grace)
        await self.wait_finished(job_id)
        return self.get(job_id), True

    async def restart(self, job_id: str) -> dict[str, Any]:
        """Run a finished job again from its original input, in a fresh working directory."""
        record = self.get(job_id)
        if not job.is_terminal(record["status"]):
            raise Conflict(f"job is {record['status']}: only a finished job can be restarted")
        files = self.files(job_id)
        await asyncio.to_thread(_remove_all, files.work, files.result, files.log)
        record = self._move(record, job.restart_fields(), durable=True)
        self.scheduler.submit(record)
        return record

    async def delete(self, job_id: str) -> None:
        """Delete a finished or queued job with its files."""
        record = self.get(job_id)
        if record["status"] in job.ACTIVE or self.scheduler.is_running(job_id):
            raise Conflict(f"job is {record['status']}: cancel it before deleting it")
        self.scheduler.discard(job_id)
        await self._delete(job_id)

    async def _delete(self, job_id: str) -> None:
        root = self.files(job_id).root
        if root.exists():
            trash = self.data.new_trash(job_id)
            os.replace(root, trash)
            self.store.delete(job_id)
            await asyncio.to_thread(_remove, trash)
        else:
            self.store.delete(job_id)
        log.info("job %s deleted", job_id)

    async def wait_finished(self, job_id: str) -> None:
        """Until the job is no longer queued or running (for cancel and live logs)."""
        while True:
            record = self.store.get(job_id)
            if record is None or job.is_terminal(record["status"]):
                return
            event = self._finished.setdefault(job_id, asyncio.Event())
            await event.wait()

    # -- a job's run --------------------------------------------------------------------------

    async def _execute(self, job_id: str) -> None:
        """Prepare, start, wait, pack, record: always ends with the job out of RUNNING."""
        record = self.store.get(job_id)
        if record is None:
            return
        record = self._move(record, {"status": job.RUNNING, "started": time.time(),
                                     "attempt": int(record.get("attempt") or 0) + 1,
                                     "message": "job running"}, durable=False)
        files = self.files(job_id)
        try:
            outcome = await self._run(record, files)
            if outcome.reason == SHUTDOWN:  # requeued; a stop is not the job's fault
                self._move(record, {"status": job.QUEUED, "started": None,
                                    "attempt": record["attempt"] - 1,
                                    "message": f"job requeued: {SHUTDOWN}"}, durable=True)
                return
            started = record.get("started") or time.time()
            self._mean_run = 0.8 * self._mean_run + 0.2 * max(0.0, time.time() - started)
            changes = job.outcome_fields(outcome.exit_code, outcome.signal, reason=outcome.reason)
            try:
                changes["output_size"] = await asyncio.to_thread(self._pack, files)
            except OSError as exc:
                log.error("job %s: packing the result failed: %s", job_id, exc)
                changes.update(status=job.FAILED, message=f"could not pack the result: {exc}")
            self._move(record, changes, durable=True)
        except Exception as exc:
            log.exception("job %s: internal error", job_id)
            self._move(record, {"status": job.FAILED, "finished": time.time(),
                                "message": f"internal error: {exc}"}, durable=True)
        finally:
            self._cancel_requested.discard(job_id)
            event = self._finished.pop(job_id, None)
            if event is not None:
                event.set()

    async def _run(self, record: dict[str, Any], files: JobFiles) -> Outcome:
        job_id = record["id"]
        try:
            return await self._run_as(record, files)
        finally:
            self._uids.pop(job_id, None)
            try:
                await asyncio.to_thread(self.users.take_back, files)
            except OSError as exc:
                log.error("job %s: cannot close its directory: %s", job_id, exc)

    async def _run_as(self, record: dict[str, Any], files: JobFiles) -> Outcome:
        """Prepare, confine and start the job's process; wait for it."""
        job_id = record["id"]
        options = record.get("options") or {}
        entry = options.get("entry", "run.sh")
        cgroup: JobCgroup | None = None
        try:
            limits = self.default_limits.for_job(options.get("limits"))
            timeout = _timeout(options.get("timeout"), self.config.timeout)
            identity = self.users.assign(int(record.get("seq") or 0), set(self._uids.values()))
            if identity is not None:
                self._uids[job_id] = identity.uid
            await asyncio.to_thread(self._prepare, files, identity)
            if job_id in self._cancel_requested:
                return Outcome(None, None, "cancelled")
            if self._stopping:
                return Outcome(None, None, SHUTDOWN)
            argv = command_for(files.work, entry, options.get("args") or ())
            env = job_environment(os.environ, self.config.pass_env, {
                **_param_variables(options.get("params")),
                "JOBD_JOB_ID": job_id, "JOBD_WORKDIR": str(files.work.resolve()),
                "HOME": str(files.home.resolve()), "TMPDIR": str(files.tmp.resolve()),
            })
            if self.cgroups is not None:
                try:
                    cgroup = self.cgroups.create(job_id, limits)
                except CgroupError as exc:
                    log.error("job %s: runs without a cgroup: %s", job_id, exc)
            process = self.executor.start(argv, cwd=files.work, log_path=files.log, env=env,
                                          identity=identity, limits=limits, cgroup=cgroup)
        except archive.ArchiveError as exc:
            return await _cleanup(cgroup, f"could not unpack the input: {exc}")
        except (StartError, OSError, ValueError, RuntimeError) as exc:
            return await _cleanup(cgroup, f"could not start the job: {exc}")
        who = f" as uid {identity.uid}" if identity is not None else ""
        log.info("job %s started%s, pid %d", job_id, who, process.pid)
        self._processes[job_id] = process
        timer = None
        if timeout > 0:
            reason = f"timed out after {timeout:g}s"
            timer = asyncio.get_running_loop().call_later(
                timeout, lambda: asyncio.ensure_future(
                    process.terminate(reason, self.config.kill_grace)))
        try:
            outcome = await process.wait()
        finally:
            if timer is not None:
                timer.cancel()
            self._processes.pop(job_id, None)
        if outcome.reason is None:
            outcome.reason = limits.reason(outcome.exit_code, outcome.signal, outcome.oom_kills,
                                           files.log)
        return outcome

    def _prepare(self, files: JobFiles, identity: Identity | None) -> None:
        """A fresh working directory with the input unpacked, an empty log, home and tmp,
        owned by the user the job runs as."""
        _remove_all(files.work, files.result, files.home, files.tmp)
        archive.extract(files.input, files.work, self.limits)
        files.home.mkdir()
        files.tmp.mkdir()
        files.log.write_bytes(b"")
        self.users.hand_over(files, identity)

    def _pack(self, files: JobFiles) -> int:
        if not files.work.exists():
            files.work.mkdir()
        size = pack.pack_zip(files.work, files.result, level=self.config.zip_level)
        if not self.config.keeps_workdir:
            _remove(files.work)
        _remove_all(files.home, files.tmp)
        return size

    def _move(self, record: dict[str, Any], changes: dict[str, Any], *,
              durable: bool) -> dict[str, Any]:
        """Apply a status change allowed by the state machine, and log it."""
        new_status = changes.get("status", record["status"])
        if new_status != record["status"]:
            job.check_move(record["status"], new_status)
        updated = self.store.update(record["id"], changes, durable=durable)
        log.info("job %s %s -> %s: %s", record["id"], record["status"], new_status,
                 updated.get("message", ""))
        return updated

    # -- retention ----------------------------------------------------------------------------

    async def sweep(self, now: float | None = None) -> int:
        """Delete finished jobs older than the retention; returns how many."""
        now = time.time() if now is None else now
        cutoff = now - self.config.retention
        old = [r["id"] for status in job.TERMINAL for r in self._records(status)
               if (r.get("finished") or r.get("updated") or now) < cutoff]
        for job_id in old:
            if not self.scheduler.is_running(job_id):
                await self._delete(job_id)
        if old:
            log.info("retention: deleted %d job(s) finished before %s", len(old),
                     time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(cutoff)))
        return len(old)

    def _records(self, status: str) -> list[dict[str, Any]]:
        found = (self.store.get(i) for i in self.store.ids_with_status(status))
        return [r for r in found if r is not None]

    def _sweep_on_demand(self) -> None:
        """The disk is nearly full: run the retention sweep now (at most every few seconds)."""
        now = time.monotonic()
        running = self._sweep_task is not None and not self._sweep_task.done()
        if running or now - self._last_demand_sweep < _ON_DEMAND_SWEEP_GAP:
            return
        self._last_demand_sweep = now
        log.warning("disk space below JOBD_MIN_FREE: running the retention sweep now")
        self._sweep_task = asyncio.get_running_loop().create_task(self._sweep_now())

    async def _sweep_now(self) -> None:
        try:
            await self.sweep()
        except OSError:
            log.exception("on-demand retention sweep failed")
        self.disk.forget()

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except OSError:
                log.exception("retention sweep failed; retrying next interval")
            await asyncio.sleep(self.config.retention_interval)


def _timeout(value: Any, default: float) -> float:
    """A job's `timeout` option (seconds, or a duration such as "5m"); ValueError if bad."""
    if value is None:
        return default
    if isinstance(value, str):
        seconds = parse_duration(value)
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected seconds or a duration such as 90s, got {value!r}")
    else:
        seconds = float(value)
    if not 0 < seconds < math.inf:
        raise ValueError(f"must be more than 0 seconds, got {value!r}")
    return seconds


def _param_variables(params: Any) -> dict[str, str]:
    """JOBD_PARAM_<name> for each job parameter; text as is, other values as JSON."""
    if not isinstance(params, dict):
        return {}
    out = {}
    for name, value in params.items():
        if not isinstance(name, str) or not _PARAM_NAME.fullmatch(name):
            log.warning("parameter %r is not a valid variable name: not exported", name)
            continue
        out[f"JOBD_PARAM_{name}"] = value if isinstance(value, str) else json.dumps(value)
    return out


def _alive(pid: int) -> bool:
    """Does `pid` exist and is it not a zombie?"""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            state = handle.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"


async def _cleanup(cgroup: JobCgroup | None, reason: str) -> Outcome:
    """A job that did not start: remove its cgroup, report why."""
    if cgroup is not None:
        await cgroup.remove()
    return Outcome(None, None, reason)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _remove_all(*paths: Path) -> None:
    for path in paths:
        _remove(path)
