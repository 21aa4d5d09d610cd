"""The scheduler: which QUEUED job starts next, and when.

One task owns the queue. It is woken at once by every submit and every job end, so a job on an
idle daemon starts within milliseconds; a poll every `poll_interval` seconds is the safety net
that finds anything the wake-ups missed (for example jobs requeued at start). The poll reads
the store's in-memory status index, so it costs next to nothing however many jobs are stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Awaitable
from typing import Callable

from jobd import job
from jobd.store import JobStore

log = logging.getLogger("jobd.schedule")

# Jobs whose processes ended, still being packed and recorded, per slot: past this many, no
# new job starts (a short job with a large result must not outrun its packing for ever).
FINISHING_PER_SLOT = 4


class Scheduler:
    """Starts QUEUED jobs, highest priority first then oldest, while slots are free."""

    def __init__(self, store: JobStore, start: Callable[[str], Awaitable[None]], *,
                 slots: int, poll_interval: float) -> None:
        self._store = store
        self._start = start
        self.slots = slots
        self._poll_interval = poll_interval
        self._heap: list[tuple[int, int, str]] = []
        self._queued: set[str] = set()
        self._running: dict[str, asyncio.Task[None]] = {}  # holding a slot
        self._finishing: dict[str, asyncio.Task[None]] = {}  # released, still being recorded
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._accepting = True

    # -- what the rest of the daemon calls -------------------------------------------------

    def submit(self, record: dict) -> None:
        """Queue a QUEUED record and wake the loop."""
        self._push(record)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def discard(self, job_id: str) -> None:
        """Forget a queued job (cancelled or deleted); its heap entry is skipped lazily."""
        self._queued.discard(job_id)

    def release(self, job_id: str) -> None:
        """The job's processes are gone: its slot goes to the next job while this one is
        packed and recorded (I/O, in worker threads; slots bound running processes)."""
        task = self._running.pop(job_id, None)
        if task is not None:
            self._finishing[job_id] = task
            self._wake.set()

    def is_running(self, job_id: str) -> bool:
        return job_id in self._running or job_id in self._finishing

    @property
    def running_count(self) -> int:
        return len(self._running)

    @property
    def queue_length(self) -> int:
        return len(self._queued)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="scheduler")

    async def stop(self) -> None:
        """Stop starting jobs; running ones are the caller's to stop.

        The loop is told by a flag and a wake-up, not by cancelling it: `asyncio.wait_for`
        (before Python 3.12) swallows a cancellation that arrives as the wait completes, which
        happens whenever a job ends at that moment, and the loop would then run forever.
        """
        self._accepting = False
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
            log.debug("scheduler loop stopped")

    async def drain(self) -> None:
        """Wait for every running job task to finish."""
        tasks = [*self._running.values(), *self._finishing.values()]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- the loop ----------------------------------------------------------------------------

    def _push(self, record: dict) -> None:
        job_id = record["id"]
        if job_id in self._queued or self.is_running(job_id):
            return
        self._queued.add(job_id)
        heapq.heappush(self._heap, (-int(record.get("priority") or 0), int(record["seq"]), job_id))

    def _poll_store(self) -> None:
        """The safety net: any QUEUED job the heap does not know about joins it."""
        for job_id in self._store.ids_with_status(job.QUEUED):
            if job_id not in self._queued and not self.is_running(job_id):
                record = self._store.get(job_id)
                if record is not None:
                    log.info("poll found queued job %s", job_id)
                    self._push(record)

    def _start_ready(self) -> None:
        # Jobs being packed count too, beyond a margin: packing may be slower than the jobs,
        # and their working directories must not pile up without bound.
        while self._accepting and self._heap and len(self._running) < self.slots and \
                len(self._finishing) < FINISHING_PER_SLOT * self.slots:
            _, _, job_id = heapq.heappop(self._heap)
            self._queued.discard(job_id)
            record = self._store.get(job_id)
            if record is None or record["status"] != job.QUEUED:
                continue  # cancelled or deleted while it waited
            task = asyncio.get_running_loop().create_task(self._run(job_id), name=f"job {job_id}")
            self._running[job_id] = task

    async def _run(self, job_id: str) -> None:
        try:
            await self._start(job_id)
        except Exception:
            log.exception("job %s: unexpected error in its run", job_id)
        finally:
            self._running.pop(job_id, None)
            self._finishing.pop(job_id, None)
            record = self._store.get(job_id)
            if record is not None and record["status"] == job.QUEUED:
                self._push(record)  # restarted (or requeued) before its run had ended
            self._wake.set()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        self._poll_store()
        last_poll = loop.time()
        while self._accepting:
            self._start_ready()
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):  # no wake-up: time for the poll
                await asyncio.wait_for(self._wake.wait(), self._poll_interval)
            if loop.time() - last_poll >= self._poll_interval:
                self._poll_store()
                last_poll = loop.time()
