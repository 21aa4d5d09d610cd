"""The OpenAPI 3.1 document of jobd, written by hand, and the offline page that renders it.

Hand-written on purpose: it is the contract clients (and the CLI) are built against, so it is
reviewed like code rather than derived from it. The test suite checks every JSON answer it
receives against the schemas here, so the document cannot drift from what jobd does.
`GET /openapi.json` serves it; `GET /docs` serves `static/docs.html`, a small self-contained page
(no CDN, no bundle) that renders it.
"""

from __future__ import annotations

import functools
import pkgutil
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from jobd import __version__, job
from jobd.api import CODES
from jobd.options import FIELDS, MAX_LABELS, MAX_PARAMS

# -- building blocks -----------------------------------------------------------------------------


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(kind: str, **extra: Any) -> dict[str, Any]:
    return {"type": [kind, "null"], **extra}


def json_content(schema: dict[str, Any], example: Any = None,
                 examples: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"schema": schema}
    if example is not None:
        body["example"] = example
    if examples is not None:
        body["examples"] = {name: {"value": value} for name, value in examples.items()}
    return {"application/json": body}


def error(description: str, status: int, message: str,
          schema: str = "Error", code: str | None = None) -> dict[str, Any]:
    example = {"error": code or {202: "no_content", **CODES}[status], "message": message,
               "status": status}
    return {"description": description, "content": json_content(ref(schema), example)}


def job_id_param() -> dict[str, Any]:
    return {"name": "id", "in": "path", "required": True, "description": "The job id.",
            "schema": {"type": "string", "pattern": ID_PATTERN}, "example": "fold-42"}


def wait_param() -> dict[str, Any]:
    return {"name": "wait", "in": "query", "description": "A long poll: hold the answer until "
            "the job is finished, at most this many seconds (or until jobd begins to stop), "
            "instead of polling in a loop.",
            "schema": {"type": "number", "minimum": 0, "maximum": 300}, "example": 30}


def no_query_note() -> str:
    return "Unknown query parameters are a 400."


ID_PATTERN = "^" + job.ID_PATTERN.pattern + "$"
DATE_TIME = {"type": "string", "format": "date-time"}
NOT_FOUND = error("No job with that id.", 404, "job not found")
BAD_QUERY = error("A query parameter is unknown or malformed.", 400,
                  "unknown query parameter 'x' (allowed: none)")

JOB_EXAMPLE = {
    "id": "fold-42", "status": "RUNNING", "message": "job running",
    "created": "2026-11-23T10:41:19.135Z", "started": "2026-11-23T10:41:19.201Z",
    "finished": None, "duration": 1.25, "exit_code": None, "signal": None, "attempt": 1,
    "priority": 0, "labels": {"project": "p1"}, "entry": "run.sh", "args": ["--fast"],
    "params": {"N": 3, "API_TOKEN": "<redacted>"}, "function": None, "timeout": 3600.0,
    "executor": "local", "protocol": "native", "input_size": 1234, "output_size": None,
    "spec": None,
}
FINISHED_EXAMPLE = {**JOB_EXAMPLE, "status": "FAILED",
                    "message": "could not finish the job, error: signal: SIGKILL (9)",
                    "finished": "2026-11-23T10:41:20.451Z", "exit_code": None,
                    "signal": "SIGKILL", "output_size": 5678}
QUEUED_EXAMPLE = {**JOB_EXAMPLE, "status": "QUEUED", "message": "job queued", "started": None,
                  "duration": None, "attempt": 0}

# -- schemas -------------------------------------------------------------------------------------

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "description": "The one error shape of every protocol.",
        "required": ["error", "message", "status"],
        "additionalProperties": False,
        "properties": {
            "error": {"type": "string", "enum": [
                "bad_request", "unauthorized", "forbidden", "not_found", "conflict",
                "payload_too_large", "unsupported_media_type", "range_not_satisfiable",
                "too_many_requests", "insufficient_storage", "method_not_allowed"]},
            "message": {"type": "string", "description": "What is wrong, for people."},
            "status": {"type": "integer", "description": "The HTTP status, repeated."},
        },
    },
    "Job": {
        "type": "object",
        "description": "A job as the native API shows it. Times are RFC 3339 in UTC.",
        "required": list(JOB_EXAMPLE),
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string", "pattern": ID_PATTERN},
            "status": {"type": "string", "enum": list(job.STATUSES),
                       "description": "QUEUED, PREPARED and RUNNING are active; SUCCESS, "
                                      "FAILED and CANCELLED are final."},
            "message": {"type": "string", "description": "Why the job has its status, such as "
                        "`could not finish the job, error: exit status 3`."},
            "created": DATE_TIME,
            "started": nullable("string", format="date-time",
                                description="Start of the current (last) attempt."),
            "finished": nullable("string", format="date-time"),
            "duration": nullable("number", minimum=0, description="Seconds from started to "
                                 "finished, or to now while it runs."),
            "exit_code": nullable("integer"),
            "signal": nullable("string", description="The signal that ended the job, by name "
                               "(`SIGKILL`)."),
            "attempt": {"type": "integer", "minimum": 0,
                        "description": "How many times it was started."},
            "priority": {"type": "integer", "description": "Higher starts first."},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "entry": {"type": "string", "description": "The entry point, relative to the "
                      "working directory."},
            "args": {"type": "array", "items": {"type": "string"}},
            "params": {"type": "object",
                       "additionalProperties": {"type": ["string", "integer"]},
                       "description": "Named parameters (environment variables "
                                      "`JOBD_PARAM_<NAME>`). Values of names that look like "
                                      "credentials (containing SECRET, TOKEN, PASSWORD, "
                                      "CREDENTIAL, PRIVATE, API_KEY, ... or ending in _KEY) "
                                      "are shown as `<redacted>`."},
            "function": nullable("string", description="The Python function called instead "
                                 "of running the entry as a script."),
            "timeout": nullable("number", description="The job's own wall-clock limit in "
                                "seconds; null: the daemon's JOBD_TIMEOUT."),
            "executor": {"type": "string"},
            "protocol": {"type": "string", "enum": ["classic", "native", "orchestrator"],
                         "description": "The protocol the job was submitted with."},
            "input_size": nullable("integer", minimum=0),
            "output_size": nullable("integer", minimum=0,
                                    description="Bytes of the result zip, once packed."),
            "spec": nullable("string", description="The job spec it was created from."),
        },
    },
    "Artifact": {
        "type": "object", "additionalProperties": False,
        "required": ["name", "path", "size", "mime", "sha256"],
        "properties": {
            "name": {"type": "string", "description": "Path inside artifacts/."},
            "path": {"type": "string", "description": "Path in the working directory (for "
                                                       "`/files/{path}`)."},
            "size": {"type": "integer", "minimum": 0}, "mime": {"type": "string"},
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        },
    },
    "Spec": {
        "type": "object", "required": ["name", "description", "timeout", "priority",
                                       "executor", "parameters"],
        "properties": {
            "name": {"type": "string"}, "description": {"type": "string"},
            "timeout": nullable("number"), "priority": {"type": "integer"},
            "executor": {"type": "string"},
            "parameters": {"type": "object", "description": "A JSON Schema of the values."},
        },
    },
    "JobCreate": {
        "type": "object",
        "description": "A new job. Field names are matched case-insensitively; unknown fields "
                       "are a 400. The body is streamed: `input` is decoded to disk as it "
                       "arrives.",
        "required": ["input"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string", "pattern": ID_PATTERN,
                   "description": "Optional; jobd generates one (32 hex digits) if absent."},
            "input": {"type": "string", "contentEncoding": "base64",
                      "description": "Base64 of a zip holding the entry point (line breaks "
                                     "allowed, as `base64` prints)."},
            "entry": {"type": "string", "default": "run.sh",
                      "description": "The file to run, relative (may be in a subdirectory). "
                                     "With a `#!` line it runs directly; without one, `.py` "
                                     "runs with python3, `.sh` with bash, `.R` with Rscript, "
                                     "`.js` with node, and anything else (and run.sh) with "
                                     "/bin/sh. A missing interpreter fails the job with a "
                                     "message naming it."},
            "args": {"type": "array", "items": {"type": "string"}, "maxItems": 1024,
                     "description": "Command-line arguments of the entry point."},
            "params": {"type": "object", "maxProperties": MAX_PARAMS,
                       "propertyNames": {"pattern": "^[A-Za-z][A-Za-z0-9_]{0,63}$"},
                       "additionalProperties": {"type": ["string", "integer"]},
                       "description": "Named parameters, passed as environment variables "
                                      "`JOBD_PARAM_<NAME>` (names upper-cased). They are "
                                      "stored in the job database in plain text: do not pass "
                                      "secrets this way."},
            "timeout": {"type": ["number", "string"],
                        "description": "Wall-clock limit: seconds, or a duration such as "
                                       "`90s`, `5m`, `2h`; 0 or absent: the daemon's "
                                       "JOBD_TIMEOUT. On expiry SIGTERM, SIGKILL after "
                                       "JOBD_KILL_GRACE, FAILED."},
            "priority": {"type": "integer", "minimum": -1000000, "maximum": 1000000,
                         "default": 0},
            "labels": {"type": "object", "maxProperties": MAX_LABELS,
                       "propertyNames": {"pattern": "^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$"},
                       "additionalProperties": {"type": "string", "maxLength": 256}},
            "function": {"type": "string",
                         "description": "Call this function of a Python entry point with "
                                        "`args` (as strings) instead of running the file: "
                                        "`tool.py:main`, or `main` with `entry: tool.py`. "
                                        "None or an int returned is the exit status; other "
                                        "values are printed."},
            "executor": {"type": "string", "enum": ["local"], "default": "local",
                         "description": "Where the job runs; other executors are a 400 until "
                                        "configured."},
        },
    },
    "JobList": {
        "type": "object",
        "required": ["jobs", "next_cursor"],
        "additionalProperties": False,
        "properties": {
            "jobs": {"type": "array", "items": ref("Job"), "description": "Newest first."},
            "next_cursor": nullable("string", description="Pass as `cursor` for the next "
                                    "page; null on the last page."),
        },
    },
    "CancelResult": {
        "type": "object",
        "required": ["changed", "message", "job"],
        "additionalProperties": False,
        "properties": {
            "changed": {"type": "boolean",
                        "description": "False when the job had already finished."},
            "message": {"type": "string"},
            "job": ref("Job"),
        },
    },
    "FileEntry": {
        "type": "object",
        "required": ["path", "size", "mime", "modified", "kind"],
        "additionalProperties": False,
        "properties": {
            "path": {"type": "string", "description": "Relative, `/`-separated."},
            "size": {"type": "integer", "minimum": 0},
            "mime": {"type": "string", "description": "From the name; science text formats "
                     "(.pdb, .fasta, .log, ...) are text/plain."},
            "modified": DATE_TIME,
            "kind": {"type": "string", "enum": ["file", "dir", "symlink"]},
        },
    },
    "FileList": {
        "type": "object",
        "required": ["files", "live"],
        "additionalProperties": False,
        "properties": {
            "files": {"type": "array", "items": ref("FileEntry")},
            "live": {"type": "boolean", "description": "True: the working directory as it is "
                     "now (the job runs); false: the packed result."},
        },
    },
    "Overview": {
        "type": "object",
        "required": ["counts", "total", "running", "slots", "free_slots", "queue_length",
                     "oldest_queued_age", "log_followers", "disk"],
        "additionalProperties": False,
        "properties": {
            "counts": {"type": "object", "required": list(job.STATUSES),
                       "additionalProperties": False,
                       "properties": {s: {"type": "integer", "minimum": 0}
                                      for s in job.STATUSES}},
            "total": {"type": "integer", "minimum": 0},
            "running": {"type": "integer", "minimum": 0},
            "slots": {"type": "integer", "minimum": 1},
            "free_slots": {"type": "integer", "minimum": 0},
            "queue_length": {"type": "integer", "minimum": 0},
            "oldest_queued_age": nullable("number", minimum=0,
                                          description="Seconds the longest-waiting queued "
                                                      "job has waited."),
            "log_followers": {"type": "integer", "minimum": 0,
                              "description": "Live log streams open now."},
            "disk": {
                "type": "object",
                "required": ["jobs_bytes", "free_bytes", "total_bytes"],
                "additionalProperties": False,
                "properties": {
                    "jobs_bytes": {"type": "integer", "minimum": 0,
                                   "description": "Inputs and results of every job, from "
                                                  "the records (logs and running working "
                                                  "directories not counted)."},
                    "free_bytes": {"type": "integer", "minimum": 0,
                                   "description": "Free space of DATAPATH's filesystem."},
                    "total_bytes": {"type": "integer", "minimum": 0},
                },
            },
        },
    },
    "Health": {
        "type": "object", "required": ["status"], "additionalProperties": False,
        "properties": {"status": {"type": "string", "enum": ["healthy"]}},
    },
    "ClassicUpload": {
        "type": "object",
        "description": "Keys are matched case-insensitively, other keys ignored (as the Go "
                       "jobd).",
        "required": ["id", "input"],
        "properties": {
            "id": {"type": "string", "pattern": ID_PATTERN},
            "input": {"type": "string", "contentEncoding": "base64",
                      "description": "Base64 of a zip with run.sh at the top."},
            "slurml": {"type": "boolean", "default": False},
        },
    },
    "ClassicRecord": {
        "type": "object",
        "description": "The Go jobd's record, capitalised keys in this order.",
        "required": ["LastUpdated", "ID", "Status", "Path", "Input", "Output", "Message",
                     "SlurmID", "Slurml"],
        "additionalProperties": False,
        "properties": {
            "LastUpdated": DATE_TIME,
            "ID": {"type": "string"},
            "Status": {"type": "string", "enum": list(job.STATUSES)},
            "Path": {"type": "string", "const": ""},
            "Input": {"type": "string", "const": ""},
            "Output": {"type": "string", "description": "Base64 of the result zip (empty "
                       "until finished)."},
            "Message": {"type": "string"},
            "SlurmID": {"type": "integer"},
            "Slurml": {"type": "boolean"},
        },
    },
    "ClassicError": {
        "type": "object",
        "required": ["error", "message", "status"],
        "additionalProperties": False,
        "properties": {
            "error": {"type": "string", "enum": ["bad_request", "not_found", "no_content",
                                                 "request_entity_too_large",
                                                 "method_not_allowed", "forbidden", "unauthorized",
                                                 "too_many_requests", "insufficient_storage"]},
            "message": {"type": "string"},
            "status": {"type": "integer"},
        },
    },
}

# -- operations ----------------------------------------------------------------------------------

CREATE = {
    "tags": ["jobs"], "operationId": "createJob", "summary": "Create a job",
    "description": "Stores the job and queues it; it starts at once if a slot is free. The "
                   "archive is checked before the answer (sound zip, safe names, the entry "
                   "point present): nothing is stored for a refused request.\n\n"
                   "`multipart/form-data`: file parts (any field name, each with a filename) "
                   "are the working directory, or one archive part (zip, tar, tar.gz) is "
                   "unpacked; text fields are the JSON fields as text (`args`, `params`, "
                   "`labels` as JSON text).",
    "requestBody": {"required": True, "content": {
        **json_content(ref("JobCreate"), examples={
            "script": {"id": "fold-42", "input": "UEsDBBQAAAAIAA...", "args": ["--fast"],
                       "params": {"n": 3}, "labels": {"project": "p1"}, "timeout": "1h"},
            "function": {"input": "UEsDBBQAAAAIAA...", "function": "tool.py:main",
                         "args": ["input.fasta"]},
        }),
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "id": {"type": "string"}, "entry": {"type": "string"},
            "args": {"type": "string", "description": "JSON list of strings"},
            "params": {"type": "string", "description": "JSON object"},
            "labels": {"type": "string", "description": "JSON object"},
            "timeout": {"type": "string"}, "priority": {"type": "string"},
            "function": {"type": "string"}, "executor": {"type": "string"}}}},
    }},
    "responses": {
        "201": {"description": "Stored, status QUEUED.",
                "headers": {"Location": {"schema": {"type": "string"},
                                         "description": "/api/v1/jobs/{id}"}},
                "content": json_content(ref("Job"), QUEUED_EXAMPLE)},
        "400": {"description": "A field is unknown or invalid, the input is missing, not "
                               "base64, not a sound zip, or lacks the entry point.",
                "content": json_content(ref("Error"), examples={
                    "unknown": {"error": "bad_request", "status": 400,
                                "message": "unknown field 'colour' (allowed: " +
                                           ", ".join(FIELDS) + ")"},
                    "params": {"error": "bad_request", "status": 400,
                               "message": "parameter name '1x' is not allowed: names are a "
                                          "letter then letters, digits or _, at most 64 "
                                          "characters"},
                    "entry": {"error": "bad_request", "status": 400,
                              "message": "main.py does not exist in the input file"},
                    "executor": {"error": "bad_request", "status": 400,
                                 "message": "executor 'slurm' is not configured on this "
                                            "daemon (available: local)"},
                })},
        "409": error("A job with this id exists.", 409, "job fold-42 already exists"),
        "413": error("The body is larger than JOBD_MAX_BODY.", 413,
                     "request body is larger than 8589934592 bytes"),
        "403": error("Locked-down mode: only job specs run.", 403,
                     "this daemon is locked down: it runs only job specs "
                     "(POST /api/v1/specs/{name}/jobs), not uploaded scripts"),
        "429": error("JOBD_MAX_QUEUE jobs are waiting; see Retry-After.", 429,
                     "the queue is full (10 jobs waiting); try again later"),
        "507": error("Free space under DATAPATH is below JOBD_MIN_FREE.", 507,
                     "not enough disk space for an upload"),
    },
}

LIST = {
    "tags": ["jobs"], "operationId": "listJobs", "summary": "List jobs",
    "description": "Newest first, filtered, in pages. A page costs about `limit` steps however "
                   "many jobs are stored; a cursor stays valid while jobs come and go. "
                   + no_query_note(),
    "parameters": [
        {"name": "status", "in": "query", "description": "Comma-separated statuses to keep "
         "(case-insensitive); may repeat.", "schema": {"type": "string"},
         "example": "QUEUED,RUNNING"},
        {"name": "label", "in": "query", "description": "`key=value` (equal) or `key` "
         "(present); may repeat, all must match.", "schema": {"type": "string"},
         "example": "project=p1"},
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                     "maximum": 1000, "default": 50}},
        {"name": "cursor", "in": "query", "description": "`next_cursor` of the previous page.",
         "schema": {"type": "string"}},
    ],
    "responses": {
        "200": {"description": "A page of jobs.",
                "content": json_content(ref("JobList"),
                                        {"jobs": [JOB_EXAMPLE], "next_cursor": "41"})},
        "400": error("An unknown status, a bad limit or cursor, an unknown parameter.", 400,
                     "unknown status 'DONE' (statuses: " + ", ".join(job.STATUSES) + ")"),
    },
}

GET = {
    "tags": ["jobs"], "operationId": "getJob", "summary": "Inspect a job",
    "description": no_query_note(),
    "parameters": [job_id_param(), wait_param()],
    "responses": {"200": {"description": "The job.",
                          "content": json_content(ref("Job"), FINISHED_EXAMPLE)},
                  "400": BAD_QUERY, "404": NOT_FOUND},
}

DELETE = {
    "tags": ["jobs"], "operationId": "deleteJob", "summary": "Delete a job and its files",
    "description": "Queued (not yet started) and finished jobs can be deleted; a running job "
                   "must be cancelled first.",
    "parameters": [job_id_param()],
    "responses": {
        "204": {"description": "Deleted, with its input, result, log and working directory."},
        "400": BAD_QUERY, "404": NOT_FOUND,
        "409": error("The job runs.", 409, "job is RUNNING: cancel it before deleting it"),
    },
}

CANCEL = {
    "tags": ["jobs"], "operationId": "cancelJob", "summary": "Cancel a job",
    "description": "Idempotent. A queued job leaves the queue; a running job's whole process "
                   "group (and any process that left it) gets SIGTERM, then SIGKILL after "
                   "JOBD_KILL_GRACE; the answer comes once it has ended (status CANCELLED). "
                   "A finished job is not changed (`changed: false`).",
    "parameters": [job_id_param()],
    "responses": {
        "200": {"description": "The outcome and the job.",
                "content": json_content(ref("CancelResult"), examples={
                    "cancelled": {"changed": True, "message": "job cancelled",
                                  "job": {**FINISHED_EXAMPLE, "status": "CANCELLED",
                                          "message": "job cancelled"}},
                    "finished": {"changed": False,
                                 "message": "job already finished (SUCCESS): nothing to "
                                            "cancel",
                                 "job": {**FINISHED_EXAMPLE, "status": "SUCCESS",
                                         "message": "job finished successfully",
                                         "exit_code": 0, "signal": None}},
                })},
        "400": BAD_QUERY, "404": NOT_FOUND,
    },
}

RESTART = {
    "tags": ["jobs"], "operationId": "restartJob", "summary": "Run a finished job again",
    "description": "From its original input, in a fresh working directory; the old result and "
                   "log are removed. Attempts count from zero again.",
    "parameters": [job_id_param()],
    "responses": {
        "200": {"description": "The job, QUEUED.",
                "content": json_content(ref("Job"), {**QUEUED_EXAMPLE,
                                                     "message": "job restarted"})},
        "400": BAD_QUERY, "404": NOT_FOUND,
        "409": error("The job has not finished.", 409,
                     "job is RUNNING: only a finished job can be restarted"),
    },
}

LOGS = {
    "tags": ["logs"], "operationId": "getJobLogs", "summary": "Read or follow a job's output",
    "description": "stdout and stderr, combined, as bytes.\n\n"
                   "- Without `follow`: the log from `offset` as it is now; `X-Next-Offset` is "
                   "where to continue.\n"
                   "- `follow=true`: chunked `text/plain` that streams new output as it is "
                   "written and ends when the job ends (at once for a finished job).\n"
                   "- `Accept: text/event-stream`: Server-Sent Events (always following). Each "
                   "event holds whole lines (`data:` one per line, `\\r` counts as a line "
                   "break); its `id` is the byte offset after them, so `Last-Event-ID` "
                   "resumes exactly. The last event is `event: end` with `{\"status\", "
                   "\"message\", \"exit_code\", \"signal\"}`; a status that is not final "
                   "means the daemon is stopping. Idle streams get `: keep-alive` comments.",
    "parameters": [
        job_id_param(),
        {"name": "offset", "in": "query", "description": "Byte offset to start from.",
         "schema": {"type": "integer", "minimum": 0, "default": 0}},
        {"name": "follow", "in": "query", "schema": {"type": "boolean", "default": False}},
        {"name": "Last-Event-ID", "in": "header", "description": "SSE: resume after this "
         "byte offset (wins over `offset`).", "schema": {"type": "string"}},
    ],
    "responses": {
        "200": {"description": "The output.",
                "headers": {"X-Next-Offset": {"schema": {"type": "integer"}, "description":
                                              "Without follow: offset after the body."}},
                "content": {
                    "text/plain": {"schema": {"type": "string"},
                                   "example": "step 1\nstep 2\n"},
                    "text/event-stream": {"schema": {"type": "string"},
                                          "example": "retry: 1000\n\nid: 7\ndata: step 1\n\n"
                                                     "event: end\nid: 7\ndata: {\"status\": "
                                                     "\"SUCCESS\", \"message\": \"job finished "
                                                     "successfully\", \"exit_code\": 0, "
                                                     "\"signal\": null}\n\n"},
                }},
        "400": error("A bad offset, follow or Last-Event-ID.", 400,
                     "offset must be an integer, not 'x'"),
        "404": NOT_FOUND,
    },
}

FILES = {
    "tags": ["files"], "operationId": "listJobFiles", "summary": "List the working directory",
    "description": "While the job runs, the live directory; once finished, the entries of its "
                   "result zip. Empty before the job first starts. Symlinks are listed, never "
                   "followed.",
    "parameters": [job_id_param()],
    "responses": {
        "200": {"description": "The entries, sorted.",
                "content": json_content(ref("FileList"), {"live": True, "files": [
                    {"path": "out", "size": 0, "mime": "inode/directory",
                     "modified": "2026-11-23T10:41:19.000Z", "kind": "dir"},
                    {"path": "out/model.pdb", "size": 48213, "mime": "text/plain",
                     "modified": "2026-11-23T10:41:20.000Z", "kind": "file"}]})},
        "400": BAD_QUERY, "404": NOT_FOUND,
        "409": error("The directory kept changing while it was listed.", 409,
                     "the job's files changed while they were listed: try again"),
    },
}

RANGE_PARAM = {"name": "Range", "in": "header", "description": "One range, `bytes=0-1023`, "
               "`bytes=1024-` or `bytes=-500` (several ranges: the whole file is sent).",
               "schema": {"type": "string"}}

FILE = {
    "tags": ["files"], "operationId": "getJobFile", "summary": "Download one file",
    "description": "A regular file of the working directory (live while the job runs), or "
                   "of the result zip once finished. `Range` and `If-Range` are supported; "
                   "the type comes from the name.",
    "parameters": [job_id_param(),
                   {"name": "path", "in": "path", "required": True, "description":
                    "Relative path; `..`, absolute paths and symlinks leading out are refused.",
                    "schema": {"type": "string"}, "example": "out/model.pdb"},
                   RANGE_PARAM],
    "responses": {
        "200": {"description": "The file.", "content": {"*/*": {"schema": {
            "type": "string", "format": "binary"}}}},
        "206": {"description": "The range asked for (`Content-Range`).",
                "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}},
        "400": error("The path is unsafe or names a directory or symlink.", 400,
                     "'out' is a directory: list it with the files call, or download the "
                     "archive"),
        "404": error("No such job or file.", 404, "file 'out/x.pdb' not found"),
        "416": error("The range is outside the file.", 416,
                     "range 'bytes=900-' is outside the file (12 bytes)"),
    },
}

ARCHIVE = {
    "tags": ["files"], "operationId": "getJobArchive", "summary": "Download the working "
    "directory",
    "description": "Streamed, never buffered. Once the job finished: its result zip (with "
                   "`Content-Length` and Range support), or a tar.gz made from it. While it "
                   "runs: a live snapshot of the working directory (`X-Live-Snapshot: true`; "
                   "each file as it was when read), the partial download to debug a stuck "
                   "job.",
    "parameters": [job_id_param(),
                   {"name": "format", "in": "query", "schema": {
                       "type": "string", "enum": ["zip", "tar.gz", "tgz"], "default": "zip"}},
                   RANGE_PARAM],
    "responses": {
        "200": {"description": "The archive (`Content-Disposition: attachment`).",
                "content": {"application/zip": {"schema": {"type": "string",
                                                           "format": "binary"}},
                            "application/gzip": {"schema": {"type": "string",
                                                            "format": "binary"}}}},
        "206": {"description": "A range of a finished job's zip.",
                "content": {"application/zip": {"schema": {"type": "string",
                                                           "format": "binary"}}}},
        "400": error("An unknown format.", 400, "format must be zip or tar.gz, not 'rar'"),
        "404": NOT_FOUND,
        "409": error("The job has not started: no working directory yet.", 409,
                     "job is QUEUED: it has no working directory yet"),
        "416": error("The range is outside the zip.", 416,
                     "range 'bytes=99999-' is outside the file (2048 bytes)"),
    },
}

OVERVIEW = {
    "tags": ["daemon"], "operationId": "getOverview", "summary": "The daemon at a glance",
    "description": "From in-memory indexes: cheap enough to poll.",
    "responses": {
        "200": {"description": "Counts, slots, queue and disk.",
                "content": json_content(ref("Overview"), {
                    "counts": {"QUEUED": 4, "PREPARED": 0, "RUNNING": 2, "SUCCESS": 120,
                               "FAILED": 3, "CANCELLED": 1},
                    "total": 130, "running": 2, "slots": 2, "free_slots": 0,
                    "queue_length": 4, "oldest_queued_age": 12.5, "log_followers": 1,
                    "disk": {"jobs_bytes": 73400320, "free_bytes": 51539607552,
                             "total_bytes": 107374182400}})},
        "400": BAD_QUERY,
        "507": error("DATAPATH's filesystem cannot be read.", 507,
                     "cannot read the data directory's filesystem: ..."),
    },
}

HEALTH = {
    "tags": ["daemon"], "operationId": "health", "summary": "Liveness",
    "responses": {"200": {"description": "The daemon answers.",
                          "content": json_content(ref("Health"), {"status": "healthy"})}},
}

SPEC_NAME_PARAM = {"name": "name", "in": "path", "required": True, "description": "The spec.",
                   "schema": {"type": "string"}, "example": "reverse"}
SPEC_EXAMPLE = {"name": "reverse", "description": "Reverse sequences", "timeout": 600.0,
                "priority": 0, "executor": "local", "parameters": {
                    "type": "object", "additionalProperties": False, "required": ["input"],
                    "properties": {"input": {"type": "string", "x-jobd-type": "file"}}}}
NO_SPEC = error("No spec with this name.", 404, "spec not found")
ARTIFACTS = {
    "tags": ["files"], "operationId": "listArtifacts", "summary": "A job's artifacts",
    "description": "Files under the job's `artifacts/` directory (`JOBD_ARTIFACTS_DIR`), with "
                   "MIME type, size and SHA-256; download each through `/files/{path}`.",
    "parameters": [job_id_param()],
    "responses": {
        "200": {"description": "The artifacts.", "content": json_content(
            {"type": "object", "required": ["artifacts"], "additionalProperties": False,
             "properties": {"artifacts": {"type": "array", "items": ref("Artifact")}}},
            {"artifacts": [{"name": "model.pdb", "path": "artifacts/model.pdb", "size": 81,
                            "mime": "text/plain", "sha256": "0" * 64}]})},
        "404": error("Unknown id.", 404, "job not found"),
    },
}
SPECS = {
    "tags": ["specs"], "operationId": "listSpecs", "summary": "The job specs of this daemon",
    "responses": {"200": {"description": "Every spec with a JSON Schema of its parameters.",
                          "content": json_content(
                              {"type": "object", "required": ["specs"],
                               "properties": {"specs": {"type": "array",
                                                        "items": ref("Spec")}}},
                              {"specs": [SPEC_EXAMPLE]})}},
}
SPEC = {
    "tags": ["specs"], "operationId": "getSpec", "summary": "One job spec",
    "parameters": [SPEC_NAME_PARAM],
    "responses": {"200": {"description": "The spec.",
                          "content": json_content(ref("Spec"), SPEC_EXAMPLE)},
                  "404": NO_SPEC},
}
SPEC_CREATE = {
    "tags": ["specs"], "operationId": "createFromSpec", "summary": "Start a job from a spec",
    "description": "JSON `{id?, params?, input?, labels?, priority?, timeout?}` (`input`: "
                   "base64 of a zip of files for the job), or multipart/form-data: file parts, "
                   "`id`, `labels` (JSON), `priority`, `timeout`, `params` (JSON) and any "
                   "other text field as the value of the parameter of that name.",
    "parameters": [SPEC_NAME_PARAM],
    "requestBody": {"required": True, "content": {
        **json_content({"type": "object"}, {"params": {"input": "in.fasta", "min_length": 3},
                                            "input": "UEsDBBQAAAAIAA..."}),
        "multipart/form-data": {"schema": {"type": "object"}}}},
    "responses": {
        "201": {"description": "Stored, status QUEUED.",
                "content": json_content(ref("Job"), {**QUEUED_EXAMPLE, "spec": "reverse"})},
        "400": error("A parameter is unknown, missing or invalid (named in the message).", 400,
                     "parameter 'min_length': must be at least 0"),
        "404": NO_SPEC,
        "409": error("A job with this id exists.", 409, "job fold-42 already exists"),
        "429": error("JOBD_MAX_QUEUE jobs are waiting; see Retry-After.", 429,
                     "the queue is full (10 jobs waiting); try again later"),
        "507": error("Free space under DATAPATH is below JOBD_MIN_FREE.", 507,
                     "not enough disk space for an upload"),
        "413": error("The body is larger than JOBD_MAX_BODY.", 413,
                     "request body is larger than 8589934592 bytes"),
    },
}

PAYLOAD = {
    "type": "object", "required": ["id", "status", "loc", "pid", "killed"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "integer", "minimum": 0}, "loc": {"type": "string"},
        "status": {"type": "string", "enum": ["Prepared", "Running", "Completed", "Failed",
                                              "Invalid", "Killed", "Cleaned"]},
        "pid": {"type": "integer", "minimum": 0}, "killed": {"type": "boolean"},
    },
}
PAYLOAD_EXAMPLE = {"id": 1, "status": "Prepared", "loc": "/data/1/work", "pid": 0,
                   "killed": False}
ZIP = {"application/zip": {"schema": {"type": "string", "format": "binary"}}}
ORCH_ERROR = {"type": "object", "required": ["error", "message", "status"],
              "properties": {"error": {"type": "string"}, "message": {"type": "string"},
                             "status": {"type": "integer"}}}
NUMERIC_ID = {"name": "id", "in": "path", "required": True, "description": "The payload id.",
              "schema": {"type": "integer", "minimum": 0}, "example": 1}


def orch_error(description: str, status: int, code: str, message: str) -> dict[str, Any]:
    return {"description": description, "content": json_content(
        ORCH_ERROR, {"error": code, "message": message, "status": status})}


ORCH_UNKNOWN = orch_error("No payload with this id.", 404, "not_found", "payload not found")

SUBMIT = {
    "tags": ["orchestrator"], "operationId": "orchestratorSubmit",
    "summary": "job-orchestrator: submit a payload",
    "description": "Parts named `file`, each with a filename, one of them `run.sh`. A body "
                   "that is well formed but cannot make a job is stored as `Invalid`.",
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "properties": {"file": {"type": "array", "items": {
            "type": "string", "format": "binary"}}}}}}},
    "responses": {
        "200": {"description": "The payload record.",
                "content": json_content(PAYLOAD, PAYLOAD_EXAMPLE)},
        "400": orch_error("A malformed multipart body.", 400, "bad_request",
                          "malformed multipart body: no closing boundary"),
        "403": orch_error("Locked-down mode.", 403, "forbidden",
                          "this daemon is locked down: it runs only job specs"),
        "413": orch_error("Larger than JOBD_MAX_BODY.", 413, "request_entity_too_large",
                          "request body is larger than 8589934592 bytes"),
        "507": orch_error("No space left.", 507, "insufficient_storage", "no space left"),
        "429": orch_error("JOBD_MAX_QUEUE jobs are waiting.", 429, "too_many_requests",
                          "the queue is full; try again later"),
    },
}
RETRIEVE = {
    "tags": ["orchestrator"], "operationId": "orchestratorRetrieve",
    "summary": "job-orchestrator: the result once Completed, else the payload record",
    "parameters": [NUMERIC_ID],
    "responses": {"200": {"description": "The zip when Completed, else the record.",
                          "content": {**ZIP, **json_content(PAYLOAD, PAYLOAD_EXAMPLE)}},
                  "404": ORCH_UNKNOWN},
}
RETRIEVE_PARTIAL = {
    "tags": ["orchestrator"], "operationId": "orchestratorRetrievePartial",
    "summary": "job-orchestrator: the working directory as it is now",
    "parameters": [NUMERIC_ID],
    "responses": {"200": {"description": "A zip, whatever the status.", "content": ZIP},
                  "404": ORCH_UNKNOWN},
}
KILL = {
    "tags": ["orchestrator"], "operationId": "orchestratorKill",
    "summary": "job-orchestrator: terminate a payload", "parameters": [NUMERIC_ID],
    "responses": {"200": {"description": "Killed (or already ended): empty body."},
                  "404": ORCH_UNKNOWN,
                  "500": orch_error("The process did not end.", 500, "kill_failed",
                                    "the payload did not stop within 15s")},
}
LOAD = {
    "tags": ["orchestrator"], "operationId": "orchestratorLoad",
    "summary": "job-orchestrator: CPU usage in percent",
    "responses": {"200": {"description": "A bare number, 0 to 100.", "content": json_content(
        {"type": "number", "minimum": 0, "maximum": 100}, 12.5)}},
}
ROOT = {
    "tags": ["orchestrator"], "operationId": "root", "summary": "Connectivity check",
    "responses": {"200": {"description": "The daemon's name and version.",
                          "content": json_content({"type": "object"},
                                                  {"name": "jobd", "version": __version__})}},
}
METRICS = {
    "tags": ["daemon"], "operationId": "metrics", "summary": "Prometheus metrics",
    "responses": {"200": {"description": "The Prometheus text exposition format.",
                          "content": {"text/plain": {"schema": {"type": "string"}}}}},
}

CLASSIC_UPLOAD = {
    "tags": ["classic"], "operationId": "classicUpload", "summary": "Classic jobd upload",
    "description": "The Go jobd's upload, byte for byte (see the README).",
    "requestBody": {"required": True, "content": json_content(
        ref("ClassicUpload"), {"id": "my-job", "input": "UEsDBBQAAAAIAA...\n",
                               "slurml": False})},
    "responses": {
        "201": {"description": "Stored, status QUEUED.", "content": json_content(
            ref("ClassicRecord"), {"LastUpdated": "2026-11-23T10:41:19.135123Z",
                                   "ID": "my-job", "Status": "QUEUED", "Path": "", "Input": "",
                                   "Output": "", "Message": "job queued", "SlurmID": 0,
                                   "Slurml": False})},
        "400": error("Not JSON, no id, a bad input, the id taken.", 400,
                     "error validating job run.sh does not exist in the input file",
                     schema="ClassicError"),
        "413": error("The body is larger than JOBD_MAX_BODY.", 413,
                     "request body is larger than 8589934592 bytes", schema="ClassicError",
                     code="request_entity_too_large"),
        "403": error("Locked-down mode: only job specs run.", 403,
                     "this daemon is locked down: it runs only job specs "
                     "(POST /api/v1/specs/{name}/jobs), not uploaded scripts",
                     schema="ClassicError"),
        "429": error("JOBD_MAX_QUEUE jobs are waiting; see Retry-After.", 429,
                     "the queue is full (10 jobs waiting); try again later",
                     schema="ClassicError"),
        "507": error("Free space under DATAPATH is below JOBD_MIN_FREE.", 507,
                     "not enough disk space for an upload", schema="ClassicError"),
    },
}

CLASSIC_GET = {
    "tags": ["classic"], "operationId": "classicGet", "summary": "Classic jobd result",
    "description": "`wait` is an extension of this jobd; classic clients poll without it.",
    "parameters": [job_id_param(), wait_param()],
    "responses": {
        "200": {"description": "Finished (any final status): the record with `Output`, the "
                               "base64 of the result zip.",
                "content": json_content(ref("ClassicRecord"), {
                    "LastUpdated": "2026-11-23T10:41:20.5Z", "ID": "my-job",
                    "Status": "SUCCESS", "Path": "", "Input": "", "Output": "UEsDBBQAAAAIAA...",
                    "Message": "job finished successfully", "SlurmID": 0, "Slurml": False})},
        "202": error("Queued or running.", 202, "job not ready", schema="ClassicError"),
        "400": error("A bad `wait`.", 400, "wait must be between 0 and 300 seconds, not 900",
                     schema="ClassicError"),
        "404": error("Unknown id.", 404, "job not found", schema="ClassicError"),
    },
}

OPENAPI = {
    "tags": ["daemon"], "operationId": "openapi", "summary": "This document",
    "responses": {"200": {"description": "OpenAPI 3.1.", "content": {
        "application/json": {"schema": {"type": "object"}}}}},
}

DOCS = {
    "tags": ["daemon"], "operationId": "docs", "summary": "This document, rendered",
    "description": "A self-contained page (works offline).",
    "responses": {"200": {"description": "HTML.", "content": {
        "text/html": {"schema": {"type": "string"}}}}},
}


def document() -> dict[str, Any]:
    """The whole OpenAPI document (a fresh dict each call)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "jobd",
            "version": __version__,
            "description": "The job daemon research software containers ship with. The native "
                           "API lives under `/api/v1`; the classic jobd protocol is served "
                           "unchanged. Every error has the shape `{\"error\", \"message\", "
                           "\"status\"}`.",
        },
        "tags": [
            {"name": "jobs", "description": "Create, list, inspect, cancel, restart, delete."},
            {"name": "logs", "description": "Output, whole or live."},
            {"name": "files", "description": "The working directory: live while it runs."},
            {"name": "specs", "description": "Named job templates baked into the image."},
            {"name": "daemon", "description": "Health, overview, this document."},
            {"name": "classic", "description": "The Go jobd's protocol, unchanged."},
            {"name": "orchestrator", "description": "job-orchestrator's client protocol."},
        ],
        "paths": {
            "/api/v1/jobs": {"post": CREATE, "get": LIST},
            "/api/v1/jobs/{id}": {"get": GET, "delete": DELETE},
            "/api/v1/jobs/{id}/cancel": {"post": CANCEL},
            "/api/v1/jobs/{id}/restart": {"post": RESTART},
            "/api/v1/jobs/{id}/logs": {"get": LOGS},
            "/api/v1/jobs/{id}/files": {"get": FILES},
            "/api/v1/jobs/{id}/files/{path}": {"get": FILE},
            "/api/v1/jobs/{id}/archive": {"get": ARCHIVE},
            "/api/v1/overview": {"get": OVERVIEW},
            "/api/v1/jobs/{id}/artifacts": {"get": ARTIFACTS},
            "/api/v1/specs": {"get": SPECS},
            "/api/v1/specs/{name}": {"get": SPEC},
            "/api/v1/specs/{name}/jobs": {"post": SPEC_CREATE},
            "/health": {"get": HEALTH},
            "/api/upload": {"post": CLASSIC_UPLOAD},
            "/api/get/{id}": {"get": CLASSIC_GET},
            "/submit": {"post": SUBMIT},
            "/retrieve/{id}": {"get": RETRIEVE},
            "/retrieve_partial/{id}": {"get": RETRIEVE_PARTIAL},
            "/kill/{id}": {"post": KILL},
            "/load": {"get": LOAD},
            "/": {"get": ROOT},
            "/metrics": {"get": METRICS},
            "/openapi.json": {"get": OPENAPI},
            "/docs": {"get": DOCS},
        },
        "components": {"schemas": SCHEMAS, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description":
                       "When authentication is on (JOBD_TOKENS_FILE, JOBD_TOKEN_<NAME>), every "
                       "route but /health needs a token: 401 without. Another client's job "
                       "answers 404. Anonymous callers may pass a per-job secret in "
                       "`X-Job-Secret` or `?secret=`."}}},
        "security": [{}, {"bearer": []}],
    }


# -- routes --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def docs_page() -> bytes:
    """static/docs.html, read through the package loader (works inside a zipapp too)."""
    data = pkgutil.get_data("jobd", "static/docs.html")
    if data is None:
        raise FileNotFoundError("jobd/static/docs.html is missing from the package")
    return data


async def openapi_json(request: Request) -> Response:
    return JSONResponse(document())


async def docs(request: Request) -> Response:
    return HTMLResponse(docs_page())


routes = [
    Route("/openapi.json", openapi_json, methods=["GET"]),
    Route("/docs", docs, methods=["GET"]),
]
