"""The native JSON API under `/api/v1` (ARCHITECTURE.md, "The native API"; `openapi.py`).

Wire format only: requests are translated onto `JobManager` operations, records into the
native job view (RFC 3339 times, signal names, redacted secrets). Errors always have the shape
`{"error": "<code>", "message": "...", "status": <http status>}`.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import zipfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from jobd import artifacts, auth, download, job, logs
from jobd.classic import BodyTooLarge, receive_upload
from jobd.files import remove
from jobd.manager import Conflict, JobManager, Locked, NotFound, parse_wait
from jobd.options import (
    DEFAULT_ENTRY,
    JobRequest,
    OptionError,
    from_form,
    parse_request,
    shown_params,
)
from jobd.store import JobExists

if TYPE_CHECKING:
    from jobd import multipart, pack
    from jobd.spec import Spec

PREFIX = "/api/v1"
MAX_LIMIT = 1000
DEFAULT_LIMIT = 50
ARCHIVE_FORMATS = {"zip": "application/zip", "tar.gz": "application/gzip"}

CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
         409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
         416: "range_not_satisfiable", 429: "too_many_requests", 507: "insufficient_storage"}

_READING = "error reading job from request: "  # the body scanner's prefix for broken JSON


class ApiError(Exception):
    """Ends a request with an error answer (raised from helpers, turned into JSON once)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def problem(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error shape of every protocol."""
    return JSONResponse({"error": CODES.get(status, "bad_request"), "message": message,
                         "status": status}, status, headers=headers)


def rfc3339(timestamp: float | None) -> str | None:
    """UTC with milliseconds and a `Z`: `2026-11-23T10:41:19.135Z`."""
    if timestamp is None:
        return None
    moment = datetime.fromtimestamp(timestamp, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def job_view(record: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """A job record as the native API shows it (the `Job` schema of openapi.py)."""
    options = record.get("options") or {}
    started, finished = record.get("started"), record.get("finished")
    duration = None
    if started is not None:
        end = finished if finished is not None else (time.time() if now is None else now)
        duration = round(max(0.0, end - started), 3)
    signum = record.get("signal")
    return {
        "id": record["id"], "status": record["status"], "message": record.get("message", ""),
        "created": rfc3339(record.get("created")), "started": rfc3339(started),
        "finished": rfc3339(finished), "duration": duration,
        "exit_code": record.get("exit_code"),
        "signal": job.signal_name(signum) if signum is not None else None,
        "attempt": int(record.get("attempt") or 0), "priority": int(record.get("priority") or 0),
        "labels": dict(record.get("labels") or {}),
        "entry": options.get("entry") or DEFAULT_ENTRY, "args": list(options.get("args") or []),
        "params": shown_params(options.get("params") or {}),
        "function": options.get("function"), "timeout": options.get("timeout"),
        "executor": record.get("executor") or "local", "protocol": record.get("protocol"),
        "input_size": record.get("input_size"), "output_size": record.get("output_size"),
        "spec": options.get("spec"),
    }


def _manager(request: Request) -> JobManager:
    return request.app.state.manager


def _record(request: Request) -> dict[str, Any]:
    try:
        return _manager(request).get(request.path_params["id"], auth.client_of(request))
    except NotFound:
        raise ApiError(404, "job not found") from None


def _check_query(request: Request, allowed: tuple[str, ...]) -> None:
    allowed = (*allowed, auth.SECRET_QUERY)  # a per-job secret may come with any request
    unknown = sorted(set(request.query_params) - set(allowed))
    if unknown:
        allowed_text = ", ".join(allowed) if allowed else "none"
        raise ApiError(400, f"unknown query parameter {', '.join(map(repr, unknown))} "
                            f"(allowed: {allowed_text})")


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query_params.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer, not {text!r}") from None
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low} and {high}, not {value}")
    return value


def _bool_param(request: Request, name: str) -> bool:
    text = request.query_params.get(name)
    if text is None:
        return False
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ApiError(400, f"{name} must be true or false, not {text!r}")


def endpoint(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
    """Turn ApiError into the error answer (one place, every route)."""

    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return problem(exc.status, exc.message, exc.headers)

    run.__name__ = handler.__name__
    run.__doc__ = handler.__doc__
    return run


# -- create -----------------------------------------------------------------------------------


@endpoint
async def create(request: Request) -> Response:
    """POST /api/v1/jobs: JSON (base64 zip in `input`) or multipart/form-data."""
    if _manager(request).config.locked:
        return problem(403, str(Locked()))
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        return await create_multipart(request)
    return await create_json(request)


async def create_multipart(request: Request) -> Response:
    """multipart/form-data create: file parts become the working directory (one archive part
    is unpacked), text fields are the same options as the JSON body."""
    from jobd import archive, multipart  # on first use: keeps an idle daemon's memory down

    manager = _manager(request)
    config = manager.config
    form_dir = manager.data.new_incoming(suffix=".form")
    input_zip = manager.data.new_incoming()
    try:
        form = await _form(request, form_dir, config.max_body)
        try:
            asked = parse_request(from_form(form.fields), executors=manager.executors())
        except OptionError as exc:
            return problem(400, str(exc))
        try:
            await asyncio.to_thread(multipart.build_input_zip, form, input_zip,
                                    limits=manager.limits, required=asked.entry,
                                    fsync=config.fsync)
        except archive.ArchiveError as exc:
            return problem(400, str(exc))
        return await _store_job(manager, asked, input_zip, auth.client_of(request))
    finally:
        await asyncio.to_thread(remove, form_dir, input_zip)


async def _form(request: Request, form_dir: Path, max_body: int) -> multipart.Form:
    """The multipart body, files on disk under `form_dir`; its faults are the client's."""
    from jobd import multipart  # on the first form: keeps an idle daemon's memory down

    try:
        return await multipart.receive_form(request, form_dir, max_body=max_body)
    except multipart.BodyTooLarge as exc:
        raise ApiError(413, str(exc)) from None
    except multipart.MultipartError as exc:
        raise ApiError(400, f"malformed multipart body: {exc}") from None


async def create_json(request: Request) -> Response:
    from jobd.upload import UploadError  # on first use: keeps an idle daemon's memory down

    manager = _manager(request)
    config = manager.config
    incoming = manager.data.new_incoming()
    try:
        try:
            fields, scanner = await receive_upload(request, incoming, config.max_body)
        except UploadError as exc:
            message = str(exc)
            if message.startswith(_READING):
                message = "the body is not a JSON object: " + message[len(_READING):]
            return problem(400, message)
        except BodyTooLarge:
            return problem(413, f"request body is larger than {config.max_body} bytes")
        try:
            asked = parse_request(fields, executors=manager.executors())
        except OptionError as exc:
            return problem(400, str(exc))
        if not scanner.found_input or scanner.input_size == 0:
            return problem(400, "input is required: the base64 of a zip holding the entry "
                                f"point ({asked.entry})")
        return await _store_job(manager, asked, incoming, auth.client_of(request))
    finally:
        if incoming.exists():
            incoming.unlink()


async def _store_job(manager: JobManager, asked: JobRequest, upload: Path,
                     client: auth.Client) -> Response:
    """Check the archive holds the entry point, then store the job (shared by both forms)."""
    from jobd import archive  # on first use: keeps an idle daemon's memory down

    job_id = asked.job_id or job.new_id()
    if manager.exists(job_id):
        return problem(409, f"job {job_id} already exists")
    try:
        await manager.check_input(upload, asked.entry)
    except archive.ArchiveError as exc:
        return problem(400, str(exc))
    try:
        record = await manager.create(job_id, upload, protocol="native", options=asked.options(),
                                      priority=asked.priority, labels=asked.labels,
                                      executor=asked.executor, owner=client.name,
                                      secret=asked.secret)
    except JobExists:
        return problem(409, f"job {job_id} already exists")
    except Locked as exc:
        return problem(403, str(exc))
    return JSONResponse(job_view(record), 201, headers={"Location": f"{PREFIX}/jobs/{job_id}"})


# -- list, inspect, delete, cancel, restart -----------------------------------------------------


@endpoint
async def list_jobs(request: Request) -> Response:
    """GET /api/v1/jobs?status=A,B&label=k=v&limit=50&cursor=C: newest first."""
    _check_query(request, ("status", "label", "limit", "cursor"))
    statuses = None
    wanted = [s.strip().upper() for text in request.query_params.getlist("status")
              for s in text.split(",") if s.strip()]
    if wanted:
        bad = [s for s in wanted if s not in job.STATUSES]
        if bad:
            raise ApiError(400, f"unknown status {', '.join(map(repr, bad))} "
                                f"(statuses: {', '.join(job.STATUSES)})")
        statuses = wanted
    labels: dict[str, str | None] = {}
    for text in request.query_params.getlist("label"):
        key, sep, value = text.partition("=")
        if not key:
            raise ApiError(400, f"label filter {text!r} must be key=value or key")
        labels[key] = value if sep else None
    limit = _int_param(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    cursor = request.query_params.get("cursor") or None
    client = auth.client_of(request)
    try:
        records, next_cursor = _manager(request).store.page(
            statuses=statuses, labels=labels or None, cursor=cursor, limit=limit,
            where=auth.visible_to(client), where_text=auth.visible_text(client))
    except ValueError:
        raise ApiError(400, f"invalid cursor {cursor!r}: use next_cursor of a listing") from None
    now = time.time()
    return JSONResponse({"jobs": [job_view(r, now) for r in records],
                         "next_cursor": next_cursor})


@endpoint
async def get_job(request: Request) -> Response:
    """GET /api/v1/jobs/{id}; `?wait=SECONDS` answers once the job is finished or that time
    has passed (a long poll)."""
    _check_query(request, ("wait",))
    try:
        wait = parse_wait(request.query_params.get("wait"))
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    record = _record(request)
    if wait and not job.is_terminal(record["status"]):
        await _manager(request).wait_result(record["id"], wait)
        record = _record(request)
    return JSONResponse(job_view(record))


@endpoint
async def delete_job(request: Request) -> Response:
    """DELETE /api/v1/jobs/{id}: 204; 409 while it runs."""
    _check_query(request, ())
    try:
        await _manager(request).delete(request.path_params["id"], client=auth.client_of(request))
    except NotFound:
        raise ApiError(404, "job not found") from None
    except Conflict as exc:
        raise ApiError(409, str(exc)) from None
    return Response(status_code=204)


@endpoint
async def cancel_job(request: Request) -> Response:
    """POST /api/v1/jobs/{id}/cancel: idempotent."""
    _check_query(request, ())
    try:
        record, changed = await _manager(request).cancel(request.path_params["id"],
                                                         client=auth.client_of(request))
    except NotFound:
        raise ApiError(404, "job not found") from None
    if changed:
        message = "job cancelled"
    else:
        message = f"job already finished ({record['status']}): nothing to cancel"
    return JSONResponse({"changed": changed, "message": message, "job": job_view(record)})


@endpoint
async def restart_job(request: Request) -> Response:
    """POST /api/v1/jobs/{id}/restart: a finished job runs again from its input."""
    _check_query(request, ())
    try:
        record = await _manager(request).restart(request.path_params["id"],
                                                 client=auth.client_of(request))
    except NotFound:
        raise ApiError(404, "job not found") from None
    except Conflict as exc:
        raise ApiError(409, str(exc)) from None
    return JSONResponse(job_view(record))


# -- logs ---------------------------------------------------------------------------------------


@endpoint
async def job_logs(request: Request) -> Response:
    """GET /api/v1/jobs/{id}/logs?offset=N&follow=true (SSE with Accept: text/event-stream)."""
    _check_query(request, ("offset", "follow"))
    record = _record(request)
    manager = _manager(request)
    path = manager.files(record["id"]).log
    offset = _int_param(request, "offset", 0, 0, 1 << 62)
    follow = _bool_param(request, "follow")
    if "text/event-stream" in request.headers.get("accept", ""):
        last_id = request.headers.get("last-event-id", "").strip()
        if last_id:
            if not last_id.isdigit():
                raise ApiError(400, f"Last-Event-ID must be a byte offset, not {last_id!r}")
            offset = int(last_id)
        return StreamingResponse(logs.follow_events(manager, record["id"], path, offset),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})
    if follow:
        return StreamingResponse(logs.follow_text(manager, record["id"], path, offset),
                                 media_type="text/plain; charset=utf-8",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})
    end = logs.size_of(path)
    chunks = await asyncio.to_thread(logs.read_range, path, offset, end) if end > offset else []
    body = b"".join(chunks)
    return Response(body, media_type="text/plain; charset=utf-8",
                    headers={"X-Next-Offset": str(offset + len(body))})


# -- files --------------------------------------------------------------------------------------


def _sources(manager: JobManager, record: dict[str, Any]) -> tuple[str, Path] | None:
    """Where the job's files are now: ("zip", result.zip) once finished, ("dir", work/) while
    it runs (or is kept), None before the first start."""
    files = manager.files(record["id"])
    if job.is_terminal(record["status"]) and files.result.is_file():
        return "zip", files.result
    if files.work.is_dir():
        return "dir", files.work
    if files.result.is_file():
        return "zip", files.result
    return None


def _file_entry(info: pack.FileInfo) -> dict[str, Any]:
    return {"path": info.path, "size": info.size, "mime": info.mime,
            "modified": rfc3339(info.mtime), "kind": info.kind}


@endpoint
async def list_files(request: Request) -> Response:
    """GET /api/v1/jobs/{id}/files: the working directory (live while the job runs)."""
    from jobd import pack  # on first use: keeps an idle daemon's memory down

    _check_query(request, ())
    manager = _manager(request)
    for _ in range(3):  # the job may finish (and its directory go) while we look
        record = _record(request)
        source = _sources(manager, record)
        if source is None:
            return JSONResponse({"files": [], "live": False})
        kind, path = source
        lister = pack.list_dir if kind == "dir" else pack.list_zip
        try:
            infos = await asyncio.to_thread(lister, path)
        except FileNotFoundError:
            continue
        return JSONResponse({"files": [_file_entry(i) for i in infos], "live": kind == "dir"})
    raise ApiError(409, "the job's files changed while they were listed: try again")


@endpoint
async def get_file(request: Request) -> Response:
    """GET /api/v1/jobs/{id}/files/{path}: one file, Range supported."""
    from jobd import pack  # on first use: keeps an idle daemon's memory down

    _check_query(request, ())
    manager = _manager(request)
    record = _record(request)
    rel = request.path_params["path"]
    source = _sources(manager, record)
    if source is None:
        raise ApiError(404, f"file {rel!r} not found: the job has not started")
    kind, path = source

    def opener() -> tuple[BinaryIO, pack.FileInfo]:
        if kind == "dir":
            return pack.open_child(path, rel)
        return pack.open_in_zip(path, rel)

    try:
        return await download.file_response(request, opener)
    except (FileNotFoundError, KeyError):
        raise ApiError(404, f"file {rel!r} not found") from None
    except IsADirectoryError:
        raise ApiError(400, f"{rel!r} is a directory: list it with the files call, or "
                            "download the archive") from None
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None


@endpoint
async def get_archive(request: Request) -> Response:
    """GET /api/v1/jobs/{id}/archive?format=zip|tar.gz: the whole working directory."""
    _check_query(request, ("format",))
    manager = _manager(request)
    record = _record(request)
    fmt = request.query_params.get("format", "zip").lower()
    if fmt == "tgz":
        fmt = "tar.gz"
    if fmt not in ARCHIVE_FORMATS:
        raise ApiError(400, f"format must be zip or tar.gz, not {fmt!r}")
    filename = f"{record['id']}.{fmt}"
    for _ in range(3):
        source = _sources(manager, record)
        if source is None:
            raise ApiError(409, f"job is {record['status']}: it has no working directory yet")
        kind, path = source
        if kind == "zip" and fmt == "zip":
            return await download.file_response(
                request, lambda p=path: _open_plain(p), media_type=ARCHIVE_FORMATS["zip"],
                filename=filename)
        try:
            body: Iterator[bytes] = await asyncio.to_thread(_stream, kind, path, fmt)
        except FileNotFoundError:
            record = _record(request)
            continue
        headers = {"Content-Disposition": f'attachment; filename="{filename}"',
                   "X-Live-Snapshot": "true" if kind == "dir" else "false"}
        return StreamingResponse(body, media_type=ARCHIVE_FORMATS[fmt], headers=headers)
    raise ApiError(409, "the job's files changed while the archive was prepared: try again")


def _stream(kind: str, path: Path, fmt: str) -> Iterator[bytes]:
    """The archive generator (its checks run here, before the answer starts)."""
    from jobd import pack  # on first use: keeps an idle daemon's memory down

    if fmt == "zip":
        return pack.iter_zip(path)
    return pack.iter_tar_gz(path)


def _open_plain(path: Path) -> tuple[BinaryIO, pack.FileInfo]:
    from jobd import pack  # on first use: keeps an idle daemon's memory down

    handle = open(path, "rb")  # noqa: SIM115 - closed by the response body
    st = os.fstat(handle.fileno())
    return handle, pack.FileInfo(path.name, st.st_size, st.st_mtime, "application/zip", "file")


# -- overview -----------------------------------------------------------------------------------


@endpoint
async def overview(request: Request) -> Response:
    """GET /api/v1/overview: counts, slots, queue, disk: all from in-memory indexes."""
    _check_query(request, ())
    manager = _manager(request)
    counts = manager.store.counts()
    running = manager.scheduler.running_count
    slots = manager.scheduler.slots
    oldest = manager.store.oldest_queued()
    now = time.time()
    try:
        fs = os.statvfs(manager.data.root)
        free, total = fs.f_bavail * fs.f_frsize, fs.f_blocks * fs.f_frsize
    except OSError as exc:
        raise ApiError(507, f"cannot read the data directory's filesystem: {exc}") from None
    return JSONResponse({
        "counts": {status: counts.get(status, 0) for status in job.STATUSES},
        "total": sum(counts.values()),
        "running": running, "slots": slots, "free_slots": max(0, slots - running),
        "queue_length": counts.get(job.QUEUED, 0),
        "oldest_queued_age": None if oldest is None else round(max(0.0, now - oldest), 3),
        "log_followers": manager.log_followers,
        "disk": {"jobs_bytes": manager.stored_bytes(), "free_bytes": free, "total_bytes": total},
    })


# -- specs and artifacts ------------------------------------------------------------------------

SPEC_FIELDS = ("id", "input", "params", "labels", "priority", "timeout", "secret")


def _spec(request: Request) -> Spec:
    spec = _manager(request).specs.get(request.path_params["name"])
    if spec is None:
        raise ApiError(404, "spec not found")
    return spec


@endpoint
async def list_specs(request: Request) -> Response:
    specs = _manager(request).specs
    return JSONResponse({"specs": [specs[name].describe() for name in sorted(specs)]})


@endpoint
async def get_spec(request: Request) -> Response:
    return JSONResponse(_spec(request).describe())


@endpoint
async def create_from_spec(request: Request) -> Response:
    """POST /api/v1/specs/{name}/jobs: parameter values (and optional files) make a job."""
    # Imported on first use: keeps an idle daemon's memory down.
    from jobd import archive, multipart
    from jobd.spec import ParamError
    from jobd.upload import UploadError

    spec = _spec(request)
    manager = _manager(request)
    config = manager.config
    form_dir = manager.data.new_incoming(suffix=".form")
    incoming = manager.data.new_incoming()
    try:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media == "multipart/form-data":
            form = await _form(request, form_dir, config.max_body)
            fields = _spec_form_fields(form.fields)
            if form.files:
                await _build_zip(multipart.build_input_zip, form, incoming,
                                 limits=manager.limits, required=None, fsync=config.fsync)
        else:
            try:
                fields, scanner = await receive_upload(request, incoming, config.max_body)
            except UploadError as exc:
                return problem(400, str(exc).replace(_READING, "the body is not a JSON object: "))
            except BodyTooLarge:
                return problem(413, f"request body is larger than {config.max_body} bytes")
            if not scanner.found_input or scanner.input_size == 0:
                incoming.unlink()
        unknown = sorted(set(fields) - set(SPEC_FIELDS))
        if unknown:
            return problem(400, f"unknown field {unknown[0]!r} (allowed: "
                                f"{', '.join(SPEC_FIELDS)})")
        try:
            asked = parse_request({k: v for k, v in fields.items() if k != "params"})
        except OptionError as exc:
            return problem(400, str(exc))
        params = fields.get("params") or {}
        if not isinstance(params, dict):
            return problem(400, "params must be an object of parameter values")
        try:
            values = spec.values(params)
        except ParamError as exc:
            return problem(400, str(exc))
        if not incoming.exists():
            _empty_zip(incoming)
        names = await _build_zip(archive.check_zip, incoming, manager.limits, None)
        present = {name.rstrip("/") for name in names}
        for path in spec.files(values):
            if path not in present:
                name = next(n for n, v in values.items() if v == path)
                return problem(400, f"parameter '{name}': file '{path}' is not among the "
                                    "uploaded files")
        options = {"spec": spec.name, "entry": None, "command": spec.argv(values),
                   "pass_env": list(spec.env), "limits": dict(spec.limits),
                   "params": {name.upper(): _param_text(value) for name, value in values.items()},
                   "timeout": asked.timeout or spec.timeout}
        job_id = asked.job_id or job.new_id()
        try:
            record = await manager.create(
                job_id, incoming, protocol="native", options=options,
                priority=asked.priority if "priority" in fields else spec.priority,
                labels=asked.labels, executor=spec.executor,
                owner=auth.client_of(request).name, secret=asked.secret)
        except JobExists:
            return problem(409, f"job {job_id} already exists")
        return JSONResponse(job_view(record), 201, headers={"Location": f"{PREFIX}/jobs/{job_id}"})
    finally:
        await asyncio.to_thread(remove, form_dir, incoming)


async def _build_zip(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run an archive step in a thread; its ArchiveError is the client's 400."""
    from jobd import archive  # on first use: keeps an idle daemon's memory down

    try:
        return await asyncio.to_thread(function, *args, **kwargs)
    except archive.ArchiveError as exc:
        raise ApiError(400, str(exc)) from None


def _spec_form_fields(texts: dict[str, str]) -> dict[str, Any]:
    """Form fields: id, labels, priority, timeout and params (JSON) as in a JSON body; any
    other text field is the value of the parameter of that name."""
    options = {"id", "labels", "priority", "timeout", "secret"}  # files: parts, not `input`
    fields = from_form({k: v for k, v in texts.items() if k.lower() in options})
    params: dict[str, Any] = {}
    if "params" in {k.lower() for k in texts}:
        raw = next(v for k, v in texts.items() if k.lower() == "params")
        try:
            params = json.loads(raw)
        except ValueError as exc:
            raise ApiError(400, f"field 'params' must be JSON text: {exc}") from None
    for key, value in texts.items():
        if key.lower() not in options and key.lower() != "params":
            params[key] = value
    fields["params"] = params
    return fields


def _param_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _empty_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w"):
        pass  # a spec job without uploaded files still has an input (restart, recovery)


@endpoint
async def list_artifacts(request: Request) -> Response:
    manager = _manager(request)
    record = _record(request)
    if job.is_terminal(record["status"]):
        found = record.get("artifacts") or []
    else:
        work = manager.files(record["id"]).work
        found = await asyncio.to_thread(artifacts.collect, work) if work.is_dir() else []
    return JSONResponse({"artifacts": found})


routes = [
    Route(f"{PREFIX}/jobs", create, methods=["POST"]),
    Route(f"{PREFIX}/jobs", list_jobs, methods=["GET"]),
    Route(f"{PREFIX}/jobs/{{id}}", get_job, methods=["GET"]),
    Route(f"{PREFIX}/jobs/{{id}}", delete_job, methods=["DELETE"]),
    Route(f"{PREFIX}/jobs/{{id}}/cancel", cancel_job, methods=["POST"]),
    Route(f"{PREFIX}/jobs/{{id}}/restart", restart_job, methods=["POST"]),
    Route(f"{PREFIX}/jobs/{{id}}/logs", job_logs, methods=["GET"]),
    Route(f"{PREFIX}/jobs/{{id}}/files", list_files, methods=["GET"]),
    Route(f"{PREFIX}/jobs/{{id}}/files/{{path:path}}", get_file, methods=["GET"]),
    Route(f"{PREFIX}/jobs/{{id}}/archive", get_archive, methods=["GET"]),
    Route(f"{PREFIX}/overview", overview, methods=["GET"]),
    Route(f"{PREFIX}/jobs/{{id}}/artifacts", list_artifacts, methods=["GET"]),
    Route(f"{PREFIX}/specs", list_specs, methods=["GET"]),
    Route(f"{PREFIX}/specs/{{name}}", get_spec, methods=["GET"]),
    Route(f"{PREFIX}/specs/{{name}}/jobs", create_from_spec, methods=["POST"]),
]
