"""A job's log (stdout and stderr combined, `DATAPATH/<id>/log`): read it from a byte offset,
and follow it while the job runs, as raw bytes or as Server-Sent Events.

A follower polls the log's size every `POLL` seconds (one `stat`, no inotify: it works on every
filesystem and costs next to nothing) and wakes at once when the job ends. It ends when the job
ends (after the last bytes), when the job is deleted, when the daemon stops, and when the
client goes away: Starlette cancels the response's generator on disconnect, which stops the
loop at its next await, so a departed follower costs nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from jobd import job
from jobd.manager import JobManager

POLL = 0.1
CHUNK = 256 * 1024
#: An SSE comment this often keeps proxies from closing an idle stream.
KEEPALIVE = 15.0
#: Output without a line break is sent as an event once this much has gathered.
MAX_PENDING = 64 * 1024
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def size_of(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0  # not started yet: no log


def read(path: Path, offset: int, limit: int = CHUNK) -> bytes:
    """Up to `limit` bytes from `offset`; empty when there are none (or no log yet)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return b""
    try:
        return os.pread(fd, limit, offset)
    finally:
        os.close(fd)


def read_range(path: Path, offset: int, end: int) -> list[bytes]:
    """The bytes between `offset` and `end`, in chunks (for a whole-log answer)."""
    chunks = []
    while offset < end:
        data = read(path, offset, min(CHUNK, end - offset))
        if not data:
            break
        chunks.append(data)
        offset += len(data)
    return chunks


async def follow(manager: JobManager, job_id: str, path: Path, offset: int,
                 ) -> AsyncIterator[bytes]:
    """The log from `offset` as it grows, until the job ends; yields b"" on idle ticks.

    The job's status is read before the log: once a finished status has been seen, every byte
    the job wrote is already in the file, so reading to the end and stopping loses nothing.
    """
    manager.log_followers += 1
    try:
        while True:
            record = manager.store.get(job_id)
            over = record is None or job.is_terminal(record["status"]) or manager.stopping
            while size_of(path) > offset:
                data = await asyncio.to_thread(read, path, offset)
                if not data:
                    break
                offset += len(data)
                yield data
            if over:
                return
            yield b""
            await manager.wait_finished(job_id, POLL)
    finally:
        manager.log_followers -= 1


async def follow_text(manager: JobManager, job_id: str, path: Path,
                      offset: int) -> AsyncIterator[bytes]:
    """The raw bytes, for a chunked `text/plain` answer."""
    async for data in follow(manager, job_id, path, offset):
        if data:  # an empty chunk would end a chunked body
            yield data


def event(data: bytes, end_offset: int) -> bytes:
    """One SSE event holding whole lines; its id is the byte offset after them."""
    lines = _LINE_BREAK.split(data.decode("utf-8", "replace"))
    if len(lines) > 1 and lines[-1] == "":
        lines.pop()  # the text ended with a line break
    out = [f"id: {end_offset}", *(f"data: {line}" for line in lines)]
    return ("\n".join(out) + "\n\n").encode("utf-8")


def end_event(record: dict[str, Any] | None, offset: int) -> bytes:
    """The last event: how the job ended (a non-final status: the daemon is stopping)."""
    if record is None:
        info: dict[str, Any] = {"status": None, "message": "job deleted"}
    else:
        signum = record.get("signal")
        info = {"status": record["status"], "message": record.get("message", ""),
                "exit_code": record.get("exit_code"),
                "signal": job.signal_name(signum) if signum is not None else None}
    return f"event: end\nid: {offset}\ndata: {json.dumps(info)}\n\n".encode()


def _cut(pending: bytes, final: bool) -> int:
    """How many bytes of `pending` to send now: whole lines, or all when final or too much."""
    if final or len(pending) >= MAX_PENDING:
        return len(pending)
    newline = pending.rfind(b"\n")
    if newline >= 0:
        return newline + 1
    carriage = pending.rfind(b"\r", 0, len(pending) - 1)  # "\r" last may be half of "\r\n"
    return carriage + 1 if carriage >= 0 else 0


async def follow_events(manager: JobManager, job_id: str, path: Path,
                        offset: int) -> AsyncIterator[bytes]:
    """Server-Sent Events: whole lines with `id:` = byte offset, keep-alives, `event: end`."""
    loop = asyncio.get_running_loop()
    pending = b""
    sent = offset  # log offset up to which events were sent
    last = loop.time()
    yield b"retry: 1000\n\n"
    async for data in follow(manager, job_id, path, offset):
        pending += data
        cut = _cut(pending, final=False)
        if cut:
            sent += cut
            yield event(pending[:cut], sent)
            pending = pending[cut:]
            last = loop.time()
        elif loop.time() - last >= KEEPALIVE:
            yield b": keep-alive\n\n"
            last = loop.time()
    if pending:
        sent += len(pending)
        yield event(pending, sent)
    yield end_event(manager.store.get(job_id), sent)
