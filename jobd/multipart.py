"""Streaming `multipart/form-data` uploads: file parts go straight to disk, never to memory.

Uploads can be gigabytes and `/tmp` may be RAM, so file parts are written as they arrive into
a directory the caller chooses (under `DATAPATH/.incoming`); only small text fields stay in
memory, capped. The parser is written here rather than taken from a package: it is ~150 lines,
keeps the zipapp free of another dependency, and every refusal gets a message a client can act
on (`MultipartError`).

Decisions:
- Strict framing (RFC 2046 / 7578): the body must reach the closing `--boundary--`; a
  delimiter line followed by anything but `--` or optional blanks and CRLF is malformed
  (a sender must pick a boundary that does not occur in its data). The preamble and the
  epilogue are ignored.
- Part headers are capped (16 KiB per part); `Content-Disposition: form-data` with a
  non-empty `name` is required. A part with a `filename` (or `filename*`) is a file,
  anything else a text field (UTF-8, at most `max_field_size` bytes, names unique).
- File names keep only their last path component (`/` and `\\` both separate: browsers on
  Windows send `C:\\dir\\x.pdb`), and are refused when that component is empty, `.`, `..`,
  longer than 255 bytes, or when the name holds NUL or control characters anywhere. Two
  files that end up with the same name are refused rather than one silently replacing the
  other. `a/../../x` is saved as `x`. Such a refusal (UnsafeFilename) is raised only once the
  whole body has been read (later files are dropped, not saved): the body is well-formed
  multipart, the client still sending gets its answer, and a malformed body wins (plain
  MultipartError).
- In a quoted parameter a backslash escapes only `"` and `\\` (what RFC 7578 senders that
  escape use); any other backslash is kept, so a Windows path survives to be split.
- Nothing here fsyncs the parts: `build_input_zip` makes the durable `input.zip`, stored
  rather than deflated (the client waits for it, and the job unpacks it again).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import unicodedata
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Union
from urllib.parse import unquote

from starlette.requests import ClientDisconnect, Request

from jobd import archive, limits, pack

__all__ = [
    "BodyTooLarge",
    "Form",
    "FormReader",
    "MultipartError",
    "MultipartParser",
    "SavedFile",
    "UnsafeFilename",
    "boundary_of",
    "build_input_zip",
    "parse_params",
    "read_form",
    "receive_form",
    "safe_filename",
]

DEFAULT_MAX_PARTS = 1000
DEFAULT_MAX_FIELD_SIZE = 64 << 10
MAX_HEADER_SIZE = 16 << 10  # all header lines of one part
MAX_BOUNDARY = 200  # RFC 2046 says 70; be lenient, but bounded
_NAME_MAX = 255  # bytes in one file name (Linux)
_PADDING_MAX = 256  # blanks allowed between a delimiter and its CRLF
_WRITE_BUFFER = 256 << 10
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class MultipartError(ValueError):
    """The body is not an acceptable multipart/form-data body; the message says why."""

    status = 400


class BodyTooLarge(MultipartError):
    """The body is larger than the caller's `max_body` (HTTP 413)."""

    status = 413


class UnsafeFilename(MultipartError):
    """A well-formed part whose file name cannot be used (or is used twice)."""


@dataclass(frozen=True)
class SavedFile:
    """One file part, written to `path` (inside the form's directory) under `name`."""

    name: str  # the sanitised base name
    path: Path
    size: int
    field: str = "file"  # the form field it came in
    content_type: str = ""


@dataclass
class Form:
    """A received form: text fields in memory, files on disk in `directory`."""

    directory: Path
    fields: dict[str, str] = field(default_factory=dict)
    files: list[SavedFile] = field(default_factory=list)
    size: int = 0  # bytes of body received


# -- header values ----------------------------------------------------------------------------


def _decode_header(raw: bytes) -> str:
    """Browsers send raw UTF-8 in header values; anything else is read as Latin-1."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _ext_value(text: str) -> str:
    """An RFC 5987 `charset'lang'percent-encoded` value (`filename*=UTF-8''na%C3%AFve.txt`)."""
    try:
        charset, _lang, encoded = text.split("'", 2)
    except ValueError:
        raise MultipartError(f"malformed extended parameter value {text!r}") from None
    charset = charset.strip().lower() or "utf-8"
    try:
        return unquote(encoded, encoding=charset, errors="strict")
    except (LookupError, UnicodeDecodeError) as exc:
        raise MultipartError(f"cannot decode parameter value {text!r}: {exc}") from None


def parse_params(value: str) -> tuple[str, dict[str, str]]:
    """`type; key=value; key="quoted"` -> (lower-cased type, {lower-cased key: value}).

    `key*` (RFC 5987) values are decoded and win over a plain `key`. Pure.
    """
    main, _, rest = value.partition(";")
    params: dict[str, str] = {}
    extended: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t;":
            i += 1
        if i >= n:
            break
        start = i
        while i < n and rest[i] not in "=;":
            i += 1
        key = rest[start:i].strip().lower()
        if i >= n or rest[i] == ";":
            if key:
                params.setdefault(key, "")
            continue
        i += 1  # '='
        while i < n and rest[i] in " \t":
            i += 1
        if i < n and rest[i] == '"':
            i += 1
            chars = []
            while True:
                if i >= n:
                    raise MultipartError(f"unterminated quoted string in {value!r}")
                c = rest[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\" and i + 1 < n and rest[i + 1] in '"\\':
                    chars.append(rest[i + 1])
                    i += 2
                    continue
                chars.append(c)
                i += 1
            text = "".join(chars)
            while i < n and rest[i] != ";":
                if rest[i] not in " \t":
                    raise MultipartError(f"unexpected text after a quoted string in {value!r}")
                i += 1
        else:
            start = i
            while i < n and rest[i] != ";":
                i += 1
            text = rest[start:i].strip()
        if not key:
            raise MultipartError(f"a parameter without a name in {value!r}")
        if key.endswith("*"):
            extended[key[:-1]] = _ext_value(text)
        else:
            params[key] = text
    params.update(extended)
    return main.strip().lower(), params


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a `multipart/form-data` Content-Type, or MultipartError."""
    if not content_type:
        raise MultipartError("the request has no Content-Type: expected multipart/form-data")
    kind, params = parse_params(content_type)
    if kind != "multipart/form-data":
        raise MultipartError(f"Content-Type is {kind!r}: expected multipart/form-data")
    boundary = params.get("boundary", "")
    if not boundary:
        raise MultipartError("Content-Type multipart/form-data has no boundary parameter")
    if len(boundary) > MAX_BOUNDARY or any(c in boundary for c in "\r\n\x00"):
        raise MultipartError(f"unusable multipart boundary {boundary[:80]!r}")
    try:
        return boundary.encode("ascii")
    except UnicodeEncodeError:
        raise MultipartError(f"multipart boundary {boundary[:80]!r} is not ASCII") from None


# -- file names -------------------------------------------------------------------------------


def _is_control(c: str) -> bool:
    return unicodedata.category(c) == "Cc"  # C0, DEL and C1


def safe_filename(raw: str) -> str:
    """The base name to save an uploaded file as, or UnsafeFilename. Pure.

    Directories are stripped (`/` and `\\`); refused: NUL or control characters anywhere,
    an empty base name, `.`, `..`, and names over 255 bytes.
    """
    shown = repr(raw if len(raw) <= 200 else raw[:200] + "...")
    if "\x00" in raw:
        raise UnsafeFilename(f"file name {shown} contains a NUL byte")
    if any(_is_control(c) for c in raw):
        raise UnsafeFilename(f"file name {shown} contains control characters")
    base = raw.replace("\\", "/").rsplit("/", 1)[-1]
    if base == "":
        raise UnsafeFilename(f"file name {shown} is empty" if not raw
                             else f"file name {shown} names a directory, not a file")
    if base in (".", ".."):
        raise UnsafeFilename(f"file name {shown} names a directory, not a file")
    try:
        size = len(base.encode("utf-8"))
    except UnicodeEncodeError:
        raise UnsafeFilename(f"file name {shown} is not valid Unicode") from None
    if size > _NAME_MAX:
        raise UnsafeFilename(f"file name {shown} is longer than {_NAME_MAX} bytes")
    return base


# -- framing ----------------------------------------------------------------------------------

_PREAMBLE, _AFTER_DELIMITER, _HEADERS, _BODY, _EPILOGUE = range(5)

# Events: ("part", {header: value}), ("data", bytes), ("end", None)
Event = tuple[str, Any]


class MultipartParser:
    """Splits a multipart body, fed in chunks of any size, into events. Pure, no I/O.

    `feed` returns ("part", headers) at each part's start, ("data", bytes) for its content
    (in pieces of any size), ("end", None) at its end; `close` checks the body was complete.
    The same body gives the same events, joined, however it is cut into chunks.
    """

    def __init__(self, boundary: bytes, *, max_header_size: int = MAX_HEADER_SIZE) -> None:
        if not boundary:
            raise ValueError("empty boundary")
        self._delimiter = b"\r\n--" + boundary
        self._max_header_size = max_header_size
        # The first delimiter may open the body without a CRLF before it: pretend there is one.
        self._buffer = bytearray(b"\r\n")
        self._state = _PREAMBLE
        self._seen_delimiter = False

    def feed(self, data: bytes) -> list[Event]:
        if self._state == _EPILOGUE:
            return []
        self._buffer += data
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def _step(self, events: list[Event]) -> bool:
        """One move of the state machine; False when it needs more bytes."""
        buf, delim = self._buffer, self._delimiter
        state = self._state
        if state == _PREAMBLE:
            i = buf.find(delim)
            if i < 0:
                keep = len(delim) - 1
                if len(buf) > keep:
                    del buf[:len(buf) - keep]
                return False
            del buf[:i + len(delim)]
            self._seen_delimiter = True
            self._state = _AFTER_DELIMITER
            return True
        if state == _AFTER_DELIMITER:
            if len(buf) < 2:
                return False
            if buf[:2] == b"--":
                buf.clear()
                self._state = _EPILOGUE
                return False
            end = buf.find(b"\r\n")
            if end < 0:  # only blanks, perhaps then the CR of the CRLF, may be pending
                pending = buf[:-1] if buf.endswith(b"\r") else buf
                if len(buf) > _PADDING_MAX or pending.strip(b" \t"):
                    raise MultipartError("a boundary line is followed by unexpected bytes")
                return False
            if buf[:end].strip(b" \t"):
                raise MultipartError("a boundary line is followed by unexpected bytes")
            del buf[:end + 2]
            self._state = _HEADERS
            return True
        if state == _HEADERS:
            if len(buf) < 2:
                return False
            if buf[:2] == b"\r\n":
                block = b""
                del buf[:2]
            else:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > self._max_header_size:
                        raise MultipartError(
                            f"part headers are larger than {self._max_header_size} bytes")
                    return False
                if end > self._max_header_size:
                    raise MultipartError(
                        f"part headers are larger than {self._max_header_size} bytes")
                block = bytes(buf[:end])
                del buf[:end + 4]
            events.append(("part", _parse_headers(block)))
            self._state = _BODY
            return True
        if state == _BODY:
            i = buf.find(delim)
            if i >= 0:
                if i:
                    events.append(("data", bytes(buf[:i])))
                del buf[:i + len(delim)]
                events.append(("end", None))
                self._state = _AFTER_DELIMITER
                return True
            ready = len(buf) - (len(delim) - 1)  # the rest may be the start of a delimiter
            if ready > 0:
                events.append(("data", bytes(buf[:ready])))
                del buf[:ready]
            return False
        return False  # _EPILOGUE: the rest is ignored

    def close(self) -> None:
        """MultipartError unless the body ended with its closing boundary."""
        if self._state == _EPILOGUE:
            return
        if self._state == _PREAMBLE:
            raise MultipartError("the body holds no multipart boundary line"
                                 " (is the boundary in Content-Type the one in the body?)")
        if self._state == _BODY:
            raise MultipartError("the body ends inside a part, before the closing boundary"
                                 " (truncated upload?)")
        raise MultipartError("the body ends without its closing boundary (truncated upload?)")


def _parse_headers(block: bytes) -> dict[str, str]:
    """Header lines of one part -> {lower-cased name: value}; folded lines are joined."""
    headers: dict[str, str] = {}
    last = None
    for line in block.split(b"\r\n") if block else []:
        if line[:1] in (b" ", b"\t") and last is not None:
            headers[last] += " " + _decode_header(line.strip())
            continue
        name, colon, value = line.partition(b":")
        name = name.strip()
        if not colon or not name or any(c <= 32 or c >= 127 for c in name):
            raise MultipartError(f"malformed part header line {_decode_header(line[:100])!r}")
        last = name.decode("ascii").lower()
        headers[last] = _decode_header(value.strip())
    return headers


# -- a whole form -----------------------------------------------------------------------------


class FormReader:
    """Feeds a body to the parser and saves its parts: files into `directory`, fields in memory.

    On an error, `directory` keeps what was written so far: the caller removes it.
    """

    def __init__(self, boundary: bytes, directory: Path, *,
                 max_parts: int = DEFAULT_MAX_PARTS,
                 max_field_size: int = DEFAULT_MAX_FIELD_SIZE) -> None:
        self.form = Form(Path(directory))
        self._parser = MultipartParser(boundary)
        self._max_parts = max_parts
        self._max_field_size = max_field_size
        self._parts = 0
        self._names: set[str] = set()
        self._field: str | None = None  # name of the current text field
        self._value = bytearray()
        self._file: BinaryIO | None = None
        self._saved: dict[str, Any] = {}
        self._refused: UnsafeFilename | None = None  # raised by finish()
        self._dropping = False  # in a file part that is not saved

    def feed(self, chunk: bytes) -> None:
        self.form.size += len(chunk)
        for kind, value in self._parser.feed(chunk):
            if kind == "data":
                self._data(value)
            elif kind == "part":
                self._begin(value)
            else:
                self._end()

    def finish(self) -> Form:
        self._parser.close()
        if self._refused is not None:
            raise self._refused
        return self.form

    def close(self) -> None:
        """Close a file left open by an error."""
        if self._file is not None:
            file, self._file = self._file, None
            file.close()

    def _begin(self, headers: dict[str, str]) -> None:
        self._parts += 1
        if self._parts > self._max_parts:
            raise MultipartError(f"the form has more than {self._max_parts} parts")
        disposition = headers.get("content-disposition")
        if disposition is None:
            raise MultipartError(f"part {self._parts} has no Content-Disposition header")
        kind, params = parse_params(disposition)
        if kind != "form-data":
            raise MultipartError(f"part {self._parts} is {kind!r}, not form-data")
        name = params.get("name", "")
        if not name:
            raise MultipartError(f"part {self._parts} has no name")
        if "filename" not in params:
            if name in self.form.fields or name == self._field:
                raise MultipartError(f"field {name!r} is given twice")
            self._field = name
            self._value = bytearray()
            return
        try:
            filename = safe_filename(params["filename"])
            if filename in self._names:
                raise UnsafeFilename(f"two files are named {filename!r}"
                                     f" (from {params['filename']!r}): names must be unique")
        except UnsafeFilename as exc:
            self._refused = self._refused or exc
        if self._refused is not None:
            self._dropping = True
            return
        self._names.add(filename)
        self.form.directory.mkdir(parents=True, exist_ok=True)
        path = self.form.directory / filename
        fd = os.open(path, _FILE_FLAGS, 0o644)
        self._file = os.fdopen(fd, "wb", buffering=_WRITE_BUFFER)
        self._saved = {"name": filename, "path": path, "size": 0, "field": name,
                       "content_type": headers.get("content-type", "")}

    def _data(self, data: bytes) -> None:
        if self._dropping:
            return
        if self._file is not None:
            self._file.write(data)
            self._saved["size"] += len(data)
            return
        self._value += data
        if len(self._value) > self._max_field_size:
            raise MultipartError(f"field {self._field!r} is larger than"
                                 f" {self._max_field_size} bytes")

    def _end(self) -> None:
        if self._dropping:
            self._dropping = False
            return
        if self._file is not None:
            self.close()
            self.form.files.append(SavedFile(**self._saved))
            return
        assert self._field is not None
        try:
            self.form.fields[self._field] = self._value.decode("utf-8")
        except UnicodeDecodeError:
            raise MultipartError(f"field {self._field!r} is not valid UTF-8") from None
        self._field = None


def read_form(chunks: Iterable[bytes], content_type: str | None, directory: Path, *,
              max_parts: int = DEFAULT_MAX_PARTS,
              max_field_size: int = DEFAULT_MAX_FIELD_SIZE,
              max_body: int | None = None) -> Form:
    """`receive_form` for a body that is already at hand (tests, tools)."""
    reader = FormReader(boundary_of(content_type), directory, max_parts=max_parts,
                        max_field_size=max_field_size)
    try:
        for chunk in chunks:
            if max_body is not None and reader.form.size + len(chunk) > max_body:
                raise BodyTooLarge(f"request body is larger than {max_body} bytes")
            reader.feed(chunk)
        return reader.finish()
    finally:
        reader.close()


async def receive_form(request: Request, dest_dir: Path, *,
                       max_parts: int = DEFAULT_MAX_PARTS,
                       max_field_size: int = DEFAULT_MAX_FIELD_SIZE,
                       max_body: int) -> Form:
    """Read a multipart/form-data request, saving file parts into `dest_dir` as they arrive.

    Raises MultipartError (400: malformed, or over a cap), its subclasses BodyTooLarge (413)
    and UnsafeFilename (a file name that cannot be used: raised only after the whole body was
    read and found well-formed, so the client gets the answer). On any error `dest_dir` keeps what
    was written: the caller removes it (it should be a fresh directory under
    DATAPATH/.incoming, created here if missing).
    """
    boundary = boundary_of(request.headers.get("content-type"))
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise BodyTooLarge(f"request body is larger than {max_body} bytes")
    Path(dest_dir).mkdir(parents=True, exist_ok=True)
    reader = FormReader(boundary, dest_dir, max_parts=max_parts, max_field_size=max_field_size)
    try:
        async for chunk in _body(request, max_body):
            if reader.form.size + len(chunk) > max_body:
                raise BodyTooLarge(f"request body is larger than {max_body} bytes")
            reader.feed(chunk)
        return reader.finish()
    finally:
        reader.close()


async def _body(request: Request, max_body: int) -> AsyncIterator[bytes]:
    try:
        async for chunk in limits.body(request, max_body):  # size and pace (limits.py)
            yield chunk
    except limits.BodyTooLarge as exc:
        raise BodyTooLarge(str(exc)) from None
    except ClientDisconnect:
        raise MultipartError("the client disconnected before the body ended") from None


# -- from a form to a job's input.zip ---------------------------------------------------------

PathLike = Union[str, "os.PathLike[str]"]


def build_input_zip(form: Form, dest: Path, *, limits: archive.Limits,
                    required: str | None = "run.sh", level: int = 0,
                    fsync: bool = True) -> str:
    """Turn the form's files into a job's `input.zip` at `dest`; returns how:

    - one file that is a zip (by content): checked with `archive.check_zip` and used as it is
      ("zip");
    - one file that is a tar (plain, gz, bz2, xz): unpacked safely into a scratch directory
      beside `dest` (so under DATAPATH/.incoming, never /tmp) and zipped ("tar", "tar.gz"...);
    - otherwise the files, zipped together at the top level ("files").

    `required` (the entry point) must be a regular file at the top. Raises
    archive.ArchiveError for what the job cannot be made of (the message says why).
    Zipped files are stored (`level` 0) by default: they are unpacked again when the job
    starts, and deflating gigabytes would only delay the client's answer (512 MiB: 15 s at
    level 1 on a busy machine).
    """
    files = form.files
    if not files:
        raise archive.ArchiveError(f"{required} does not exist in the input file" if required
                                   else "the form holds no file")
    dest = Path(dest)
    if len(files) == 1:
        kind = archive.detect(files[0].path)
        if kind == "zip":
            archive.check_zip(files[0].path, limits, required)
            if fsync:
                _fsync_file(files[0].path)
            os.replace(files[0].path, dest)
            return kind
        if kind is not None:
            scratch = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
            try:
                archive.extract(files[0].path, scratch, limits)
                if required is not None and not _is_regular(scratch / required):
                    raise archive.ArchiveError(f"{required} does not exist in the input file")
                pack.pack_zip(scratch, dest, level=level)
            finally:
                shutil.rmtree(scratch)
            return kind
    names = {f.name for f in files}
    if required is not None and required not in names:
        raise archive.ArchiveError(f"{required} does not exist in the input file")
    if len(files) > limits.max_entries:
        raise archive.ArchiveError(f"the input has {len(files)} files, more than the limit"
                                   f" of {limits.max_entries}")
    total = sum(f.size for f in files)
    if total > limits.max_size:
        raise archive.ArchiveError(f"the input files hold {total} bytes, more than the limit"
                                   f" of {limits.max_size}")
    pack.pack_zip(form.directory, dest, level=level)
    return "files"


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _fsync_file(path: PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
