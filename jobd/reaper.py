"""The one place that waits for child processes.

asyncio's child watchers wait for specific pids, but a daemon that is a container's PID 1 (or a
child subreaper) must also reap orphans with `waitpid(-1)`, which would steal those statuses.
So every child jobd starts is registered here, and one SIGCHLD handler collects every exit and
hands known pids their status. Orphans are reaped and counted, so no zombie accumulates.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal

log = logging.getLogger("jobd.reaper")

_PR_SET_CHILD_SUBREAPER = 36
_FALLBACK_POLL = 0.05


def become_subreaper() -> bool:
    """Ask Linux to reparent orphaned descendants to us, as if we were PID 1.

    Jobs that daemonise their children then still end up reaped here instead of as zombies
    of some other process, and their exits stay visible to jobd.
    """
    if os.getpid() == 1:
        return True
    try:
        # The process's own symbols, libc's among them: no search for the library (find_library
        # runs `ldconfig -p`, a process and its output parsed, at every start).
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
    except (OSError, AttributeError) as exc:
        log.warning("could not become a child subreaper: %s", exc)
        return False
    return True


def exit_status(status: int) -> tuple[int | None, int | None]:
    """(exit code, signal number) from a raw wait status; exactly one is not None."""
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status), None
    return None, None


class Reaper:
    """Collects child exits and resolves the future of each registered pid.

    With `adopt_orphans` (the daemon, as PID 1 or subreaper) it reaps any child with
    `waitpid(-1)`; without it (jobd embedded in a test process that has other children) it
    only waits for the pids it was given.
    """

    def __init__(self, *, adopt_orphans: bool) -> None:
        self.adopt_orphans = adopt_orphans
        self.orphans_reaped = 0
        self._waiters: dict[int, asyncio.Future[int]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poller: asyncio.Task[None] | None = None
        self._signal_installed = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.adopt_orphans:
            become_subreaper()
        try:
            self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
            self._signal_installed = True
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            # Not in the main thread (an embedded app): poll instead of SIGCHLD.
            log.debug("SIGCHLD handler unavailable (%s); polling for child exits", exc)
            self._poller = self._loop.create_task(self._poll())

    async def stop(self) -> None:
        if self._signal_installed and self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)
            self._signal_installed = False
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):  # the one we just asked for
                await self._poller
            self._poller = None
        self.reap()

    def watch(self, pid: int) -> asyncio.Future[int]:
        """A future for the raw wait status of `pid`, which must be our child."""
        assert self._loop is not None, "Reaper.start() first"
        future: asyncio.Future[int] = self._loop.create_future()
        self._waiters[pid] = future
        # The child may have exited before we registered it: collect it now.
        self._loop.call_soon(self.reap)
        return future

    def reap(self) -> None:
        """Collect every exited child without blocking."""
        if self.adopt_orphans:
            self._reap_any()
        else:
            for pid in list(self._waiters):
                self._reap_pid(pid)

    def _reap_any(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._deliver(pid, status)

    def _reap_pid(self, pid: int) -> None:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            log.error("child %d vanished without an exit status", pid)
            self._deliver(pid, 255 << 8)
            return
        if done:
            self._deliver(pid, status)

    def _deliver(self, pid: int, status: int) -> None:
        future = self._waiters.pop(pid, None)
        if future is None:
            self.orphans_reaped += 1
            log.debug("reaped orphan %d (status %d)", pid, status)
        elif not future.done():
            future.set_result(status)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(_FALLBACK_POLL)
            self.reap()
