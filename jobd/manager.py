"""The operations every protocol calls: create, get, cancel, restart, delete, and a job's run.

Protocols (classic, orchestrator, native API) translate wire formats onto these calls and
nothing else, so a rule about jobs is written once, here or in `job.py`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from jobd import artifacts, auth, job
from jobd.auth import Client
from jobd.cgroup import CgroupTree, JobCgroup
from jobd.config import Config, parse_duration
from jobd.counter import NumericIds
from jobd.disk import DiskGuard
from jobd.files import DataDir, JobFiles, remove
from jobd.options import param_environment
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
from jobd.store import JobExists, JobStore, StoreError
from jobd.users import Identity, UserPolicy

if TYPE_CHECKING:
    from jobd import archive
    from jobd.slurm import SlurmExecutor, SlurmJob
    from jobd.spec import Spec

log = logging.getLogger("jobd.jobs")

SHUTDOWN = "daemon shutting down"


class NotFound(LookupError):
    """No job with that id."""


class Conflict(RuntimeError):
    """The operation does not fit the job's current status; the message says why."""


class Locked(PermissionError):
    """Locked-down mode: only job specs run, no client-supplied code."""

    def __init__(self) -> None:
        super().__init__("this daemon is locked down: it runs only job specs "
                         "(POST /api/v1/specs/{name}/jobs), not uploaded scripts")


class ExecutorUnavailable(ValueError):
    """The job asks for an executor this daemon does not offer (a client error)."""


class _CancelledBeforeSubmit(Exception):
    """A cancel arrived while the job waited to be submitted to Slurm."""


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


class NotStored(Rejected):
    """The job's input or record could not be made durable (a disk error): no 201."""

    status = 503
    code = "service_unavailable"


class InvalidOptions(Rejected, ValueError):
    """A job option (timeout, limits) is malformed or not allowed."""


# Seconds between two retention sweeps started by the disk guard.
_ON_DEMAND_SWEEP_GAP = 10.0
# Records a retention sweep reads between two turns of the event loop.
_SWEEP_BATCH = 1000
# Seconds a leftover process of a crashed daemon's job gets to die before jobd goes on.
_LEFTOVER_WAIT = 5.0
# Inputs up to this size are unpacked on the event loop: even at deflate's maximal ratio they
# write a few MiB, less time than handing the work to a thread and back.
SMALL_INPUT = 4096
# More jobs than this (or a tenth of those waiting) without their input at start means a
# wrong DATAPATH rather than a crash while storing: they are kept (`_drop_unacknowledged`).
_UNACKNOWLEDGED_MAX = 8
# The longest a long poll (`GET ...?wait=SECONDS`) holds its request.
MAX_WAIT = 300.0


class JobManager:
    """Owns the store, the scheduler and the running processes of one daemon."""

    def __init__(self, config: Config, store: JobStore, reaper: Reaper) -> None:
        self.config = config
        self.store = store
        self.data = DataDir(config.datapath)
        self.executor = LocalExecutor(reaper)
        # Slurm jobs are followed by their own tasks, outside the scheduler's slots: a slot
        # covers preparing the job; the cluster, not this machine, bounds how many run.
        self.slurm: SlurmExecutor | None = None
        if config.slurm_enabled:
            # jobd.slurm is imported only when the executor is on: keeps idle memory down.
            from jobd.slurm import SlurmExecutor

            self.slurm = SlurmExecutor(config, reaper, self._remote_update)
        self._remote: dict[str, SlurmJob] = {}
        self._remote_tasks: dict[str, asyncio.Task[None]] = {}
        self.scheduler = Scheduler(store, self._execute, slots=config.effective_slots,
                                   poll_interval=config.poll_interval)
        self.default_limits = Limits.from_config(config)
        self.users = UserPolicy.from_config(config)
        self.cgroups: CgroupTree | None = None
        self.disk = DiskGuard(config.datapath, *config.min_free)
        self._uids: dict[str, int] = {}
        self._base_env: dict[str, str] | None = None  # see _environment
        self._mean_run = 5.0  # seconds, moving average: the Retry-After estimate
        self._sweep_task: asyncio.Task[None] | None = None
        self._sweeping = asyncio.Lock()  # one retention sweep at a time
        self._last_demand_sweep = -math.inf
        self._processes: dict[str, LocalProcess] = {}
        self._cancel_requested: set[str] = set()
        self._reserved: set[str] = set()
        self._restarting: set[str] = set()  # finished jobs whose old files are being removed
        self._finished: dict[str, asyncio.Event] = {}
        self.log_followers = 0  # live log streams open now (logs.follow counts them)
        self._stopping = False
        self._sweeper: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self.specs: dict[str, Spec] = {}
        # Called with the final record of every job that ran and ended (metrics).
        self.job_end_listeners: list[Callable[[dict[str, Any]], None]] = []
        self.numeric_ids: NumericIds | None = None  # built in start()

    @functools.cached_property
    def limits(self) -> archive.Limits:
        """What one input may unpack to."""
        from jobd import archive  # on first use: keeps an idle daemon's memory down

        return archive.Limits(max_size=self.config.max_unpacked,
                              max_entries=self.config.max_entries,
                              max_ratio=self.config.max_ratio)

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
        if self.slurm is not None:
            await self.slurm.start()
        await asyncio.to_thread(self._clean_disk)
        await self._kill_leftovers()
        self.numeric_ids = NumericIds(self.config.db_path, self._all_ids(),
                                      fsync=self.config.fsync)
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
        for event in self._finished.values():  # long polls end now (they check _stopping)
            event.set()
        self._finished.clear()
        await self.scheduler.stop()
        if self._sweeper is not None:
            self._sweeper.cancel()
        # Slurm jobs keep running in Slurm: stop following them, re-attach at next start.
        remote = list(self._remote_tasks.values())
        for task in remote:
            task.cancel()
        await asyncio.gather(*remote, return_exceptions=True)
        if self.slurm is not None:
            await self.slurm.stop()
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
        local = {i for s in job.ACTIVE for i in self.store.ids_with_status(s)
                 if (self.store.get(i) or {}).get("executor", "local") == "local"}
        if not local:
            return  # a clean stop leaves nothing running; Slurm jobs are re-attached
        pids = await asyncio.to_thread(leftover_processes, self.data.root, Path("/proc"), local)
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
        self._drop_unacknowledged()
        for status in job.ACTIVE:
            for job_id in self.store.ids_with_status(status):
                record = self.store.get(job_id)
                if record is None:
                    continue
                if record.get("executor") == "slurm":
                    self._recover_remote(record)
                    continue
                changes = job.requeue_fields(record, self.config.max_attempts,
                                             "the daemon restarted while it ran")
                self._move(record, changes, durable=True)

    def _drop_unacknowledged(self) -> None:
        """Remove jobs whose input never fully reached the disk: jobd died while storing
        them, before their 201 (`create` waits for the input). Their clients got no answer;
        without the record, a retry with the same id works.

        Many at once means something else (DATAPATH not mounted, or another database's):
        then nothing is removed, and the jobs fail when they run, saying why.
        """
        suspects = []
        pending = [i for s in (job.QUEUED, *job.ACTIVE) for i in self.store.ids_with_status(s)]
        for job_id in pending:
            record = self.store.get(job_id)
            if record is None or record.get("executor", "local") != "local":
                continue
            try:
                size = self.files(job_id).input.stat().st_size
            except FileNotFoundError:
                size = None
            if size != record.get("input_size", size):
                suspects.append(job_id)
        if not suspects:
            return
        if len(suspects) > max(_UNACKNOWLEDGED_MAX, len(pending) // 10):
            log.error("%d of %d queued or running jobs have no complete input under %s: is "
                      "DATAPATH the data of this database (DB_PATH)? Keeping them.",
                      len(suspects), len(pending), self.data.root)
            return
        for job_id in suspects:
            log.warning("job %s: removed, its input never fully reached the disk (jobd "
                        "stopped while storing it, before acknowledging it)", job_id)
            self.store.delete(job_id)

    def _clean_disk(self) -> None:
        """Remove what a crash can leave behind: half uploads, trash, directories of no job."""
        for leftover in (self.data.incoming, self.data.trash):
            for path in leftover.iterdir():
                remove(path)
        for name in self.data.job_dirs():
            if self.store.get(name) is None:
                log.warning("removing %s: no job record (left by an interrupted upload)", name)
                remove(self.data.root / name)

    # -- operations ---------------------------------------------------------------------------

    def files(self, job_id: str) -> JobFiles:
        return self.data.job(job_id)

    def get(self, job_id: str, client: Client | None = None) -> dict[str, Any]:
        """The record; NotFound for no such job and for a job `client` may not see.

        Every protocol passes the caller (`auth.client_of(request)`), so one rule decides
        everywhere (auth.allows); None is the daemon itself.
        """
        record = self.store.get(job_id) if job.is_valid_id(job_id) else None
        if record is None or (client is not None and not auth.allows(client, record)):
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
                     owner: str | None = None, secret: str | None = None) -> dict[str, Any]:
        """Store a validated upload as a QUEUED job and wake the scheduler.

        `upload` is a file under DATAPATH/.incoming, already checked; it is moved into place
        before the record is written, so a stored job always has its input. `owner` is the
        creating client's name; `secret` (validated) is kept as a salted hash only.
        """
        if self.config.locked and not (options or {}).get("spec"):
            raise Locked()
        if self.exists(job_id):
            raise JobExists(job_id)
        self.check_executor(executor, options or {})
        self.check_options(options)
        self.admit()
        self._reserved.add(job_id)
        try:
            files = self.files(job_id)
            size = upload.stat().st_size
            if files.root.exists():  # a directory without a record, left by a crash
                await asyncio.to_thread(remove, files.root)
            files.root.mkdir(mode=0o700, parents=True)
            os.replace(upload, files.input)
            record = job.new_record(job_id, protocol=protocol, executor=executor,
                                    priority=priority, labels=labels, options=options,
                                    input_size=size, owner=owner)
            if secret is not None:
                record["secret_hash"] = auth.hash_secret(secret)
            record = self.store.add(record, durable=False)
        finally:
            self._reserved.discard(job_id)
        log.info("job %s created (%s, %d bytes)", job_id, protocol, size)
        # The job may start while its input and record go to disk: the answer waits for
        # both, the job need not. A crash before they are on disk leaves a record without
        # input, which the next start removes (`_recover`): that job was never acknowledged.
        self.scheduler.submit(record)
        try:
            await self.store.commit([files.input, files.root, self.data.root])
        except (OSError, StoreError) as exc:
            log.error("job %s: not acknowledged, it could not be stored durably: %s", job_id, exc)
            await self._withdraw(job_id)
            raise NotStored(f"the job could not be stored: {exc}") from exc
        return record

    async def _withdraw(self, job_id: str) -> None:
        """Undo a create whose answer is an error: the job must not run, nor stay stored."""
        try:
            if self.store.get(job_id) is not None:
                await self.cancel(job_id)
                await self._delete(job_id)
        except (OSError, StoreError, KeyError) as exc:  # the store may be unwritable now
            log.error("job %s: could not withdraw it: %s", job_id, exc)

    async def check_input(self, upload: Path, entry: str | None = "run.sh") -> None:
        """archive.check_zip within this daemon's limits: on the event loop for a small
        upload, in a worker thread otherwise. ArchiveError says what is wrong."""
        from jobd import archive  # on first use: keeps an idle daemon's memory down

        if upload.stat().st_size <= SMALL_INPUT:
            archive.check_zip(upload, self.limits, entry)
        else:
            await asyncio.to_thread(archive.check_zip, upload, self.limits, entry)

    def executors(self) -> tuple[str, ...]:
        """The executors jobs may choose, the default first."""
        offered = ("local", "slurm") if self.config.slurm_enabled else ("local",)
        return (self.config.executor, *(e for e in offered if e != self.config.executor))

    def check_executor(self, executor: str, options: dict[str, Any]) -> None:
        """ExecutorUnavailable or OptionError (both ValueError: a 400) when the job cannot
        run where it asks to."""
        if executor == "slurm":
            if self.slurm is None:
                raise ExecutorUnavailable("the slurm executor is not configured on this jobd "
                                          "(JOBD_SLURM)")
            self.slurm.check_options(options)
        elif executor != "local":
            raise ExecutorUnavailable(f"unknown executor {executor!r}: local or slurm")

    async def create_invalid(self, job_id: str, reason: str, *, protocol: str,
                             options: dict[str, Any] | None = None,
                             owner: str | None = None) -> dict[str, Any]:
        """Record a submission refused for its content as a FAILED job marked invalid.

        For protocols that must answer a refused submission with a job id anyway (the
        job-orchestrator's `Invalid` payload). Nothing is stored on disk but the record, so
        such a job cannot be restarted.
        """
        if self.exists(job_id):
            raise JobExists(job_id)
        now = time.time()
        record = job.new_record(job_id, protocol=protocol, now=now, owner=owner,
                                options={**(options or {}), job.INVALID: True})
        record.update(status=job.FAILED, message=reason, finished=now)
        record = self.store.add(record)
        log.info("job %s refused (%s): %s", job_id, protocol, reason)
        return record

    def new_numeric_id(self) -> str:
        """A numeric id never handed out before (see counter.py)."""
        assert self.numeric_ids is not None, "JobManager.start() first"
        return str(self.numeric_ids.allocate(self.exists))

    def numeric_id_issued(self, job_id: str) -> bool:
        """Whether a numeric id was handed out (its job may since have been deleted)."""
        return (self.numeric_ids is not None and job_id.isdigit() and job_id.isascii()
                and self.numeric_ids.issued(int(job_id)))

    def pid(self, job_id: str) -> int | None:
        """The process id of a running job's run.sh (its process group), if it runs here."""
        process = self._processes.get(job_id)
        return process.pid if process is not None else None

    def _all_ids(self) -> list[str]:
        return [i for status in job.STATUSES for i in self.store.ids_with_status(status)]

    async def cancel(self, job_id: str, *, client: Client | None = None,
                     ) -> tuple[dict[str, Any], bool]:
        """Cancel a job; idempotent. Returns the record and whether anything changed."""
        record = self.get(job_id, client)
        if job.is_terminal(record["status"]):
            return record, False
        if record["status"] == job.QUEUED and not self.scheduler.is_running(job_id):
            self.scheduler.discard(job_id)
            record = self._move(record, {"status": job.CANCELLED, "message": "job cancelled",
                                         "finished": time.time()}, durable=True)
            return record, True
        self._cancel_requested.add(job_id)
        process: LocalProcess | SlurmJob | None = (self._processes.get(job_id)
                                                   or self._remote.get(job_id))
        if process is not None:
            await process.terminate("cancelled", self.config.kill_grace)
        if record.get("executor") == "slurm":
            return await self._cancel_remote(job_id)
        await self.wait_finished(job_id)
        return self.get(job_id), True

    async def _cancel_remote(self, job_id: str) -> tuple[dict[str, Any], bool]:
        """Wait for Slurm to confirm, but not forever: an unreachable controller may take
        hours to hear the scancel, which stays owed and is retried until it gets through."""
        assert self.slurm is not None
        bound = (self.config.kill_grace + 2 * self.config.slurm_poll_interval
                 + self.config.slurm_command_timeout)
        try:
            await asyncio.wait_for(self.wait_finished(job_id), bound)
        except asyncio.TimeoutError:
            record = self.get(job_id)
            if not job.is_terminal(record["status"]):
                self._move(record, {"message": (
                    f"cancel requested: waiting for Slurm to end job "
                    f"{record.get('slurm_id') or '(being submitted)'}")}, durable=True)
        return self.get(job_id), True

    async def restart(self, job_id: str, *, client: Client | None = None) -> dict[str, Any]:
        """Run a finished job again from its original input, in a fresh working directory."""
        record = self.get(job_id, client)
        if not job.is_terminal(record["status"]):
            raise Conflict(f"job is {record['status']}: only a finished job can be restarted")
        if job.is_invalid(record):
            raise Conflict("job was refused at submission: it has no input to restart from")
        if job_id in self._restarting:
            raise Conflict("job is being restarted already")
        files = self.files(job_id)
        self._restarting.add(job_id)  # still finished meanwhile: not to be deleted
        try:
            await asyncio.to_thread(remove, files.work, files.result, files.log)
            record = self._move(record, job.restart_fields(), durable=True)
        finally:
            self._restarting.discard(job_id)
        self.scheduler.submit(record)
        return record

    async def delete(self, job_id: str, *, client: Client | None = None) -> None:
        """Delete a finished or queued job with its files."""
        record = self.get(job_id, client)
        if record["status"] in job.ACTIVE or (not job.is_terminal(record["status"])
                                              and self.scheduler.is_running(job_id)):
            raise Conflict(f"job is {record['status']}: cancel it before deleting it")
        if job_id in self._restarting:
            raise Conflict("job is being restarted: delete it once it has run")
        self.scheduler.discard(job_id)
        await self._delete(job_id)

    async def _delete(self, job_id: str) -> None:
        root = self.files(job_id).root
        if root.exists():
            trash = self.data.new_trash(job_id)
            os.replace(root, trash)
            self.store.delete(job_id)
            await asyncio.to_thread(remove, trash)
        else:
            self.store.delete(job_id)
        self._notify_finished(job_id)
        log.info("job %s deleted", job_id)

    async def wait_finished(self, job_id: str, timeout: float | None = None, *,
                            until_stop: bool = False) -> bool:
        """Until the job is no longer queued or running (for cancel and live logs).

        With `timeout`, returns False when it passed first; with `until_stop`, also when jobd
        begins to stop (a long poll must not hold the shutdown). Deleted jobs count as
        finished.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            record = self.store.get(job_id)
            if record is None or job.is_terminal(record["status"]):
                return True
            if until_stop and self._stopping:
                return False
            event = self._finished.setdefault(job_id, asyncio.Event())
            if deadline is None:
                await event.wait()
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except asyncio.TimeoutError:
                return False

    async def wait_result(self, job_id: str, seconds: float) -> None:
        """A long poll (`?wait=`): until the job is finished, `seconds` pass, or jobd begins
        to stop. The client then reads the job as usual: no busy polling meanwhile."""
        if seconds > 0:
            await self.wait_finished(job_id, seconds, until_stop=True)

    def _notify_finished(self, job_id: str) -> None:
        """Wake whoever waits for this job to end (it did, or it is gone)."""
        event = self._finished.pop(job_id, None)
        if event is not None:
            event.set()

    @property
    def stopping(self) -> bool:
        """The daemon is shutting down: long requests (log followers) should end."""
        return self._stopping

    def stored_bytes(self) -> int:
        """Bytes of inputs and results of every job, from the records (no directory walk)."""
        return self.store.stored_bytes()

    # -- a job's run --------------------------------------------------------------------------

    async def _execute(self, job_id: str) -> None:
        """Prepare, start, wait, pack, record: always ends with the job out of RUNNING."""
        record = self.store.get(job_id)
        if record is None:
            return
        if record.get("executor") == "slurm":
            self._hand_to_slurm(record)
            return
        record = self._move(record, {"status": job.RUNNING, "started": time.time(),
                                     "attempt": int(record.get("attempt") or 0) + 1,
                                     "message": "job running"}, durable=False)
        files = self.files(job_id)
        try:
            outcome = await self._run(record, files)
            self.scheduler.release(job_id)
            if outcome.reason == SHUTDOWN:  # requeued; a stop is not the job's fault
                self._move(record, {"status": job.QUEUED, "started": None, "queued": time.time(),
                                    "attempt": record["attempt"] - 1,
                                    "message": f"job requeued: {SHUTDOWN}"}, durable=True)
                return
            await self._record_outcome(record, files, outcome)
        except Exception as exc:
            log.exception("job %s: internal error", job_id)
            self._move(record, {"status": job.FAILED, "finished": time.time(),
                                "message": f"internal error: {exc}"}, durable=True)
        finally:
            self._cancel_requested.discard(job_id)
            self._notify_end(job_id)  # listeners (metrics) first: a waiter may read them
            self._notify_finished(job_id)

    def _notify_end(self, job_id: str) -> None:
        record = self.store.get(job_id)
        if record is None or not job.is_terminal(record["status"]):
            return  # requeued by a stop
        for listener in self.job_end_listeners:
            try:
                listener(record)
            except Exception:
                log.exception("job %s: a job-end listener failed", job_id)

    async def _record_outcome(self, record: dict[str, Any], files: JobFiles,
                              outcome: Outcome) -> None:
        """Pack the working directory and record how the job ended."""
        started = record.get("started") or time.time()
        self._mean_run = 0.8 * self._mean_run + 0.2 * max(0.0, time.time() - started)
        changes = job.outcome_fields(outcome.exit_code, outcome.signal, reason=outcome.reason)
        from jobd import pack  # on first use: keeps an idle daemon's memory down

        try:
            if record.get("executor", "local") == "local" and \
                    all(pack.is_small(d) for d in (files.work, files.home, files.tmp)):
                size, found = self._pack(files)  # less than a thread hop costs (not on a
                # cluster's shared storage, whose latency must not stall the loop)
            else:
                size, found = await asyncio.to_thread(self._pack, files)
            # On disk before the record says it exists; shared with other jobs' rounds.
            await self.store.commit([files.result, files.root])
            changes.update(output_size=size, artifacts=found)
        except OSError as exc:
            log.error("job %s: packing the result failed: %s", record["id"], exc)
            changes.update(status=job.FAILED, message=f"could not pack the result: {exc}")
        self._move(record, changes, durable=False, wake=False)
        await self.store.commit()  # shares its fsync with every job ending meanwhile
        # The caller then tells listeners and waiters, once the end is on disk (a poll may
        # see it a moment earlier: a crash then would run the job again, not lose it).

    def _environment(self, record: dict[str, Any], files: JobFiles) -> dict[str, str]:
        """The job's clean environment (the same for every executor): the minimal set, the
        allowed daemon variables (JOBD_PASS_ENV and a spec's own list), its parameters."""
        options = record.get("options") or {}
        if options.get("pass_env"):
            passed = (*self.config.pass_env, *options["pass_env"])
            base = job_environment(os.environ, passed, {})
        else:  # the same for every job: computed once (jobd's environment does not change)
            if self._base_env is None:
                self._base_env = job_environment(os.environ, self.config.pass_env, {})
            base = self._base_env
        root = files.root.resolve()  # once: each resolve() is a syscall per path component
        return {**base, **param_environment(options.get("params") or {}),
                "JOBD_JOB_ID": record["id"], "JOBD_WORKDIR": str(root / "work"),
                "HOME": str(root / "home"), "TMPDIR": str(root / "tmp"),
                "JOBD_ARTIFACTS_DIR": str(root / "work" / artifacts.DIRECTORY)}

    @staticmethod
    def _command(record: dict[str, Any], files: JobFiles, env: dict[str, str]) -> list[str]:
        """A spec's command, or the uploaded entry point run the way its kind needs."""
        options = record.get("options") or {}
        if options.get("command"):
            return list(options["command"])
        return command_for(files.work, options.get("entry") or "run.sh",
                           options.get("args") or (), function=options.get("function"),
                           path=env.get("PATH"))

    async def _run(self, record: dict[str, Any], files: JobFiles) -> Outcome:
        job_id = record["id"]
        try:
            return await self._run_as(record, files)
        finally:
            self._uids.pop(job_id, None)
            try:
                self.users.take_back(files)
            except OSError as exc:
                log.error("job %s: cannot close its directory: %s", job_id, exc)

    async def _run_as(self, record: dict[str, Any], files: JobFiles) -> Outcome:
        """Prepare, confine and start the job's process; wait for it."""
        from jobd import archive  # on first use: keeps an idle daemon's memory down

        job_id = record["id"]
        options = record.get("options") or {}
        cgroup: JobCgroup | None = None
        try:
            limits = self.default_limits.for_job(options.get("limits"))
            timeout = _timeout(options.get("timeout"), self.config.timeout)
            identity = self.users.assign(int(record.get("seq") or 0), set(self._uids.values()))
            if identity is not None:
                self._uids[job_id] = identity.uid
            if int(record.get("input_size") or 0) <= SMALL_INPUT:
                self._prepare(record, files, identity)  # less than a thread hop costs
            else:
                await asyncio.to_thread(self._prepare, record, files, identity)
            if job_id in self._cancel_requested:
                return Outcome(None, None, "cancelled")
            if self._stopping:
                return Outcome(None, None, SHUTDOWN)
            env = self._environment(record, files)
            argv = self._command(record, files, env)
            if self.cgroups is not None:  # made by the executor, off the event loop
                cgroup = self.cgroups.plan(job_id, limits)
            process = await self.executor.start(argv, cwd=files.work, log_path=files.log, env=env,
                                          identity=identity, limits=limits, cgroup=cgroup)
        except archive.ArchiveError as exc:
            return await _cleanup(cgroup, f"could not unpack the input: {exc}")
        except (StartError, OSError, ValueError, RuntimeError) as exc:
            return await _cleanup(cgroup, f"could not start the job: {exc}")
        who = f" as uid {identity.uid}" if identity is not None else ""
        log.info("job %s started%s, pid %d", job_id, who, process.pid)
        self._processes[job_id] = process
        # A cancel or a stop that came while the start awaited (a cgroup move) found no
        # process to end: it is ended now.
        if job_id in self._cancel_requested or self._stopping:
            if job_id in self._cancel_requested:
                await process.terminate("cancelled", self.config.kill_grace)
            else:
                await process.terminate(SHUTDOWN, self.config.shutdown_grace)
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
                                           files.log, outcome.refused_forks)
        return outcome

    # -- a Slurm job's run --------------------------------------------------------------------

    def _hand_to_slurm(self, record: dict[str, Any]) -> None:
        """PREPARED now; a task of its own prepares, submits and follows the job."""
        if self.slurm is None:
            self._move(record, {"status": job.FAILED, "finished": time.time(),
                                "message": "the slurm executor is not configured on this jobd "
                                           "(JOBD_SLURM)"}, durable=True)
            return
        from jobd.slurm import TOKEN  # loaded with self.slurm

        # A restarted job's old token must not lead recovery back to its previous Slurm job.
        remove(self.files(record["id"]).root / TOKEN)
        self._move(record, {"status": job.PREPARED, "started": None, "slurm_id": None,
                            "attempt": int(record.get("attempt") or 0) + 1,
                            "message": "preparing the job for Slurm"}, durable=True)
        self._spawn_remote(record["id"], recovering=False)

    def _recover_remote(self, record: dict[str, Any]) -> None:
        """A Slurm job active when the daemon stopped: follow it again, never submit it twice."""
        if self.slurm is None:
            self._move(record, {"status": job.FAILED, "finished": time.time(), "message": (
                f"jobd restarted without the slurm executor (JOBD_SLURM): Slurm job "
                f"{record.get('slurm_id') or '(not submitted)'} was not followed, its outcome "
                "is unknown")}, durable=True)
            return
        log.info("job %s: following Slurm job %s again", record["id"],
                 record.get("slurm_id") or "(submission unconfirmed)")
        self._spawn_remote(record["id"], recovering=True)

    def _spawn_remote(self, job_id: str, *, recovering: bool) -> None:
        task = asyncio.get_running_loop().create_task(
            self._follow_remote(job_id, recovering), name=f"slurm job {job_id}")
        self._remote_tasks[job_id] = task
        task.add_done_callback(lambda _: self._remote_tasks.pop(job_id, None))

    async def _follow_remote(self, job_id: str, recovering: bool) -> None:
        """Submit (or find again), wait for Slurm to report the end, pack, record."""
        record = self.store.get(job_id)
        if record is None:
            return
        files = self.files(job_id)
        try:
            found = await self._remote_handle(record, files, recovering)
            if isinstance(found, Outcome):
                outcome = found
            else:
                self._remote[job_id] = found
                if job_id in self._cancel_requested:
                    await found.terminate("cancelled", self.config.kill_grace)
                outcome = await found.wait()
            record = self.store.get(job_id) or record
            await self._record_outcome(record, files, outcome)
        except Exception as exc:
            log.exception("job %s: internal error", job_id)
            record = self.store.get(job_id) or record
            self._move(record, {"status": job.FAILED, "finished": time.time(),
                                "message": f"internal error: {exc}"}, durable=True)
        finally:
            self._remote.pop(job_id, None)
            self._cancel_requested.discard(job_id)
            event = self._finished.pop(job_id, None)
            if event is not None:
                event.set()

    async def _remote_handle(self, record: dict[str, Any], files: JobFiles,
                             recovering: bool) -> SlurmJob | Outcome:
        """The handle of the job's Slurm job, or the Outcome when it never got that far."""
        from jobd import archive  # on first use: keeps an idle daemon's memory down
        from jobd.slurm import TOKEN, OptionError, SlurmError, SlurmGaveUp  # with self.slurm

        assert self.slurm is not None
        slurm = self.slurm
        job_id = record["id"]
        options = record.get("options") or {}
        timeout = float(options.get("timeout") or self.config.timeout)

        def say(message: str) -> None:
            self._remote_update(job_id, {"message": message})

        if record.get("slurm_id"):
            started = record.get("started") if record["status"] == job.RUNNING else None
            return slurm.attach(job_id, int(record["slurm_id"]), timeout=timeout,
                                started=started)
        token: str | None = None
        try:
            if recovering:
                token = await asyncio.to_thread(slurm.read_token, files)
                if token is not None:
                    known = token
                    slurm_id = await slurm.retrying(lambda: slurm.find(job_id, known), say)
                    if slurm_id is not None:
                        self._move(record, {"slurm_id": slurm_id, "message": (
                            f"submitted to Slurm as job {slurm_id} (found again after a "
                            "restart)")}, durable=True)
                        return slurm.attach(job_id, slurm_id, timeout=timeout, started=None)
            await asyncio.to_thread(self._prepare, record, files, None)
            env = self._environment(record, files)
            argv = self._command(record, files, env)
            token = await asyncio.to_thread(slurm.write_submission, job_id, files, argv)
            current = token
            tried = False

            async def submit_once() -> int:
                nonlocal tried
                if job_id in self._cancel_requested:
                    raise _CancelledBeforeSubmit()
                if tried:  # an sbatch that did not answer may still have got through
                    again = await slurm.find(job_id, current)
                    if again is not None:
                        return again
                tried = True
                return await slurm.submit(job_id, files, options, current, env)

            slurm_id = await slurm.retrying(submit_once, say,
                                            stop=lambda: job_id in self._cancel_requested)
        except _CancelledBeforeSubmit:
            outcome = Outcome(None, None, "cancelled")
        except archive.ArchiveError as exc:
            outcome = Outcome(None, None, f"could not unpack the input: {exc}")
        except (StartError, OSError) as exc:
            outcome = Outcome(None, None, f"could not start the job: {exc}")
        except (SlurmError, OptionError) as exc:
            outcome = Outcome(None, None, f"could not submit the job to Slurm: {exc}")
        except SlurmGaveUp as exc:
            outcome = Outcome(None, None, str(exc))
        else:
            self._move(record, {"slurm_id": slurm_id,
                                "message": f"submitted to Slurm as job {slurm_id}"},
                       durable=True)
            return slurm.attach(job_id, slurm_id, timeout=timeout, started=None)
        if token is not None:  # a submission that got through unseen must not run the job
            await asyncio.to_thread(remove, files.root / TOKEN)
        return outcome

    def _remote_update(self, job_id: str, changes: dict[str, Any]) -> None:
        """What the Slurm poll learnt about a job: RUNNING, or a new message."""
        record = self.store.get(job_id)
        if record is None or job.is_terminal(record["status"]):
            return
        changes = dict(changes)
        status = changes.get("status")
        if status is not None and (status == record["status"]
                                   or not job.can_move(record["status"], status)):
            del changes["status"]
            changes.pop("started", None)
            status = None
        self._move(record, changes, durable=status is not None)

    def _prepare(self, record: dict[str, Any], files: JobFiles,
                 identity: Identity | None) -> None:
        """A fresh working directory with the input unpacked, an empty log, home and tmp,
        owned by the user the job runs as."""
        from jobd import archive  # on first use: keeps an idle daemon's memory down

        remove(files.work, files.result, files.home, files.tmp)
        archive.extract(files.input, files.work, self.limits)
        if (record.get("options") or {}).get("spec"):  # others see just their upload
            (files.work / artifacts.DIRECTORY).mkdir(exist_ok=True)
        files.home.mkdir()
        files.tmp.mkdir()
        files.log.write_bytes(b"")
        self.users.hand_over(files, identity)

    def _pack(self, files: JobFiles) -> tuple[int, list[dict[str, Any]]]:
        """The result zip's size and the artifacts listing."""
        from jobd import pack  # on first use: keeps an idle daemon's memory down

        if not files.work.exists():
            files.work.mkdir()
        artifacts.prune_if_empty(files.work)
        found = artifacts.collect(files.work)
        size = pack.pack_zip(files.work, files.result, level=self.config.zip_level,
                             sync=False)  # the caller's group commit syncs it
        if not self.config.keeps_workdir:
            remove(files.work)
        remove(files.home, files.tmp)
        return size, found

    def _move(self, record: dict[str, Any], changes: dict[str, Any], *,
              durable: bool, wake: bool = True) -> dict[str, Any]:
        """Apply a status change allowed by the state machine, and log it. Whoever waits for
        the job to finish is woken now, or with `wake=False` by the caller (once durable)."""
        new_status = changes.get("status", record["status"])
        if new_status != record["status"]:
            job.check_move(record["status"], new_status)
        updated = self.store.update(record["id"], changes, durable=durable)
        log.info("job %s %s -> %s: %s", record["id"], record["status"], new_status,
                 updated.get("message", ""))
        if wake and job.is_terminal(new_status):
            self._notify_finished(record["id"])
        return updated

    # -- retention ----------------------------------------------------------------------------

    async def sweep(self, now: float | None = None) -> int:
        """Delete finished jobs older than the retention; returns how many."""
        async with self._sweeping:
            return await self._sweep(time.time() if now is None else now)

    async def _sweep(self, now: float) -> int:
        cutoff = now - self.config.retention

        def expired(record: dict[str, Any] | None) -> bool:
            return (record is not None and job.is_terminal(record["status"])
                    and (record.get("finished") or record.get("updated") or now) < cutoff)

        old = []
        for status in job.TERMINAL:
            for n, record in enumerate(self._records(status), 1):
                if expired(record):
                    old.append(record["id"])
                if n % _SWEEP_BATCH == 0:  # 100,000 records take half a second: let
                    await asyncio.sleep(0)  # requests and jobs through meanwhile
        deleted = 0
        for job_id in old:  # each looked at again: it may have been restarted or deleted
            if expired(self.store.get(job_id)) and not self.scheduler.is_running(job_id) \
                    and job_id not in self._restarting:
                await self._delete(job_id)
                deleted += 1
        if deleted:
            log.info("retention: deleted %d job(s) finished before %s", deleted,
                     time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(cutoff)))
        return deleted

    def _records(self, status: str) -> Iterator[dict[str, Any]]:
        """The records with `status`, decoded one at a time (all of them at once would take
        2 KB each: 200 MiB for a sweep over 100,000 finished jobs)."""
        for job_id in self.store.ids_with_status(status):
            record = self.store.get(job_id)
            if record is not None:
                yield record

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
        except Exception:  # the next sweep tries again; the daemon goes on
            log.exception("on-demand retention sweep failed")
        self.disk.forget()

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:  # a sweeper that died would stop retention until a restart
                log.exception("retention sweep failed; retrying next interval")
            await asyncio.sleep(self.config.retention_interval)


def parse_wait(text: str | None) -> float:
    """The `wait` query parameter of a long poll: seconds, 0 to MAX_WAIT (ValueError)."""
    if text is None:
        return 0.0
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"wait must be a number of seconds, not {text!r}") from None
    if not 0 <= seconds <= MAX_WAIT:  # also refuses nan
        raise ValueError(f"wait must be between 0 and {MAX_WAIT:g} seconds, not {text}")
    return seconds


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
