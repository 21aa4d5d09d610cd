"""Serving a file (a job's file, a result zip) with HTTP Range support (single ranges).

Files are read in chunks by a plain generator, which Starlette runs in its threadpool, so a
slow disk never holds the event loop; the file is closed when the body ends or the client goes
away (the generator is closed then).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from email.utils import formatdate
from typing import TYPE_CHECKING, BinaryIO, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

if TYPE_CHECKING:
    from jobd.pack import FileInfo

CHUNK = 1 << 20
_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*")


class Unsatisfiable(ValueError):
    """The Range asks for bytes the file does not have (416)."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The (first, last) byte asked for, inclusive; None means the whole file.

    Single ranges only: a list of ranges or a malformed header is ignored, as RFC 9110 allows
    (the whole file is sent with 200). Unsatisfiable ranges raise Unsatisfiable.
    """
    if not header:
        return None
    match = _RANGE.fullmatch(header)
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # the last N bytes
        count = int(last)
        if count == 0 or size == 0:
            raise Unsatisfiable(header)
        return max(0, size - count), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None  # invalid: ignored
    if start >= size:
        raise Unsatisfiable(header)
    return start, min(end, size - 1)


def etag(info: FileInfo) -> str:
    return f'"{info.size:x}-{int(info.mtime * 1_000_000):x}"'


def _read(handle: BinaryIO, start: int, length: int) -> Iterator[bytes]:
    try:
        if start:
            handle.seek(start)
        remaining = length
        while remaining > 0:
            data = handle.read(min(CHUNK, remaining))
            if not data:
                return  # the file shrank while it was sent; the connection reports it
            remaining -= len(data)
            yield data
    finally:
        handle.close()


async def file_response(request: Request, opener: Callable[[], tuple[BinaryIO, FileInfo]], *,
                        media_type: str | None = None, filename: str | None = None,
                        ) -> Response:
    """The file `opener` opens (in a thread), whole or the Range asked for.

    `If-Range` with a stale ETag or date sends the whole file, so a resumed download never
    mixes two versions. Opening errors propagate to the caller, which maps them to 4xx.
    """
    handle, info = await asyncio.to_thread(opener)
    tag = etag(info)
    # A job's files are the job's content, not jobd's: a browser must not run an HTML file of
    # a job as a page of the daemon's origin, nor guess a type other than the one sent.
    headers = {"Accept-Ranges": "bytes", "ETag": tag,
               "Last-Modified": formatdate(info.mtime, usegmt=True),
               "Content-Security-Policy": "sandbox", "X-Content-Type-Options": "nosniff"}
    if filename is not None:
        headers["Content-Disposition"] = f'attachment; filename="{_quoted(filename)}"'
    wanted = None
    if_range = request.headers.get("if-range")
    if if_range is None or if_range in (tag, headers["Last-Modified"]):
        try:
            wanted = parse_range(request.headers.get("range"), info.size)
        except Unsatisfiable:
            handle.close()
            return JSONResponse({"error": "range_not_satisfiable",
                                 "message": f"range {request.headers.get('range')!r} is "
                                            f"outside the file ({info.size} bytes)",
                                 "status": 416}, 416,
                                headers={"Content-Range": f"bytes */{info.size}"})
    status, start, length = 200, 0, info.size
    if wanted is not None:
        start, last = wanted
        length = last - start + 1
        status = 206
        headers["Content-Range"] = f"bytes {start}-{last}/{info.size}"
    headers["Content-Length"] = str(length)
    if request.method == "HEAD":
        handle.close()
        return Response(None, status, headers=headers, media_type=media_type or info.mime)
    return StreamingResponse(_read(handle, start, length), status, headers=headers,
                             media_type=media_type or info.mime)


def _quoted(name: str) -> str:
    """A filename safe inside a quoted header value (ids are plain ASCII anyway)."""
    return "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_"
                   for c in name)
