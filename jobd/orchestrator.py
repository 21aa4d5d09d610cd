"""The job-orchestrator client protocol (../shared/spec/wire-compat.md section 2).

A job-orchestrator server dispatches work to execution hosts ("clients") with `POST /submit`,
polls `GET /retrieve/{id}` until the payload is `Completed`, and may call
`GET /retrieve_partial/{id}`, `POST /kill/{id}` and `GET /load`. This module maps those calls
onto jobd's jobs and nothing else: the rules live in JobManager.

Mapping decisions:
- Ids are unsigned integers chosen by jobd (`JobManager.new_numeric_id`: persisted, never
  reused, below 2**32) and are the job ids, as decimal strings. Any job whose id is such a
  number is reachable here, whatever protocol created it.
- Statuses: QUEUED and PREPARED -> Prepared, RUNNING -> Running, SUCCESS -> Completed,
  FAILED -> Failed, CANCELLED -> Killed.
- `Invalid`: a body that is well-formed multipart but cannot make a job (no run.sh, an unsafe
  archive, an unusable or duplicate file name) is still answered 200 with an id, as the
  protocol expects; the job is recorded as FAILED with `options.invalid` set
  (`JobManager.create_invalid`) and shown as `Invalid`. A malformed body is a 400.
- `Cleaned`: a numeric id that was handed out but whose job is gone (deleted, or removed by
  retention) answers 200 with status `Cleaned`, so an orchestrator polling it stops; an id
  never handed out is a 404.
- `loc` is the absolute path of the job's working directory, `DATAPATH/<id>/work`. `pid` is the
  process id of run.sh while the job runs here, else 0; `killed` is true for `Killed`.
- `/retrieve_partial` of a job not started yet serves its input.zip (what the working
  directory will hold); of an `Invalid` or cleaned job, an empty zip.
- Errors use jobd's one error shape `{"error", "message", "status"}`; `/kill` answers an
  empty 200 for a job that already ended (nothing left to kill).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import shutil
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from jobd import __version__, auth, job
from jobd.cpu import CpuLoad
from jobd.manager import JobManager, Locked, NotFound

log = logging.getLogger("jobd.orchestrator")

STATUS = {
    job.QUEUED: "Prepared", job.PREPARED: "Prepared", job.RUNNING: "Running",
    job.SUCCESS: "Completed", job.FAILED: "Failed", job.CANCELLED: "Killed",
}
INVALID = "Invalid"
CLEANED = "Cleaned"
EMPTY_ZIP = b"PK\x05\x06" + b"\x00" * 18
_CHUNK = 1 << 20
_KILL_MARGIN = 10.0  # seconds a kill may take beyond the kill grace before it is a failure

_cpu = CpuLoad()


def error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": kind, "message": message, "status": status}, status)


def payload_status(record: dict[str, Any]) -> str:
    if job.is_invalid(record):
        return INVALID
    return STATUS[record["status"]]


def payload(manager: JobManager, job_id: str, status: str) -> dict[str, Any]:
    """The payload record, in the orchestrator's field order."""
    return {"id": int(job_id), "status": status,
            "loc": os.path.abspath(manager.files(job_id).work),
            "pid": (manager.pid(job_id) or 0) if status == "Running" else 0,
            "killed": status == "Killed"}


def numeric_id(request: Request) -> str | None:
    """The id in the path, as the canonical decimal job id, or None if it is not a u32."""
    text = request.path_params["id"]
    if not (text.isdigit() and text.isascii()) or len(text) > 10:
        return None
    value = int(text)
    return str(value) if value < 2**32 else None


def _lookup(request: Request) -> tuple[str, dict[str, Any] | None] | Response:
    """(job id, record or None when cleaned), or the 404 answer."""
    manager: JobManager = request.app.state.manager
    job_id = numeric_id(request)
    if job_id is None:
        return error(404, "not_found", "payload not found")
    try:
        return job_id, manager.get(job_id, auth.client_of(request))
    except NotFound:
        if manager.numeric_id_issued(job_id) and not manager.exists(job_id):
            return job_id, None
        return error(404, "not_found", "payload not found")


def _payload_route(
    handler: Callable[[Request, JobManager, str, dict[str, Any] | None], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """A route on /{id}: every one resolves the id by the same rules (_lookup) before the
    handler sees it, so an unknown id or another client's job is answered alike everywhere."""

    @functools.wraps(handler)
    async def route(request: Request) -> Response:
        found = _lookup(request)
        if isinstance(found, Response):
            return found
        job_id, record = found
        return await handler(request, request.app.state.manager, job_id, record)

    return route


def _open_zip(path: Path) -> StreamingResponse | None:
    """A zip file on disk as a response, opened now (a later delete cannot cut it short)."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the generator
    except FileNotFoundError:
        return None
    size = os.fstat(f.fileno()).st_size

    def chunks() -> Iterator[bytes]:
        with f:
            while True:
                data = f.read(_CHUNK)
                if not data:
                    return
                yield data

    return StreamingResponse(chunks(), media_type="application/zip",
                             headers={"Content-Length": str(size)})


def _zip_bytes(data: bytes) -> Response:
    return Response(data, media_type="application/zip")


# -- routes -----------------------------------------------------------------------------------


async def submit(request: Request) -> Response:
    from jobd import archive, multipart  # on first use: keeps an idle daemon's memory down

    manager: JobManager = request.app.state.manager
    config = manager.config
    if config.locked:
        return error(403, "forbidden", str(Locked()))
    form_dir = manager.data.new_incoming(suffix=".form")
    input_zip = manager.data.new_incoming()
    try:
        invalid = None
        try:
            form = await multipart.receive_form(request, form_dir, max_body=config.max_body)
        except multipart.BodyTooLarge as exc:
            return error(413, "request_entity_too_large", str(exc))
        except multipart.UnsafeFilename as exc:
            invalid = str(exc)
        except multipart.MultipartError as exc:
            return error(400, "bad_request", f"malformed multipart body: {exc}")
        else:
            if form.fields:
                log.info("submit: ignoring text fields %s (only file parts are used)",
                         ", ".join(sorted(form.fields)))
            try:
                await asyncio.to_thread(multipart.build_input_zip, form, input_zip,
                                        limits=manager.limits, fsync=config.fsync)
            except archive.ArchiveError as exc:
                invalid = str(exc)
        job_id = manager.new_numeric_id()
        if invalid is not None:
            record = await manager.create_invalid(job_id, invalid, protocol="orchestrator",
                                                  owner=auth.client_of(request).name)
        else:
            record = await manager.create(job_id, input_zip, protocol="orchestrator",
                                          owner=auth.client_of(request).name)
        return JSONResponse(payload(manager, job_id, payload_status(record)))
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return error(507, "insufficient_storage", f"no space left for the upload: {exc}")
        raise
    finally:
        await asyncio.to_thread(_remove, form_dir, input_zip)


def _remove(*paths: Path) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


@_payload_route
async def retrieve(request: Request, manager: JobManager, job_id: str,
                   record: dict[str, Any] | None) -> Response:
    if record is None:
        return JSONResponse(payload(manager, job_id, CLEANED))
    status = payload_status(record)
    if status == "Completed":
        response = _open_zip(manager.files(job_id).result)
        if response is not None:
            return response
        status = CLEANED  # deleted between the lookup and the open
    return JSONResponse(payload(manager, job_id, status))


@_payload_route
async def retrieve_partial(request: Request, manager: JobManager, job_id: str,
                           record: dict[str, Any] | None) -> Response:
    if record is None or job.is_invalid(record):
        return _zip_bytes(EMPTY_ZIP)
    files = manager.files(job_id)
    if record["status"] in job.ACTIVE:
        from jobd import pack  # on first use: keeps an idle daemon's memory down

        try:
            chunks = await asyncio.to_thread(pack.iter_zip, files.work)  # it starts packing
        except OSError:
            log.debug("job %s: no working directory to snapshot", job_id)
        else:
            return StreamingResponse(chunks, media_type="application/zip")
    for path in (files.result, files.input):  # finished; or not started yet
        response = _open_zip(path)
        if response is not None:
            return response
    return _zip_bytes(EMPTY_ZIP)


@_payload_route
async def kill(request: Request, manager: JobManager, job_id: str,
               record: dict[str, Any] | None) -> Response:
    if record is None:
        return error(404, "not_found", "payload was cleaned")
    wait = manager.config.kill_grace + _KILL_MARGIN
    try:
        cancel = manager.cancel(job_id, client=auth.client_of(request))
        record, _ = await asyncio.wait_for(asyncio.shield(cancel), wait)
    except NotFound:
        return Response(status_code=200)  # deleted meanwhile: nothing left to kill
    except asyncio.TimeoutError:
        log.error("job %s: still running %.0fs after the kill", job_id, wait)
        return error(500, "kill_failed", f"the payload did not stop within {wait:g}s")
    if not job.is_terminal(record["status"]):
        return error(500, "kill_failed", f"the payload is still {record['status']}")
    return Response(status_code=200)


async def load(request: Request) -> Response:
    return JSONResponse(await _cpu.percent())


async def root(request: Request) -> Response:
    return JSONResponse({"name": "jobd", "version": __version__})


routes = [
    Route("/", root, methods=["GET"]),
    Route("/submit", submit, methods=["POST"]),
    Route("/retrieve/{id}", retrieve, methods=["GET"]),
    Route("/retrieve_partial/{id}", retrieve_partial, methods=["GET"]),
    Route("/kill/{id}", kill, methods=["POST"]),
    Route("/load", load, methods=["GET"]),
]
