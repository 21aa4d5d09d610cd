"""The hostile-input corpus, as data: archives, malformed requests, and the upload routes.

`tests/test_hostile.py` sends every case to every upload route the daemon has and proves the
daemon refuses it (a 4xx with a message, or the protocol's own "invalid" answer), writes
nothing outside DATAPATH, leaves nothing behind in it, and keeps serving.

- `ARCHIVES`: hostile archives; every route that takes archives gets each one.
- `UploadRoute`: how one route sends an archive and reads the outcome, plus its own malformed
  requests (`requests`). `ROUTES` lists every known route; those missing from the daemon's
  routing table are skipped, so the native API (`/api/v1/jobs`) and the orchestrator
  (`/submit`) are exercised as soon as they are merged. A new upload route is one more line
  in ROUTES.
"""

from __future__ import annotations

import base64
import gzip
import io
import stat
import struct
import tarfile
import time
import uuid
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx

from tests.test_archive import multi_disk_zip, raw_zip, stored

# Where absolute-path entries point: a directory that must never come into existence.
SENTINEL = f"/tmp/jobd-hostile-{uuid.uuid4().hex[:12]}"

F = stat.S_IFREG | 0o644
X = stat.S_IFREG | 0o755
L = stat.S_IFLNK | 0o777
D = stat.S_IFDIR | 0o755
RUN_SH = b"#!/bin/sh\nls -la > listing.txt\n"
RUN = ("run.sh", RUN_SH, X)

# The corpus daemon's limits (test_hostile.py starts it with these).
LIMITS = {"JOBD_MAX_UNPACKED": "32M", "JOBD_MAX_ENTRIES": "1000", "JOBD_MAX_BODY": "64M",
          "JOBD_HEADER_TIMEOUT": "2s", "JOBD_BODY_TIMEOUT": "2s", "JOBD_MIN_BODY_RATE": "512",
          "JOBD_MAX_URL": "8K", "JOBD_MAX_HEADER": "16K"}


# -- archive builders -------------------------------------------------------------------------


def zip_of(*entries: tuple[str, bytes | str, int]) -> bytes:
    """A zip of (name, content, st_mode) entries; names are written as given."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as zf:
        warnings.simplefilter("ignore")  # duplicate names are on purpose
        for name, content, mode in entries:
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.external_attr = mode << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, content)
    return buffer.getvalue()


def tar_of(*members: tarfile.TarInfo | tuple[str, bytes, int], gz: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tf.addfile(member)
                continue
            name, content, mode = member
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(content), mode, 1_700_000_000
            tf.addfile(info, io.BytesIO(content))
    data = buffer.getvalue()
    return gzip.compress(data, mtime=0) if gz else data


def tar_entry(name: str, kind: bytes, **fields: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mtime = kind, 1_700_000_000
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def deflated_zeros(size: int) -> tuple[bytes, int]:
    """`size` zero bytes as a raw deflate stream, and their CRC."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = bytes(1 << 20)
    piece = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    whole, rest = divmod(size, 1 << 20)
    payload = piece * whole + compressor.compress(bytes(rest)) + compressor.flush()
    crc = 0
    for _ in range(whole):
        crc = zlib.crc32(block, crc)
    return payload, zlib.crc32(bytes(rest), crc)


def zeros_zip(size: int, declared: int | None = None) -> bytes:
    payload, crc = deflated_zeros(size)
    return raw_zip([stored(b"run.sh", RUN_SH, attr=X << 16),
                    stored(b"zeros", payload, method=8, crc=crc,
                           size=size if declared is None else declared)])


def overlapping_zip() -> bytes:
    """Entry "big" holds, as its data, the local header and data of entry "small": the
    overlap technique of the non-recursive zip bombs."""
    small = stored(b"small", b"kernel" * 10)
    small_record = raw_zip([small])[:30 + 5 + len(small["payload"])]
    big = stored(b"run.sh", small_record)
    data = raw_zip([big])
    directory_only = raw_zip([big, {**small, "offset": 30 + 6}])
    local_part = data[:30 + 6 + len(small_record)]
    directory = directory_only[directory_only.index(b"PK\x01\x02"):
                               directory_only.index(b"PK\x05\x06")]
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 2, 2, len(directory), len(local_part), 0)
    return local_part + directory + end


def nested_zip() -> bytes:
    """42.zip in spirit: zips of zips of zeros. jobd does not recurse, so the outer archive
    is an ordinary small one and is accepted; the inner ones stay packed."""
    inner = zip_of(*[(f"{i}.bin", bytes(1 << 20), F) for i in range(16)])
    middle = zip_of(*[(f"{i}.zip", inner, F) for i in range(16)])
    return zip_of(RUN, ("lib.zip", middle, F))


def setuid_zip() -> bytes:
    script = b"#!/bin/sh\nstat -c %a run.sh tool > modes.txt\n"
    return zip_of(("run.sh", script, stat.S_IFREG | 0o4755),
                  ("tool", b"#!/bin/sh\n", stat.S_IFREG | 0o6755))


def symlink_parent_zip() -> bytes:
    return zip_of(RUN, ("d", "sub", L), ("sub/", b"", D), ("d/pwned", b"x", F))


# -- the archive cases ------------------------------------------------------------------------


@dataclass(frozen=True)
class Archive:
    """One hostile archive.

    `outcome`: "refused" at upload (the usual), "failed" (only decompression shows it, so the
    job is accepted and ends FAILED when unpacked), or "accepted" (harmless once handled:
    `check` gets the result's files).
    """

    name: str
    build: Callable[[], bytes]
    expect: str  # in the refusal message (or the FAILED job's message)
    fmt: str = "zip"
    outcome: str = "refused"
    check: Callable[[dict[str, bytes]], None] | None = None


def _modes_dropped(files: dict[str, bytes]) -> None:
    assert files["modes.txt"].split() == [b"755", b"755"], files["modes.txt"]


def _nested_stays_packed(files: dict[str, bytes]) -> None:
    assert set(files) == {"run.sh", "lib.zip", "listing.txt"}, sorted(files)


ARCHIVES = [
    # traversal, absolute names, drive letters, NUL
    Archive("zip-dotdot", lambda: zip_of(RUN, ("../../../outside/pwned", b"x", F)),
            "path escapes the working directory"),
    Archive("zip-dotdot-deep", lambda: zip_of(RUN, ("../../../../pwned", b"x", F)),
            "path escapes the working directory"),
    Archive("zip-dotdot-inside-name", lambda: zip_of(RUN, ("a/b/../../../x/pwned", b"x", F)),
            "path escapes the working directory"),
    Archive("zip-dotdot-backslash", lambda: zip_of(RUN, ("..\\..\\..\\outside\\pwned", b"x", F)),
            "path escapes the working directory"),
    Archive("zip-absolute", lambda: zip_of(RUN, (f"{SENTINEL}/pwned", b"x", F)),
            "absolute path"),
    Archive("zip-absolute-backslash", lambda: zip_of(RUN, ("\\tmp\\pwned", b"x", F)),
            "absolute path"),
    Archive("zip-drive-letter", lambda: zip_of(RUN, ("C:/Windows/pwned", b"x", F)),
            "drive letter"),
    Archive("zip-drive-letter-relative", lambda: zip_of(RUN, ("c:pwned", b"x", F)),
            "drive letter"),
    Archive("zip-nul-in-name",
            lambda: raw_zip([stored(b"run.sh", RUN_SH), stored(b"ok\x00/../../pwned", b"x")]),
            "NUL byte"),
    Archive("zip-empty-name", lambda: raw_zip([stored(b"run.sh", RUN_SH), stored(b"", b"x")]),
            "empty name"),
    Archive("zip-dot-as-file", lambda: zip_of(RUN, (".", b"x", F)),
            "names the working directory itself"),
    Archive("zip-name-too-long", lambda: zip_of(RUN, ("a/" * 2100 + "x", b"x", F)),
            "name is longer than 4096 characters"),
    Archive("zip-component-too-long", lambda: zip_of(RUN, ("x" * 300, b"x", F)),
            "longer than 255 bytes"),
    Archive("zip-too-deep", lambda: zip_of(RUN, ("d/" * 70 + "x", b"x", F)),
            "deeper than 64 levels"),
    # links
    Archive("zip-symlink-absolute", lambda: zip_of(RUN, ("passwd", "/etc/passwd", L)),
            "is absolute"),
    Archive("zip-symlink-escapes", lambda: zip_of(RUN, ("up", "../../../outside", L)),
            "escapes the working directory"),
    Archive("zip-symlink-dotdot-after-name", lambda: zip_of(RUN, ("s", "a/../../x", L)),
            "has '..' after a name"),
    Archive("zip-symlink-to-parent", lambda: zip_of(RUN, ("top", "..", L)),
            "escapes the working directory"),
    Archive("zip-symlink-then-write-through", symlink_parent_zip,
            "parent 'd' is not a directory"),
    Archive("zip-symlink-run-sh", lambda: zip_of(("run.sh", "/bin/sh", L)), "is absolute"),
    Archive("zip-run-sh-links-inside", lambda: zip_of(("real", RUN_SH, X), ("run.sh", "real", L)),
            "must be a regular file"),
    # special files
    Archive("zip-char-device", lambda: zip_of(RUN, ("null", b"", stat.S_IFCHR | 0o666)),
            "character device entries are not allowed"),
    Archive("zip-block-device", lambda: zip_of(RUN, ("sda", b"", stat.S_IFBLK | 0o660)),
            "block device entries are not allowed"),
    Archive("zip-fifo", lambda: zip_of(RUN, ("fifo", b"", stat.S_IFIFO | 0o644)),
            "FIFO entries are not allowed"),
    Archive("zip-socket", lambda: zip_of(RUN, ("sock", b"", stat.S_IFSOCK | 0o644)),
            "socket entries are not allowed"),
    # the tree itself
    Archive("zip-duplicate-run-sh", lambda: zip_of(RUN, RUN), "duplicate entry"),
    Archive("zip-file-then-dir", lambda: zip_of(RUN, ("a", b"x", F), ("a/b", b"y", F)),
            "parent 'a' is not a directory"),
    Archive("zip-no-run-sh", lambda: zip_of(("other.sh", RUN_SH, X)),
            "run.sh does not exist in the input file"),
    Archive("zip-run-sh-directory", lambda: zip_of(("run.sh/", b"", D), ("run.sh/x", b"", F)),
            "must be a regular file"),
    # damaged, truncated, overlapping
    Archive("zip-overlapping-entries", overlapping_zip, "overlap"),
    Archive("zip-entry-outside-file",
            lambda: raw_zip([stored(b"run.sh", RUN_SH), stored(b"b", b"d", offset=10**6)]),
            "lies outside the file"),
    Archive("zip-local-name-differs",
            lambda: raw_zip([stored(b"run.sh", RUN_SH, local_name=b"../pwned")]),
            "another name in its local header"),
    Archive("zip-truncated", lambda: zip_of(RUN, ("data", bytes(range(256)) * 64, F))[:-30],
            "damaged zip file"),
    Archive("zip-truncated-directory",
            lambda: raw_zip([stored(b"run.sh", RUN_SH), stored(b"b", b"data")], cut_directory=7),
            "damaged zip file"),
    Archive("zip-only-end-record", lambda: b"PK\x05\x06" + bytes(18),
            "run.sh does not exist in the input file"),
    Archive("zip-multi-disk-locator", multi_disk_zip, "span multiple disks"),
    Archive("not-an-archive", lambda: b"#!/bin/sh\necho this is not a zip\n" * 10,
            "not a zip"),
    Archive("zip-encrypted", lambda: raw_zip([stored(b"run.sh", RUN_SH, flags=1)]),
            "is encrypted"),
    Archive("zip-unknown-method", lambda: raw_zip([stored(b"run.sh", RUN_SH, method=99)]),
            "unsupported compression method 99"),
    Archive("zip-invalid-utf8-name",
            lambda: raw_zip([stored(b"run.sh", RUN_SH), stored(b"\xff\xfe", b"x", flags=0x800)]),
            "damaged zip file"),
    # bombs and caps
    Archive("zip-ratio-bomb", lambda: zeros_zip(20 << 20), "compression ratio above 200:1"),
    Archive("zip-size-cap", lambda: zeros_zip(1 << 20, declared=40 << 20),
            f"input unpacks to more than {32 << 20} bytes"),
    Archive("zip-too-many-entries", lambda: zip_of(RUN, *[(f"f{i}", b"", F) for i in range(1000)]),
            "more than 1000 entries"),
    Archive("zip-lies-about-its-size", lambda: zeros_zip(8 << 20, declared=1000),
            "damaged zip file", outcome="failed"),
    Archive("zip-bad-crc", lambda: raw_zip([stored(b"run.sh", RUN_SH, crc=1234)]),
            "damaged zip file", outcome="failed"),
    Archive("zip-nested-42-style", nested_zip, "", outcome="accepted",
            check=_nested_stays_packed),
    Archive("zip-setuid-setgid-dropped", setuid_zip, "", outcome="accepted",
            check=_modes_dropped),
    # tar (routes that take only zip refuse these as "not a zip")
    Archive("tar-dotdot", lambda: tar_of(("run.sh", RUN_SH, 0o755),
                                         ("../../../outside/pwned", b"x", 0o644)),
            "path escapes the working directory", fmt="tar"),
    Archive("tar-absolute", lambda: tar_of(("run.sh", RUN_SH, 0o755),
                                           (f"{SENTINEL}/pwned", b"x", 0o644)),
            "absolute path", fmt="tar"),
    Archive("tar-symlink-out", lambda: tar_of(("run.sh", RUN_SH, 0o755),
                                              tar_entry("etc", tarfile.SYMTYPE,
                                                        linkname="/etc")),
            "is absolute", fmt="tar"),
    Archive("tar-symlink-then-write-through",
            lambda: tar_of(("run.sh", RUN_SH, 0o755),
                           tar_entry("d", tarfile.SYMTYPE, linkname="."),
                           ("d/pwned", b"x", 0o644)),
            "parent 'd' is not a directory", fmt="tar"),
    Archive("tar-hardlink-out", lambda: tar_of(("run.sh", RUN_SH, 0o755),
                                               tar_entry("pw", tarfile.LNKTYPE,
                                                         linkname="/etc/passwd")),
            "entry 'pw': hard link target '/etc/passwd': absolute path", fmt="tar"),
    Archive("tar-hardlink-dotdot", lambda: tar_of(("run.sh", RUN_SH, 0o755),
                                                  tar_entry("pw", tarfile.LNKTYPE,
                                                            linkname="../../../outside/keep")),
            "entry 'pw': hard link target '../../../outside/keep': path escapes", fmt="tar"),
    Archive("tar-char-device", lambda: tar_of(("run.sh", RUN_SH, 0o755),
                                              tar_entry("null", tarfile.CHRTYPE, devmajor=1,
                                                        devminor=3)),
            "character device entries are not allowed", fmt="tar"),
    Archive("tar-fifo", lambda: tar_of(("run.sh", RUN_SH, 0o755),
                                       tar_entry("fifo", tarfile.FIFOTYPE)),
            "FIFO entries are not allowed", fmt="tar"),
    Archive("tar-gz-truncated",
            lambda: tar_of(("run.sh", RUN_SH, 0o755), ("a", bytes(range(256)) * 400, 0o644),
                           gz=True)[:-200],
            "damaged tar file", fmt="tar"),
    Archive("tar-gz-bomb", lambda: tar_of(("run.sh", RUN_SH, 0o755),
                                          ("zeros", bytes(40 << 20), 0o644), gz=True),
            "entry 'zeros': compression ratio above 200:1", fmt="tar"),
]


# -- routes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A malformed request to one route: httpx arguments, and what must come back."""

    name: str
    build: Callable[[str], dict[str, Any]]  # job id -> httpx.request keyword arguments
    status: int = 400
    expect: str = ""  # in the message


@dataclass(frozen=True)
class Sent:
    response: httpx.Response
    job_id: str | None  # the job the route made, if any (orchestrator ids are the server's)


@dataclass(frozen=True)
class UploadRoute:
    """How to drive one upload route (see the module notes)."""

    name: str
    method: str
    path: str
    formats: frozenset[str]  # archive formats it takes
    send: Callable[[httpx.Client, str, bytes, str], Sent]  # client, job id, archive, fmt
    refused: Callable[[httpx.Response], bool]  # the route's answer to unusable input
    outcome: Callable[[httpx.Client, str], tuple[str, str] | None]  # (status, message) when done
    result: Callable[[httpx.Client, str], dict[str, bytes]]  # files of a finished job
    wrong_format: str  # message for a format it does not take
    requests: list[Request] = field(default_factory=list)


def b64(data: bytes) -> str:
    return base64.encodebytes(data).decode()


def error_shape(response: httpx.Response) -> bool:
    """A 4xx in the error shape, with a message."""
    if not 400 <= response.status_code < 500:
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("status") == response.status_code \
        and bool(body.get("message")) and bool(body.get("error"))


def zip_files(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist() if not i.is_dir()}


# classic: POST /api/upload, GET /api/get/{id}

def classic_send(client: httpx.Client, job_id: str, data: bytes, fmt: str) -> Sent:
    return Sent(client.post("/api/upload", json={"id": job_id, "input": b64(data)}), job_id)


def classic_outcome(client: httpx.Client, job_id: str) -> tuple[str, str] | None:
    response = client.get(f"/api/get/{job_id}")
    if response.status_code != 200:
        return None
    return response.json()["Status"], response.json()["Message"]


def classic_result(client: httpx.Client, job_id: str) -> dict[str, bytes]:
    return zip_files(base64.b64decode(client.get(f"/api/get/{job_id}").json()["Output"]))


def raw_json(text: str | bytes) -> Callable[[str], dict[str, Any]]:
    body = text.encode() if isinstance(text, str) else text
    return lambda job_id: {"content": body.replace(b"JOB", job_id.encode()),
                           "headers": {"content-type": "application/json"}}


def as_json(value: Callable[[str], Any]) -> Callable[[str], dict[str, Any]]:
    return lambda job_id: {"json": value(job_id)}


GOOD_INPUT = base64.b64encode(zip_of(RUN)).decode()  # unwrapped: raw JSON cases embed it

CLASSIC_REQUESTS = [
    Request("not-json", raw_json("this is not json"), expect="error reading job from request"),
    Request("top-level-array", raw_json('[{"id": "JOB"}]'), expect="not a JSON object"),
    Request("truncated-json", raw_json('{"id": "JOB", "input": "UEsDB'),
            expect="unexpected end of JSON input"),
    Request("bom-then-garbage", raw_json(b"\xef\xbb\xbf\xef\xbb{}"),
            expect="error reading job from request"),
    Request("id-number", as_json(lambda j: {"id": 7, "input": GOOD_INPUT}),
            expect="job id must be a string"),
    Request("id-list", as_json(lambda j: {"id": ["a"], "input": GOOD_INPUT}),
            expect="job id must be a string"),
    Request("id-traversal", as_json(lambda j: {"id": "../../etc", "input": GOOD_INPUT}),
            expect="job id must be"),
    Request("id-slash", as_json(lambda j: {"id": "a/b", "input": GOOD_INPUT}),
            expect="job id must be"),
    Request("id-dot", as_json(lambda j: {"id": "..", "input": GOOD_INPUT}),
            expect="job id must be"),
    Request("id-hidden", as_json(lambda j: {"id": ".incoming", "input": GOOD_INPUT}),
            expect="job id must be"),
    Request("id-nul", as_json(lambda j: {"id": "a\x00b", "input": GOOD_INPUT}),
            expect="job id must be"),
    Request("id-too-long", as_json(lambda j: {"id": "a" * 129, "input": GOOD_INPUT}),
            expect="job id must be"),
    Request("id-missing", as_json(lambda j: {"input": GOOD_INPUT}),
            expect="job id is required"),
    Request("input-number", as_json(lambda j: {"id": j, "input": 12}),
            expect="input must be a base64 string"),
    Request("input-object", as_json(lambda j: {"id": j, "input": {"a": 1}}),
            expect="input must be a base64 string"),
    Request("input-not-base64", as_json(lambda j: {"id": j, "input": "%%%%not base64"}),
            expect="input is not valid base64"),
    Request("input-empty", as_json(lambda j: {"id": j, "input": ""}),
            expect="input is required"),
    Request("input-missing", as_json(lambda j: {"id": j}), expect="input is required"),
    Request("slurml-string", as_json(lambda j: {"id": j, "input": GOOD_INPUT, "slurml": "yes"}),
            expect="slurml must be true or false"),
    Request("secret-number", as_json(lambda j: {"id": j, "input": GOOD_INPUT, "secret": 5}),
            expect="secret must be a string"),
    Request("oversize-field", as_json(lambda j: {"id": j, "input": GOOD_INPUT,
                                                 "note": "x" * 100_000}),
            expect="longer than 65536 bytes"),
    Request("fields-over-total", as_json(lambda j: {"id": j, "input": GOOD_INPUT,
                                                    **{f"k{i}": "x" * 60_000
                                                       for i in range(20)}}),
            expect="longer than 1048576 bytes"),
    Request("nesting-bomb", raw_json('{"id": "JOB", "x": ' + "[" * 10_000 + "]" * 10_000
                                     + "}"), expect="nests deeper than"),
    Request("unicode-escape-flood", raw_json('{"id": "JOB", "input": "'
                                             + "\\u0041" * 70_000 + '"}'),
            expect="\\u escapes"),
    Request("invalid-utf8", raw_json(b'{"id": "JOB", "input": "' + GOOD_INPUT.encode()
                                     + b'", "x": "\xff\xfe"}'), expect="invalid UTF-8"),
    Request("nan", raw_json('{"id": "JOB", "input": "' + GOOD_INPUT + '", "x": NaN}'),
            expect="invalid character 'N'"),
    Request("huge-number", raw_json('{"id": "JOB", "input": "' + GOOD_INPUT + '", "x": '
                                    + "9" * 5000 + "}"), expect="error reading job"),
    Request("streamed-body-over-cap",
            lambda j: {"content": iter([b'{"id": "' + j.encode() + b'", "input": "'] +
                                       [b"A" * (1 << 20)] * 70 + [b'"}'])},
            status=413, expect="request body is larger than"),
]

CLASSIC = UploadRoute(
    "classic", "POST", "/api/upload", frozenset({"zip"}), classic_send, error_shape,
    classic_outcome, classic_result, "not a zip file", CLASSIC_REQUESTS)


# native: POST /api/v1/jobs (JSON), GET /api/v1/jobs/{id} (ARCHITECTURE.md's contract)

def native_send(client: httpx.Client, job_id: str, data: bytes, fmt: str) -> Sent:
    return Sent(client.post("/api/v1/jobs", json={"id": job_id, "input": b64(data)}), job_id)


def native_outcome(client: httpx.Client, job_id: str) -> tuple[str, str] | None:
    body = client.get(f"/api/v1/jobs/{job_id}").json()
    if body.get("status") in ("SUCCESS", "FAILED", "CANCELLED"):
        return body["status"], body.get("message", "")
    return None


def native_result(client: httpx.Client, job_id: str) -> dict[str, bytes]:
    return zip_files(client.get(f"/api/v1/jobs/{job_id}/archive").content)


NATIVE_REQUESTS = [
    Request("not-json", raw_json("this is not json")),
    Request("top-level-array", raw_json('[{"id": "JOB"}]')),
    Request("id-number", as_json(lambda j: {"id": 7, "input": GOOD_INPUT})),
    Request("id-traversal", as_json(lambda j: {"id": "../../etc", "input": GOOD_INPUT})),
    Request("input-number", as_json(lambda j: {"id": j, "input": 12})),
    Request("unknown-field", as_json(lambda j: {"id": j, "input": GOOD_INPUT, "evil": 1})),
    Request("nesting-bomb", raw_json('{"id": "JOB", "labels": ' + "[" * 10_000
                                     + "]" * 10_000 + "}")),
    Request("oversize-field", as_json(lambda j: {"id": j, "input": GOOD_INPUT,
                                                 "labels": {"k": "x" * 100_000}})),
    Request("nan", raw_json('{"id": "JOB", "input": "' + GOOD_INPUT + '", "priority": NaN}')),
]

NATIVE = UploadRoute(
    "native", "POST", "/api/v1/jobs", frozenset({"zip"}), native_send, error_shape,
    native_outcome, native_result, "", NATIVE_REQUESTS)


# orchestrator: POST /submit (multipart), GET /retrieve/{id} (wire-compat.md section 2)

def orchestrator_send(client: httpx.Client, job_id: str, data: bytes, fmt: str) -> Sent:
    name = "files.zip" if fmt == "zip" else "files.tar.gz"
    response = client.post("/submit", files=[("file", (name, data,
                                                       "application/octet-stream"))])
    made = None
    if response.status_code == 200:
        made = str(response.json()["id"])
    return Sent(response, made)


def orchestrator_refused(response: httpx.Response) -> bool:
    """A 4xx, or 200 with the payload status `Invalid` (what the protocol expects)."""
    if response.status_code == 200:
        return response.json().get("status") == "Invalid"
    return error_shape(response)


def orchestrator_outcome(client: httpx.Client, job_id: str) -> tuple[str, str] | None:
    response = client.get(f"/retrieve/{job_id}")
    if response.headers.get("content-type", "").startswith("application/zip"):
        return "SUCCESS", ""
    status = response.json().get("status")
    mapped = {"Failed": "FAILED", "Invalid": "FAILED", "Killed": "CANCELLED"}.get(status)
    return (mapped, "") if mapped else None


def orchestrator_result(client: httpx.Client, job_id: str) -> dict[str, bytes]:
    return zip_files(client.get(f"/retrieve/{job_id}").content)


def multipart(parts: list[tuple[str, str, bytes]], boundary: str = "XyZzY") -> bytes:
    """A multipart body written by hand: (field name, filename, content) parts."""
    out = b""
    for name, filename, content in parts:
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                f'filename="{filename}"\r\n\r\n').encode("utf-8", "surrogateescape")
        out += content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def form(parts: list[tuple[str, str, bytes]], boundary: str = "XyZzY",
         cut: int = 0) -> Callable[[str], dict[str, Any]]:
    body = multipart(parts, boundary)
    body = body[:-cut] if cut else body
    return lambda job_id: {"content": body, "headers": {
        "content-type": f"multipart/form-data; boundary={boundary}"}}


RUN_PART = ("file", "run.sh", RUN_SH)

ORCHESTRATOR_REQUESTS = [
    Request("not-multipart", raw_json('{"id": "JOB"}')),
    Request("no-boundary", lambda j: {"content": multipart([RUN_PART]),
                                      "headers": {"content-type": "multipart/form-data"}}),
    Request("truncated", form([RUN_PART], cut=12)),
    Request("wrong-boundary", lambda j: {"content": multipart([RUN_PART], "AAA"),
                                         "headers": {"content-type":
                                                     "multipart/form-data; boundary=BBB"}}),
    Request("huge-part-header", lambda j: {
        "content": b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"run.sh\""
                   b"\r\nX-Pad: " + b"x" * 100_000 + b"\r\n\r\nx\r\n--B--\r\n",
        "headers": {"content-type": "multipart/form-data; boundary=B"}}),
]

# (name, multipart parts): refused (4xx or Invalid) or made harmless: nothing may land
# outside DATAPATH either way.
ORCHESTRATOR_FILENAMES = [
    ("filename-dotdot", [RUN_PART, ("file", "../../../outside/pwned", b"x")]),
    ("filename-absolute", [RUN_PART, ("file", f"{SENTINEL}/pwned", b"x")]),
    ("filename-windows", [RUN_PART, ("file", "C:\\..\\..\\pwned", b"x")]),
    ("filename-dotdot-run-sh", [("file", "../../run.sh", RUN_SH)]),
    ("filename-nul", [RUN_PART, ("file", "ok\x00../../pwned", b"x")]),
    ("filename-dot", [RUN_PART, ("file", "..", b"x")]),
    ("filename-duplicate", [RUN_PART, RUN_PART]),
    ("filename-control-chars", [RUN_PART, ("file", "a\x1b[2Jb", b"x")]),
    ("filename-too-long", [RUN_PART, ("file", "x" * 300, b"x")]),
]

ORCHESTRATOR = UploadRoute(
    "orchestrator", "POST", "/submit", frozenset({"zip", "tar"}), orchestrator_send,
    orchestrator_refused, orchestrator_outcome, orchestrator_result, "", ORCHESTRATOR_REQUESTS)

# Every upload route known; test_hostile.py runs those the daemon has. One line per route.
ROUTES = [CLASSIC, NATIVE, ORCHESTRATOR]


def wait_outcome(route: UploadRoute, client: httpx.Client, job_id: str,
                 timeout: float = 60.0) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        found = route.outcome(client, job_id)
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{route.name}: job {job_id} did not finish in {timeout}s")
        time.sleep(0.05)
