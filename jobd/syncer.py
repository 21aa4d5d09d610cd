"""The store's fsync rounds, run by a helper process so the event loop's thread works alone.

Why a process: in CPython a worker thread that fsyncs takes the GIL back after each of its
system calls, and while it waits for it, every system call of the event loop's thread (each
mkdir, open or rename of a job's files) hands the GIL over and waits to get it back: futex
ping-pong. Measured under load (bench/RESULTS.md) that cost about 1 ms of CPU per job, more than
the fsyncs themselves. A helper process has its own GIL: the loop sends it a round (the names of
the files to sync, and the journal's descriptor over SCM_RIGHTS) and reads its answer when the
socket is readable, with no thread in jobd at all.

The helper is the few lines of `HELPER`, run by jobd's own interpreter with `-I -S` (nothing
from the environment or site packages). It starts with the first round and stops after
`idle_seconds` without one, so an idle daemon has no second process. The helper is an
optimisation, never a condition of durability: when it cannot start, or a round does not fit
one message, rounds run in a worker thread as before. When it dies, the rounds it had not begun
run in threads; the one it was on is `Uncertain` (its fsyncs may have failed, and the kernel
reports that once): its files count as failed, and the store snapshots its whole state instead
of trusting the journal's fsync. After three deaths, rounds use threads for good.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import os
import socket
import subprocess
import sys
from typing import Callable, Optional

from jobd.storage import Uncertain

log = logging.getLogger("jobd.syncer")

# A round's message: "=", then each name to sync after a NUL (absolute: the helper runs in /),
# with at most one descriptor (the journal). The answer: "=", then for each name and then the
# descriptor a NUL and its errno, or nothing for success. A name that is gone is no error
# (nothing of it is left to keep); nor are EINVAL and EROFS for a directory, which is what one
# that cannot be synced gives (as in storage._fsync_path). The journal's every error counts.
# The helper ignores the signals a terminal or a service manager sends the whole group: it
# ends when jobd closes its socket, or dies.
HELPER = r"""
import os, signal, socket, stat, sys
for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(number, signal.SIG_IGN)
s = socket.socket(fileno=int(sys.argv[1]))
def sync(fd, directory_may_refuse):
    try:
        os.fsync(fd)
    except OSError as e:
        if directory_may_refuse and e.errno in (22, 30) and stat.S_ISDIR(os.fstat(fd).st_mode):
            return b""
        return b"%d" % e.errno
    finally:
        os.close(fd)
    return b""
while True:
    data, fds, _, _ = socket.recv_fds(s, 1 << 16, 1)
    if not data:
        break
    answer = []
    for name in data.split(b"\0")[1:]:
        try:
            answer.append(sync(os.open(name, os.O_RDONLY | os.O_CLOEXEC), True))
        except OSError as e:
            answer.append(b"" if e.errno == 2 else b"%d" % e.errno)
    answer += [sync(fd, False) for fd in fds]
    s.send(b"=" + b"".join(b"\0" + a for a in answer))
"""

MAX_MESSAGE = 32 << 10  # a larger round goes to a thread (a message must fit the socket)
_MAX_ANSWER = 1 << 18  # a round's answer: at most about 5 bytes per name of its message

Errors = dict[str, OSError]
Fallback = Callable[[list[str], Optional[int]], Errors]


def parse_answer(answer: bytes, files: list[str], journal: int | None) -> Errors:
    """The helper's answer as the thread path gives it: the files' errors by name; raises
    the journal's error (ValueError if the answer does not fit the round)."""
    codes = answer.split(b"\0")[1:]
    if answer[:1] != b"=" or len(codes) != len(files) + (journal is not None):
        raise ValueError(f"unexpected answer from the fsync helper: {answer[:80]!r}")
    errors: Errors = {}
    for k, code in enumerate(codes):
        if not code:
            continue
        number = int(code)
        exc = OSError(number, os.strerror(number))
        if k >= len(files):
            raise exc
        errors.setdefault(files[k], exc)
    return errors


class _Round:
    __slots__ = ("files", "future", "journal")

    def __init__(self, files: list[str], journal: int | None,
                 future: asyncio.Future[Errors]) -> None:
        self.files = files
        self.journal = journal
        self.future = future


class Syncer:
    """Runs fsync rounds in the helper process, or else `fallback` in `executor`.

    `watch(pid)`, when given (the daemon's reaper), collects the helper's exit; without it
    the syncer waits for the helper itself when it closes.
    """

    DEATHS_TOLERATED = 3  # helpers that ended on their own: then threads for good

    def __init__(self, fallback: Fallback, executor: concurrent.futures.Executor, *,
                 watch: Callable[[int], asyncio.Future[int]] | None = None,
                 idle_seconds: float = 30.0) -> None:
        self._fallback = fallback
        self._executor = executor
        self._watch = watch
        self._idle = idle_seconds
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen | None = None
        self._exit: asyncio.Future[int] | None = None  # the helper's, from `watch`
        self._waiting: collections.deque[_Round] = collections.deque()
        self._last_round = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._unavailable = not sys.executable  # and after a failed start: threads only
        self.started = 0  # helpers started (tests read it)
        self.deaths = 0  # helpers that ended without being asked to

    @property
    def running(self) -> bool:
        """Is the helper there now (rounds go to it)?"""
        return self._sock is not None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._sock is not None else None

    def sync(self, files: list[str], journal: int | None) -> asyncio.Future[Errors]:
        """fsync `files` and the `journal` descriptor; the future gives the files' errors and
        raises the journal's (`Uncertain` when the helper ended during the round)."""
        loop = asyncio.get_running_loop()
        message = b"=" + b"".join(b"\0" + os.fsencode(os.path.abspath(name)) for name in files)
        if len(message) <= MAX_MESSAGE and self._running(loop):
            assert self._sock is not None
            try:
                socket.send_fds(self._sock, [message], [] if journal is None else [journal])
            except OSError as exc:  # its buffer is full, or it is gone: a thread this time
                log.debug("fsync helper: %s", exc)
            else:
                future: asyncio.Future[Errors] = loop.create_future()
                self._waiting.append(_Round(files, journal, future))
                self._last_round = loop.time()
                return future
        return loop.run_in_executor(self._executor, self._fallback, files, journal)

    def _running(self, loop: asyncio.AbstractEventLoop) -> bool:
        if self._sock is not None:
            return True
        if self._unavailable:
            return False
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", HELPER, str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, close_fds=True,
                cwd="/")
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("no fsync helper process, commits use threads: %s", exc)
            self._unavailable = True
            ours.close()
            return False
        finally:
            theirs.close()
        self.started += 1
        ours.setblocking(False)
        self._sock = ours
        loop.add_reader(ours.fileno(), self._answered)
        if self._watch is not None:
            self._exit = self._watch(self._proc.pid)
            self._exit.add_done_callback(self._exited(self._proc))
        self._last_round = loop.time()
        self._idle_timer = loop.call_later(self._idle, self._stop_when_idle)
        log.debug("fsync helper started, pid %d", self._proc.pid)
        return True

    @staticmethod
    def _exited(proc: subprocess.Popen) -> Callable[[asyncio.Future[int]], None]:
        def note(status: asyncio.Future[int]) -> None:
            if not status.cancelled():  # Popen must never waitpid() a recycled pid later
                proc.returncode = os.waitstatus_to_exitcode(status.result())
        return note

    def _answered(self) -> None:
        """The helper answered a round (in order), or closed its end."""
        assert self._sock is not None
        try:
            answer = self._sock.recv(_MAX_ANSWER)
        except BlockingIOError:
            return
        except OSError as exc:
            log.error("fsync helper: %s", exc)
            answer = b""
        if not answer or not self._waiting:
            if answer:
                log.error("fsync helper answered a round it was not sent")
            self._lost()
            return
        round_ = self._waiting[0]
        try:
            errors = parse_answer(answer, round_.files, round_.journal)
        except ValueError as exc:
            log.error("%s", exc)
            self._lost()
            return
        except OSError as exc:  # the journal's: the store decides what it means
            self._waiting.popleft()
            if not round_.future.done():
                round_.future.set_exception(exc)
            return
        self._waiting.popleft()
        if not round_.future.done():
            round_.future.set_result(errors)

    def _lost(self) -> None:
        """The helper ended without being asked to. The round it was on is `Uncertain`; the
        rounds after it it never began, so they run in threads (nothing waits forever)."""
        self.deaths += 1
        if self.deaths >= self.DEATHS_TOLERATED:
            self._unavailable = True
            log.error("fsync helper ended %d times: commits use threads from now on",
                      self.deaths)
        else:
            log.warning("fsync helper process ended; rounds it had not begun go to threads")
        self._disconnect()
        if self._waiting:
            head = self._waiting.popleft()
            if not head.future.done():
                head.future.set_exception(Uncertain(head.files))
        while self._waiting:
            round_ = self._waiting.popleft()
            if not round_.future.done():
                work = round_.future.get_loop().run_in_executor(
                    self._executor, self._fallback, round_.files, round_.journal)
                work.add_done_callback(_copy_to(round_.future))

    def _stop_when_idle(self) -> None:
        loop = asyncio.get_running_loop()
        quiet = loop.time() - self._last_round
        if self._waiting or quiet < self._idle:  # look again when it could be idle
            self._idle_timer = loop.call_later(max(self._idle - quiet, 1.0), self._stop_when_idle)
            return
        self._idle_timer = None
        log.debug("fsync helper stopped after %.0fs without a round", quiet)
        self.close()

    async def stop(self, timeout: float = 5.0) -> None:
        """Let the helper answer the rounds it has, stop it, and wait for its exit (the
        daemon, before its reaper stops). A round after this runs in a thread: no helper
        starts that nobody would collect."""
        self._unavailable = True
        pending = [r.future for r in self._waiting]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        exit_ = self._exit
        self.close()
        if exit_ is not None and not exit_.done():
            try:
                await asyncio.wait_for(asyncio.shield(exit_), timeout)
            except asyncio.TimeoutError:
                log.error("fsync helper did not exit within %.0fs of its socket's end", timeout)

    def close(self) -> None:
        """Stop the helper (it exits at the end of its socket). A round it has not answered
        fails as `Uncertain` (`stop` waits for them first)."""
        self._disconnect()
        while self._waiting:
            round_ = self._waiting.popleft()
            if not round_.future.done():
                round_.future.set_exception(Uncertain(round_.files))

    def _disconnect(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(RuntimeError):  # no loop: nothing waits on it
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
        proc, self._proc = self._proc, None
        self._exit = None
        if proc is not None and self._watch is None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.error("fsync helper %d did not stop; killed", proc.pid)
                proc.kill()  # Popen reaps it later if it is stuck in the kernel now



def _copy_to(target: asyncio.Future[Errors]) -> Callable[[asyncio.Future[Errors]], None]:
    def copy(source: asyncio.Future[Errors]) -> None:
        if target.done():
            return
        if source.cancelled():
            target.cancel()
        elif source.exception() is not None:
            target.set_exception(source.exception())  # type: ignore[arg-type]
        else:
            target.set_result(source.result())
    return copy
