"""The client side of the native API (`/api/v1`): what `jobd submit`, `jobd list` ... call.

Standard library only (http.client), so the command line costs the zipapp nothing, and it
runs wherever jobd itself runs. Payloads stream both ways: an upload is zipped to a temporary
file and sent as base64 inside the JSON body with a Content-Length computed up front, and
downloads are written in chunks, so neither side of a transfer is ever held in memory.

Errors are raised as `ClientError` carrying the exit code the command line ends with (the
table is in the README and in `jobd --help`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Optional
from urllib.parse import quote, urlencode, urlsplit

if TYPE_CHECKING:  # imported where used: the daemon, which starts through this
    import http.client  # module's command line, never loads http.client and email

DEFAULT_URL = "http://localhost:8080"
TERMINAL = frozenset({"SUCCESS", "FAILED", "CANCELLED"})

# Exit codes of the command line (documented in the README and `jobd --help`).
EXIT_OK = 0
EXIT_JOB_FAILED = 1  # the job FAILED without an exit code or signal to pass on
EXIT_USAGE = 2  # click's own code for bad flags and arguments
EXIT_REFUSED = 3  # the daemon refused the request (400, 409, 413, ...)
EXIT_NOT_FOUND = 4  # no such job (404)
EXIT_AUTH = 5  # 401 or 403: JOBD_TOKEN missing or not allowed
EXIT_UNREACHABLE = 6  # no answer from the daemon (refused, timed out, name unknown)
EXIT_SERVER = 7  # the daemon failed (5xx) or answered something that is not the API
EXIT_LOCAL = 8  # a local file problem: an input missing, an output directory not empty
EXIT_CANCELLED = 9  # the job was CANCELLED
EXIT_SIGNAL_BASE = 128  # the job was killed by signal N: 128 + N, as shells report it
EXIT_INTERRUPTED = 130  # Ctrl-C while waiting (the job keeps running)

#: The exit codes as documented: `jobd --help` and the README table are made from this.
EXIT_CODE_TABLE = (
    ("0", "success (`submit --wait`: the job ended SUCCESS)"),
    ("1", "the job FAILED without an exit code of its own"),
    ("2", "usage error (bad flags or arguments)"),
    ("3", "the daemon refused the request (400, 409, 413 ...)"),
    ("4", "no such job (404)"),
    ("5", "not authorised (401, 403): check JOBD_TOKEN"),
    ("6", "cannot reach the daemon"),
    ("7", "the daemon failed (5xx) or the URL is not a jobd"),
    ("8", "a local file problem (missing input, output directory not empty)"),
    ("9", "the job was CANCELLED"),
    ("N", "`submit --wait`: the job's own exit code N when run.sh failed"),
    ("128+N", "`submit --wait`: the job was killed by signal N (137: SIGKILL, 143: SIGTERM)"),
    ("130", "interrupted (Ctrl-C) while waiting; the job keeps running"),
)


def exit_codes_markdown() -> str:
    """The README's exit code table (a test keeps the README in step)."""
    rows = ["| code | meaning |", "|---|---|"]
    rows.extend(f"| `{code}` | {meaning} |" for code, meaning in EXIT_CODE_TABLE)
    return "\n".join(rows)


# Per read and write on the socket; an upload's answer waits for the daemon's archive check.
REQUEST_TIMEOUT = 60.0
UPLOAD_ANSWER_TIMEOUT = 600.0
_CHUNK = 1 << 20
_ERROR_BODY_LIMIT = 64 * 1024

Progress = Callable[[int], None]  # called with the bytes just transferred


# Seconds one long poll of `wait` may take (the daemon allows up to 300); under the 60 s
# that proxies (nginx, load balancers) commonly allow a quiet request.
LONG_POLL = 25


class ClientError(Exception):
    """Something the command line reports on stderr and turns into its exit code."""

    exit_code = EXIT_SERVER

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class Unreachable(ClientError):
    exit_code = EXIT_UNREACHABLE


class LocalError(ClientError):
    exit_code = EXIT_LOCAL


class HTTPError(ClientError):
    """A 4xx or 5xx answer; `message` is the error body's message when it has one."""

    def __init__(self, status: int, code: str, message: str) -> None:
        if status in (401, 403):
            exit_code = EXIT_AUTH
        elif status == 404:
            exit_code = EXIT_NOT_FOUND
        elif 400 <= status < 500:
            exit_code = EXIT_REFUSED
        else:
            exit_code = EXIT_SERVER
        super().__init__(f"{message} (HTTP {status})", exit_code)
        self.status = status
        self.code = code
        self.message = message


def job_exit_code(record: dict[str, Any]) -> int:
    """What `submit --wait` exits with: the job's own code where it has one."""
    status = record.get("status")
    if status == "SUCCESS":
        return EXIT_OK
    if status == "CANCELLED":
        return EXIT_CANCELLED
    code = record.get("exit_code")
    if isinstance(code, int) and 0 < code < 256:
        return code
    number = signal_number(record.get("signal"))
    if number is not None and 0 < number < 128:
        return EXIT_SIGNAL_BASE + number
    return EXIT_JOB_FAILED


def signal_number(value: Any) -> int | None:
    """The API names signals ("SIGKILL"); a number is taken as it is."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(signal.Signals[value.strip().upper()])
        except KeyError:
            digits = value.strip().rpartition(" ")[2]  # "signal 77" for unnamed ones
            return int(digits) if digits.isdigit() else None
    return None


def parse_time(value: Any) -> float | None:
    """Epoch seconds from the API's RFC 3339 text (or a number); None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    # fromisoformat on 3.9 takes at most 6 fraction digits: trim nanoseconds.
    head, dot, rest = text.partition(".")
    if dot:
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = head + "." + rest[:min(digits, 6)] + rest[digits:]
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ClientError(f"the daemon sent a time jobd cannot read: {value!r}") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


# ---------------------------------------------------------------------------
# Packing what `jobd submit` is given


def payload_kind(paths: list[Path]) -> str:
    """"zip" (send the file as it is), "dir" (zip its content) or "files" (zip each path)."""
    for path in paths:
        if not path.exists():
            raise LocalError(f"{path}: no such file or directory")
    if len(paths) == 1:
        only = paths[0]
        if only.is_dir():
            return "dir"
        if zipfile.is_zipfile(only):
            return "zip"
    return "files"


def build_zip(paths: list[Path], dest: Path, *, level: int = 1) -> int:
    """Zip the inputs into `dest` (streamed file by file); returns the zip's size.

    One directory: its content goes at the top (so its run.sh is the job's run.sh). Several
    paths: each goes at the top under its own name, directories with their content. Symlinks
    are followed (their content is what the job needs), a directory seen twice is skipped.
    """
    kind = payload_kind(paths)
    if kind == "zip":
        raise ValueError("a zip is sent as it is, not zipped again")
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED, allowZip64=True,
                         compresslevel=level) as zf:
        if kind == "dir":
            _add_tree(zf, paths[0], "", set())
        else:
            seen: set[tuple[int, int]] = set()
            names: set[str] = set()
            for path in paths:
                name = path.resolve().name if path.name in ("", ".", "..") else path.name
                if name in names:
                    raise LocalError(f"{path}: two inputs are both named {name!r}")
                names.add(name)
                if path.is_dir():
                    zf.write(path, name)  # a directory entry
                    _add_tree(zf, path, name + "/", seen)
                else:
                    _add_file(zf, path, name)
    return dest.stat().st_size


def _add_file(zf: zipfile.ZipFile, path: Path, name: str) -> None:
    try:
        zf.write(path, name)  # streams the file; keeps its mode (run.sh stays executable)
    except OSError as exc:
        raise LocalError(f"{path}: {exc.strerror or exc}") from exc


def _add_tree(zf: zipfile.ZipFile, root: Path, prefix: str, seen: set[tuple[int, int]]) -> None:
    try:
        st = root.stat()
    except OSError as exc:
        raise LocalError(f"{root}: {exc.strerror or exc}") from exc
    key = (st.st_dev, st.st_ino)
    if key in seen:  # a symlink loop, or the same directory reached twice
        return
    seen.add(key)
    try:
        children = sorted(os.scandir(root), key=lambda entry: entry.name)
    except OSError as exc:
        raise LocalError(f"{root}: {exc.strerror or exc}") from exc
    for entry in children:
        path = Path(entry.path)
        name = prefix + entry.name
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:  # a dangling symlink, or no permission
            raise LocalError(f"{path}: {exc.strerror or exc}") from exc
        if stat.S_ISDIR(mode):
            zf.write(path, name)  # a directory entry
            _add_tree(zf, path, name + "/", seen)
        elif stat.S_ISREG(mode):
            _add_file(zf, path, name)
        else:
            raise LocalError(f"{path}: not a regular file or directory")


# ---------------------------------------------------------------------------
# HTTP


def _counted(chunks: Iterable[bytes], progress: Progress | None) -> Iterator[bytes]:
    for chunk in chunks:
        yield chunk
        if progress is not None:
            progress(len(chunk))


def _error_from(response: http.client.HTTPResponse) -> HTTPError:
    """The error body's message (the `{"error", "message", "status"}` shape), else its text."""
    import http.client

    try:
        raw = response.read(_ERROR_BODY_LIMIT)
    except (OSError, http.client.HTTPException):
        raw = b""
    code, message = "", ""
    try:
        body = json.loads(raw)
        if isinstance(body, dict):
            code = str(body.get("error") or "")
            message = str(body.get("message") or body.get("detail") or "")
    except ValueError:
        message = raw.decode("utf-8", "replace").strip()[:500]
    return HTTPError(response.status, code, message or response.reason or "error")


@dataclass
class Response:
    """An answer whose body has not been read yet; close it (or use `with`)."""

    status: int
    headers: http.client.HTTPMessage
    raw: http.client.HTTPResponse
    conn: http.client.HTTPConnection

    @property
    def length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value and value.isdigit() else None

    def chunks(self, size: int = _CHUNK) -> Iterator[bytes]:
        """The body as it arrives (read1: a live log line is not held back)."""
        import http.client

        try:
            while True:
                data = self.raw.read1(size)
                if not data:
                    return
                yield data
        except (OSError, http.client.HTTPException) as exc:
            raise ClientError(f"the connection broke while reading the answer: {exc}") from exc

    def json(self) -> Any:
        import http.client

        try:
            data = self.raw.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ClientError(f"the connection broke while reading the answer: {exc}") from exc
        try:
            return json.loads(data)
        except ValueError as exc:
            raise ClientError("the daemon's answer is not JSON: is the URL a jobd?") from exc

    def close(self) -> None:
        self.raw.close()
        self.conn.close()

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client:
    """One daemon: its base URL and, when set, the bearer token (JOBD_TOKEN)."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None,
                 timeout: float = REQUEST_TIMEOUT) -> None:
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ClientError(f"not an http(s) URL: {url!r}", EXIT_USAGE)
        self.url = url
        self.scheme = parts.scheme
        self.host = parts.hostname
        try:
            self.port = parts.port
        except ValueError as exc:
            raise ClientError(f"bad port in {url!r}", EXIT_USAGE) from exc
        self.base = parts.path.rstrip("/")
        self.token = token or None
        self.timeout = timeout

    # -- transport -----------------------------------------------------------------------------

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        import http.client

        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def _unreachable(self, exc: BaseException) -> Unreachable:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if isinstance(exc, socket.timeout):
            reason = "timed out"
        return Unreachable(f"cannot reach jobd at {self.url}: {reason or type(exc).__name__}")

    def request(self, method: str, path: str, *,
                query: dict[str, Any] | list[tuple[str, Any]] | None = None,
                body: bytes | Iterable[bytes] | None = None, length: int | None = None,
                content_type: str | None = None, timeout: float | None = -1.0,
                answer_timeout: float | None = -1.0) -> Response:
        """Send one request; a 4xx/5xx becomes HTTPError, no answer becomes Unreachable.

        `timeout` bounds each socket operation (None: wait for ever, for followed logs);
        `answer_timeout` is the wait for the answer once the body is sent.
        """
        import http.client

        timeout = self.timeout if timeout == -1.0 else timeout
        answer_timeout = timeout if answer_timeout == -1.0 else answer_timeout
        target = self.base + path
        if query:
            items = query.items() if isinstance(query, dict) else query
            pairs = [(k, v) for k, v in items if v is not None]
            if pairs:
                target += "?" + urlencode(pairs)
        headers = {"Accept": "application/json, text/plain;q=0.9, */*;q=0.5",
                   "User-Agent": "jobd-cli"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if content_type:
            headers["Content-Type"] = content_type
        if length is not None:
            headers["Content-Length"] = str(length)
        conn = self._connection(timeout)
        sent_error: BaseException | None = None
        try:
            conn.request(method, target, body=body, headers=headers)
        except (http.client.HTTPException, ValueError) as exc:
            conn.close()
            raise ClientError(f"cannot send the request to {self.url}: {exc}") from exc
        except OSError as exc:
            if conn.sock is None:  # never connected
                conn.close()
                raise self._unreachable(exc) from exc
            # The daemon may have answered early (413, a refused id) and closed: read it.
            sent_error = exc
        try:
            if conn.sock is not None:
                conn.sock.settimeout(answer_timeout)
            raw = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            if sent_error is not None:
                raise ClientError(f"the connection to {self.url} broke while sending: "
                                  f"{sent_error}") from sent_error
            raise self._unreachable(exc) from exc
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        if raw.status >= 400:
            error = _error_from(raw)
            raw.close()
            conn.close()
            raise error
        return Response(raw.status, raw.headers, raw, conn)

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        with self.request(method, path, **kwargs) as response:
            if response.status == 204:
                return None
            return response.json()

    # -- the native API ------------------------------------------------------------------------

    @staticmethod
    def _job_path(job_id: str, suffix: str = "") -> str:
        return f"/api/v1/jobs/{quote(job_id, safe='')}{suffix}"

    def submit(self, zip_path: Path | None, fields: dict[str, Any], *,
               progress: Progress | None = None, spec: str | None = None) -> dict[str, Any]:
        """POST /api/v1/jobs with the zip as base64 streamed inside the JSON body.

        The small fields go first, then `"input": "` + base64 chunks + `"}`; the length is
        known before the first byte, so no chunked encoding is needed (any proxy takes it).
        """
        from jobd.pack import base64_size, iter_base64

        path = (f"/api/v1/specs/{quote(spec, safe='')}/jobs" if spec is not None
                else "/api/v1/jobs")
        if zip_path is None:  # a spec job without files
            return self.json("POST", path, body=[json.dumps(fields).encode()],
                             length=len(json.dumps(fields).encode()),
                             content_type="application/json")
        head = json.dumps(fields)[:-1] + (", " if fields else "") + '"input": "'
        tail = '"}'
        size = zip_path.stat().st_size
        length = len(head.encode()) + base64_size(size) + len(tail)
        body = _counted(_chain(head.encode(), iter_base64(zip_path, chunk_size=3 << 18),
                               tail.encode()), progress)
        return self.json("POST", path, body=body, length=length,
                         content_type="application/json", answer_timeout=UPLOAD_ANSWER_TIMEOUT)

    def specs(self) -> list[dict[str, Any]]:
        return self.json("GET", "/api/v1/specs")["specs"]

    def get(self, job_id: str) -> dict[str, Any]:
        return self.json("GET", self._job_path(job_id))

    def page(self, *, statuses: list[str] | None = None, labels: list[str] | None = None,
             limit: int = 50, cursor: str | None = None) -> tuple[list[dict[str, Any]],
                                                                str | None]:
        """One page of GET /api/v1/jobs (newest first) and the cursor of the next."""
        query: list[tuple[str, Any]] = [("limit", limit), ("cursor", cursor)]
        if statuses:
            query.append(("status", ",".join(statuses)))
        query.extend(("label", label) for label in labels or [])
        answer = self.json("GET", "/api/v1/jobs", query=query)
        if not isinstance(answer, dict) or not isinstance(answer.get("jobs"), list):
            raise ClientError("the daemon's job list is not {\"jobs\": [...]}: is it a jobd?")
        return answer["jobs"], answer.get("next_cursor")

    def jobs(self, *, statuses: list[str] | None = None, labels: list[str] | None = None,
             limit: int | None = None, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every matching job, newest first, following the cursors (at most `limit`)."""
        cursor: str | None = None
        left = limit
        while left is None or left > 0:
            size = page_size if left is None else min(page_size, left)
            jobs, cursor = self.page(statuses=statuses, labels=labels, limit=size, cursor=cursor)
            yield from jobs[:left]
            if left is not None:
                left -= len(jobs)
            if not cursor or not jobs:
                return

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.json("POST", self._job_path(job_id, "/cancel"), body=b"", length=0)

    def restart(self, job_id: str) -> dict[str, Any]:
        return self.json("POST", self._job_path(job_id, "/restart"), body=b"", length=0)

    def delete(self, job_id: str) -> None:
        self.json("DELETE", self._job_path(job_id))

    def logs(self, job_id: str, *, follow: bool = False, offset: int = 0) -> Response:
        """The log as a stream; while following, no read timeout (a job may be quiet)."""
        query = {"offset": offset or None, "follow": "true" if follow else None}
        return self.request("GET", self._job_path(job_id, "/logs"), query=query,
                            timeout=None if follow else self.timeout)

    def archive(self, job_id: str, fmt: str = "zip") -> Response:
        return self.request("GET", self._job_path(job_id, "/archive"), query={"format": fmt})

    def wait(self, job_id: str, *, interval: float = 0.1, max_interval: float = 1.0,
             on_poll: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Until the job is finished: long polls (`?wait=`), each answered as soon as it is;
        against a jobd without them, polls that slow down to `max_interval`."""
        long_poll = True
        while True:
            if long_poll:
                try:
                    record = self.json("GET", self._job_path(job_id),
                                       query={"wait": LONG_POLL},
                                       answer_timeout=LONG_POLL + 30)
                except HTTPError as exc:
                    if exc.status in (502, 503, 504):  # a proxy that cut the wait short
                        time.sleep(interval)
                        continue
                    if exc.status != 400 or "wait" not in exc.message:
                        raise
                    long_poll = False  # an older jobd
                    continue
            else:
                record = self.get(job_id)
            if on_poll is not None:
                on_poll(record)
            if record.get("status") in TERMINAL:
                return record
            if not long_poll:
                time.sleep(interval)
                interval = min(max_interval, interval * 1.5)

    def follow(self, job_id: str, out: BinaryIO) -> dict[str, Any]:
        """Copy the log to `out` while the job runs; the finished record at the end.

        A stream that ends before the job does (a proxy's idle timeout, a daemon restart) is
        picked up again at the byte where it stopped.
        """
        offset = 0
        while True:
            with self.logs(job_id, follow=True, offset=offset) as stream:
                for data in stream.chunks(64 * 1024):
                    out.write(data)
                    out.flush()
                    offset += len(data)
            record = self.get(job_id)
            if record.get("status") in TERMINAL:
                with self.logs(job_id, offset=offset) as rest:
                    for data in rest.chunks():
                        out.write(data)
                out.flush()
                return record
            time.sleep(0.2)


def _chain(head: bytes, middle: Iterable[bytes], tail: bytes) -> Iterator[bytes]:
    yield head
    yield from middle
    yield tail


def save_stream(response: Response, dest: BinaryIO, progress: Progress | None = None) -> int:
    """Copy a streamed body to a file in chunks; returns the bytes written."""
    written = 0
    for data in response.chunks():
        dest.write(data)
        written += len(data)
        if progress is not None:
            progress(len(data))
    expected = response.length
    if expected is not None and written != expected:
        raise ClientError(f"the download stopped after {written} of {expected} bytes")
    return written


def unpack(archive_path: Path, dest: Path) -> None:
    """Unpack a downloaded result into `dest` without ever writing outside it."""
    from jobd.archive import ArchiveError, Limits, extract

    unbounded = Limits(max_size=1 << 62, max_entries=1 << 40, max_ratio=1 << 40)
    try:
        extract(archive_path, dest, unbounded)
    except ArchiveError as exc:
        raise LocalError(f"cannot unpack into {dest}: {exc}") from exc
    except OSError as exc:
        raise LocalError(f"cannot unpack into {dest}: {exc.strerror or exc}") from exc


def check_output_dir(path: Path) -> None:
    """Before any transfer: the result is never mixed into (or over) existing files."""
    if path.exists():
        if not path.is_dir():
            raise LocalError(f"{path} exists and is not a directory")
        if any(os.scandir(path)):
            raise LocalError(f"{path} is not empty: results are unpacked into an empty or "
                             "new directory")
    else:
        parent = path.absolute().parent
        if not parent.is_dir():
            raise LocalError(f"{parent}: no such directory")
        if not os.access(parent, os.W_OK):
            raise LocalError(f"{parent}: not writable")


def duration_text(seconds: Optional[float]) -> str:
    """`1.2s`, `3m04s`, `2h05m`, `3d04h`: compact enough for a table column."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"
