"""The classic jobd protocol: `POST /api/upload` and `GET /api/get/{id}`.

Wire format only (see ../shared/spec/wire-compat.md section 1): capitalised record keys, the
`{"error", "message", "status"}` error shape, 202 while a job is not finished and 200 for every
terminal status. Uploads stream to disk and results stream from disk, so memory stays flat.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from jobd import auth, job, limits
from jobd.limits import BodyTooLarge
from jobd.manager import InvalidOptions, JobManager, Locked, NotFound, Rejected, parse_wait
from jobd.store import JobExists

if TYPE_CHECKING:
    from jobd.upload import ClassicBodyScanner

# Results up to this size are encoded in one go; larger ones stream in chunks.
_INLINE_RESULT = 256 * 1024


def error(status: int, kind: str, message: str,
          headers: dict[str, str] | None = None) -> JSONResponse:
    """The classic error shape."""
    return JSONResponse({"error": kind, "message": message, "status": status}, status,
                        headers=headers)


def bad_request(message: str) -> JSONResponse:
    return error(400, "bad_request", message)


def rejected(exc: Rejected) -> JSONResponse:
    """Queue full (429 + Retry-After), disk full (507), a bad option (400)."""
    if isinstance(exc, InvalidOptions):
        return bad_request(f"error validating job {exc.message}")
    response = error(exc.status, exc.code, exc.message)
    response.headers.update(exc.headers)
    return response


def extra_options(fields: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]] | str:
    """The optional keys jobd adds to the classic upload (the Go jobd ignores unknown keys):
    `priority` (integer, higher first), `timeout` (seconds or "5m"), `labels` (object of
    strings), `limits` (object, see resources.py). (priority, labels, options), or the problem."""
    priority = fields.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        return "priority must be an integer"
    labels = fields.get("labels") or {}
    if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        return "labels must be an object of strings"
    options: dict[str, Any] = {}
    for key in ("timeout", "limits"):
        if fields.get(key) is not None:
            options[key] = fields[key]
    return priority, labels, options


def rfc3339(timestamp: float) -> str:
    """Go's RFC 3339 with nanoseconds, as the classic jobd's LastUpdated."""
    whole = int(timestamp)
    nanos = round((timestamp - whole) * 1e9)
    if nanos >= 1_000_000_000:
        whole, nanos = whole + 1, nanos - 1_000_000_000
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    if nanos:
        text += "." + f"{nanos:09d}".rstrip("0")
    return text + "Z"


def record_head(record: dict[str, Any]) -> dict[str, Any]:
    """The fields before `Output`, in the Go struct's order."""
    return {"LastUpdated": rfc3339(record["updated"]), "ID": record["id"],
            "Status": record["status"], "Path": "", "Input": ""}


def record_tail(record: dict[str, Any]) -> dict[str, Any]:
    """The fields after `Output`."""
    options = record.get("options") or {}
    return {"Message": record.get("message", ""), "SlurmID": record.get("slurm_id") or 0,
            "Slurml": bool(options.get("slurml", False)) or record.get("executor") == "slurm"}


def classic_record(record: dict[str, Any], output: str = "") -> dict[str, Any]:
    return {**record_head(record), "Output": output, **record_tail(record)}


def result_response(record: dict[str, Any], result: Path, status: int) -> Response:
    """The record with the base64 of result.zip as `Output`, streamed from disk."""
    try:
        size = result.stat().st_size
    except FileNotFoundError:
        return JSONResponse(classic_record(record), status)
    if size <= _INLINE_RESULT:
        output = base64.b64encode(result.read_bytes()).decode("ascii")
        return JSONResponse(classic_record(record, output), status)
    from jobd import pack  # on first use: keeps an idle daemon's memory down

    head = json.dumps(record_head(record))[:-1].encode() + b', "Output": "'
    tail = b'", ' + json.dumps(record_tail(record))[1:].encode()
    length = len(head) + pack.base64_size(size) + len(tail)

    def chunks() -> Iterator[bytes]:
        yield head
        yield from pack.iter_base64(result)
        yield tail

    return StreamingResponse(chunks(), status, media_type="application/json",
                             headers={"Content-Length": str(length)})


async def receive_upload(request: Request, dest: Path,
                         max_body: int) -> tuple[dict[str, Any], ClassicBodyScanner]:
    """Scan the JSON body, streaming `input`'s base64 into `dest` as raw bytes.

    The body is read through `limits.body`: BodyTooLarge past `max_body`, BodyTimeout for a
    client that sends too slowly. Not synced: `JobManager.create` syncs the input it keeps.
    """
    from jobd.upload import ClassicBodyScanner  # on first use: keeps an idle daemon's memory down

    with open(dest, "wb") as sink:
        scanner = ClassicBodyScanner(sink)
        async for chunk in limits.body(request, max_body):
            scanner.feed(chunk)
        fields = scanner.finish()
    return fields, scanner


async def upload(request: Request) -> Response:
    # Imported on first use: keeps an idle daemon's memory down.
    from jobd import archive
    from jobd.upload import UploadError

    manager: JobManager = request.app.state.manager
    config = manager.config
    if config.locked:
        return error(403, "forbidden", str(Locked()))
    declared = request.headers.get("content-length", "")
    try:  # before reading the body: a full queue or disk answers at once
        manager.admit(int(declared) * 3 // 4 if declared.isdigit() else 0)
    except Rejected as exc:
        return rejected(exc)
    incoming = manager.data.new_incoming()
    try:
        try:
            fields, scanner = await receive_upload(request, incoming, config.max_body)
        except UploadError as exc:
            message = str(exc)
            if not message.startswith("error reading job"):  # the JSON was fine, the input not
                message = f"error validating job {message}"
            return bad_request(message)
        except BodyTooLarge:
            return error(413, "request_entity_too_large",
                         f"request body is larger than {config.max_body} bytes", limits.CLOSE)
        job_id = fields.get("id")
        problem = job.id_problem(job_id)
        if problem:
            return bad_request(f"error validating job {problem}")
        if manager.exists(job_id):
            return bad_request("job already exists")
        slurml = fields.get("slurml", False)
        if not isinstance(slurml, bool):
            return bad_request("error validating job slurml must be true or false")
        secret = fields.get("secret")  # an extension: the Go jobd ignores unknown keys
        if secret is not None:
            problem = auth.secret_problem(secret)
            if problem:
                return bad_request(f"error validating job {problem}")
        extra = extra_options(fields)
        if isinstance(extra, str):
            return bad_request(f"error validating job {extra}")
        priority, labels, options = extra
        if not scanner.found_input or scanner.input_size == 0:
            return bad_request("error validating job input is required")
        try:
            await manager.check_input(incoming)
        except archive.ArchiveError as exc:
            return bad_request(f"error validating job {exc}")
        executor = "slurm" if slurml else config.executor
        try:
            record = await manager.create(job_id, incoming, protocol="classic",
                                          options={"slurml": slurml, **options},
                                          priority=priority, labels=labels, executor=executor,
                                          owner=auth.client_of(request).name, secret=secret)
        except JobExists:
            return bad_request("job already exists")
        except Rejected as exc:
            return rejected(exc)
        except ValueError as exc:  # the executor is not available, or refuses the options
            return bad_request(f"error validating job {exc}")
        return JSONResponse(classic_record(record), 201)
    finally:
        if incoming.exists():
            incoming.unlink()


async def get(request: Request) -> Response:
    """The classic poll; `?wait=SECONDS` (an extension) holds the answer until the job is
    finished or that time has passed, so a client need not poll in a tight loop."""
    manager: JobManager = request.app.state.manager
    try:
        wait = parse_wait(request.query_params.get("wait"))
    except ValueError as exc:
        return bad_request(str(exc))
    client = auth.client_of(request)
    try:
        record = manager.get(request.path_params["id"], client)
        if wait and not job.is_terminal(record["status"]):
            await manager.wait_result(record["id"], wait)
            record = manager.get(record["id"], client)
    except NotFound:
        return error(404, "not_found", "job not found")
    if not job.is_terminal(record["status"]):
        return error(202, "no_content", "job not ready")
    return result_response(record, manager.files(record["id"]).result, 200)


routes = [
    Route("/api/upload", upload, methods=["POST"]),
    Route("/api/get/{id}", get, methods=["GET"]),
]
