"""The operations every protocol calls: create, get, cancel, restart, delete, and a job's run.

Protocols (classic, orchestrator, native API) translate wire formats onto these calls and
nothing else, so a rule about jobs is written once, here or in `job.py`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from jobd import archive, auth, job, pack
from jobd.auth import Client
from jobd.config import Config
from jobd.files import DataDir, JobFiles, fsync_dir
from jobd.reaper import Reaper
from jobd.run import LocalExecutor, LocalProcess, Outcome, StartError, command_for, job_environment
from jobd.schedule import Scheduler
from jobd.store import JobExists, JobStore

log = logging.getLogger("jobd.jobs")

SHUTDOWN = "daemon shutting down"


class NotFound(LookupError):
    """No job with that id."""


class Conflict(RuntimeError):
    """The operation does not fit the job's current status; the message says why."""


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
        await asyncio.to_thread(self._clean_disk)
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

    async def create(self, job_id: str, upload: Path, *, protocol: str,
                     options: dict[str, Any] | None = None, priority: int = 0,
                     labels: dict[str, str] | None = None, executor: str = "local",
                     owner: str | None = None, secret: str | None = None) -> dict[str, Any]:
        """Store a validated upload as a QUEUED job and wake the scheduler.

        `upload` is a file under DATAPATH/.incoming, already checked; it is moved into place
        before the record is written, so a stored job always has its input. `owner` is the
        creating client's name; `secret` (validated) is kept as a salted hash only.
        """
        if self.exists(job_id):
            raise JobExists(job_id)
        self._reserved.add(job_id)
        try:
            files = self.files(job_id)
            size = upload.stat().st_size
            await asyncio.to_thread(self._place_input, upload, files)
            record = job.new_record(job_id, protocol=protocol, executor=executor,
                                    priority=priority, labels=labels, options=options,
                                    input_size=size, owner=owner)
            if secret is not None:
                record["secret_hash"] = auth.hash_secret(secret)
            record = self.store.add(record)
        finally:
            self._reserved.discard(job_id)
        log.info("job %s created (%s, %d bytes)", job_id, protocol, size)
        self.scheduler.submit(record)
        return record

    def _place_input(self, upload: Path, files: JobFiles) -> None:
        if files.root.exists():
            _remove(files.root)  # a directory without a record: left by a crash
        files.root.mkdir(parents=True)
        os.replace(upload, files.input)
        if self.config.fsync:
            fsync_dir(files.root)
            fsync_dir(self.data.root)

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
        process = self._processes.get(job_id)
        if process is not None:
            await process.terminate("cancelled", self.config.kill_grace)
        await self.wait_finished(job_id)
        return self.get(job_id), True

    async def restart(self, job_id: str, *, client: Client | None = None) -> dict[str, Any]:
        """Run a finished job again from its original input, in a fresh working directory."""
        record = self.get(job_id, client)
        if not job.is_terminal(record["status"]):
            raise Conflict(f"job is {record['status']}: only a finished job can be restarted")
        files = self.files(job_id)
        await asyncio.to_thread(_remove_all, files.work, files.result, files.log)
        record = self._move(record, job.restart_fields(), durable=True)
        self.scheduler.submit(record)
        return record

    async def delete(self, job_id: str, *, client: Client | None = None) -> None:
        """Delete a finished or queued job with its files."""
        record = self.get(job_id, client)
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
        options = record.get("options") or {}
        entry = options.get("entry", "run.sh")
        try:
            await asyncio.to_thread(self._prepare, files)
            if job_id in self._cancel_requested:
                return Outcome(None, None, "cancelled")
            argv = command_for(files.work, entry, options.get("args") or ())
            env = job_environment(os.environ, self.config.pass_env, {
                "JOBD_JOB_ID": job_id, "JOBD_WORKDIR": str(files.work.resolve()),
                "HOME": str(files.home.resolve()), "TMPDIR": str(files.tmp.resolve()),
            })
            process = self.executor.start(argv, cwd=files.work, log_path=files.log, env=env)
        except archive.ArchiveError as exc:
            return Outcome(None, None, f"could not unpack the input: {exc}")
        except (StartError, OSError) as exc:
            return Outcome(None, None, f"could not start the job: {exc}")
        self._processes[job_id] = process
        timeout = float(options.get("timeout") or self.config.timeout)
        timer = None
        if timeout > 0:
            reason = f"timed out after {timeout:g}s"
            timer = asyncio.get_running_loop().call_later(
                timeout, lambda: asyncio.ensure_future(
                    process.terminate(reason, self.config.kill_grace)))
        try:
            return await process.wait()
        finally:
            if timer is not None:
                timer.cancel()
            self._processes.pop(job_id, None)

    def _prepare(self, files: JobFiles) -> None:
        """A fresh working directory with the input unpacked, an empty log, home and tmp."""
        _remove_all(files.work, files.result, files.home, files.tmp)
        archive.extract(files.input, files.work, self.limits)
        files.home.mkdir()
        files.tmp.mkdir()
        files.log.write_bytes(b"")

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

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except OSError:
                log.exception("retention sweep failed; retrying next interval")
            await asyncio.sleep(self.config.retention_interval)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _remove_all(*paths: Path) -> None:
    for path in paths:
        _remove(path)
