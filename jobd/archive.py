"""Safe inspection and extraction of zip and tar archives.

jobd runs as root and unpacks archives strangers uploaded (the classic daemon extracted `../`
paths blindly). So every member name, type, link target and size is checked, sizes are
counted on the bytes actually written rather than trusted from headers, and every file is
created relative to a directory descriptor opened with O_NOFOLLOW: no path through a symlink
is ever followed, whatever an archive contains or what was in `dest` before.

Decisions:
- A backslash in a member name is a separator (old Windows zip tools write `dir\\file`); the
  name is then checked like any other, so `..\\x` is refused.
- A symlink target may climb with leading `..` components and then only descend (`../lib/x`,
  `sub/x`): with `..` after a name the lexical check would not hold once that name is itself
  a symlink, so such targets are refused. Absolute targets are refused.
- No entry may have a file or a symlink as an ancestor, and no file or symlink may take the
  name of a directory other entries are in (in either order), so a symlink can never
  redirect another entry.
- Tar hard links may only name an earlier regular file of the archive.
- Modes: files become 0o755 when any execute bit is set, else 0o644; directories 0o755;
  no setuid, setgid or sticky bits, no owners. Modification times are kept.
- The compression ratio is only checked once the total passes `Limits.ratio_floor`: small
  archives of very compressible text are common and harmless.
- On error, `extract` leaves what it created in `dest` for the caller to remove
  (shutil.rmtree does not follow symlinks). ArchiveError means the archive is at fault;
  OSError while writing contents (disk full) propagates as it is.
"""

from __future__ import annotations

import bz2
import io
import logging
import os
import re
import stat
import struct
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Union

if TYPE_CHECKING:
    import tarfile

try:
    import lzma
except ImportError:  # an optional stdlib module: tar.xz is then not recognised
    lzma = None  # type: ignore[assignment]

__all__ = ["ArchiveError", "Limits", "check_zip", "detect", "extract", "safe_name"]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

_CHUNK = 256 << 10  # copy unit
_HEADER_BUDGET = 1 << 20  # bytes tarfile may read to parse one member's headers
_NAME_MAX = 255  # bytes in one path component (Linux)
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
_DRIVE = re.compile(r"[A-Za-z]:")
_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SPECIAL = {stat.S_IFCHR: "character device", stat.S_IFBLK: "block device",
            stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket"}

_READ_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError,
    ValueError, NotImplementedError, RuntimeError, struct.error)
if lzma is not None:
    _READ_ERRORS += (lzma.LZMAError,)


def _tar_read_errors() -> tuple[type[BaseException], ...]:
    """What reading a tar may raise: `_READ_ERRORS` and tarfile's own errors.

    tarfile (and gzip) are imported on the first tar input, not at start: most inputs are
    zips, and this keeps an idle daemon's memory down.
    """
    import tarfile

    return (*_READ_ERRORS, tarfile.TarError)


class ArchiveError(ValueError):
    """The archive is unsafe or damaged; the message names the offending entry."""


@dataclass(frozen=True)
class Limits:
    """What one archive may unpack to."""

    max_size: int = 4 << 30  # total bytes unpacked
    max_entries: int = 100_000
    max_ratio: int = 200  # total unpacked / archive size ...
    ratio_floor: int = 16 << 20  # ... checked only once the total passes this
    max_name: int = 4096  # characters in a member name or link target
    max_depth: int = 64  # components in a member path


_DEFAULT = Limits()


def _q(name: str) -> str:
    """A member name quoted for a message, shortened if huge."""
    return repr(name if len(name) <= 200 else name[:200] + "...")


def _entry(name: str, detail: str) -> ArchiveError:
    return ArchiveError(f"entry {_q(name)}: {detail}")


# -- names ------------------------------------------------------------------------------------


def _parts(name: str, limits: Limits = _DEFAULT) -> list[str]:
    """The checked components of a member name; [] for the top directory itself."""
    if not name:
        raise _entry(name, "empty name")
    if "\x00" in name:
        raise _entry(name, "name contains a NUL byte")
    if len(name) > limits.max_name:
        raise _entry(name, f"name is longer than {limits.max_name} characters")
    unified = name.replace("\\", "/")
    if unified.startswith("/"):
        raise _entry(name, "absolute path")
    if _DRIVE.match(unified):
        raise _entry(name, "path starts with a drive letter")
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _entry(name, "path escapes the working directory")
    if len(parts) > limits.max_depth:
        raise _entry(name, f"path is deeper than {limits.max_depth} levels")
    for part in parts:
        try:
            size = len(part.encode("utf-8", "surrogateescape"))
        except UnicodeEncodeError:
            raise _entry(name, "name is not valid UTF-8") from None
        if size > _NAME_MAX:
            raise _entry(name, f"a path component is longer than {_NAME_MAX} bytes")
    return parts


def safe_name(name: str, limits: Limits = _DEFAULT) -> str:
    """Normalise an archive member name to a relative POSIX path, or refuse it.

    Pure. Directories (a trailing separator) keep a trailing "/". Refused with ArchiveError:
    empty names, NUL bytes, absolute paths, drive letters, `..` components anywhere, names
    that normalise to the top directory, and names over the length or depth limits.
    """
    parts = _parts(name, limits)
    if not parts:
        raise _entry(name, "names the working directory itself")
    path = "/".join(parts)
    return path + "/" if name.endswith(("/", "\\")) else path


def _check_link(name: str, parts: list[str], target: str, limits: Limits) -> None:
    """Refuse a symlink target that could lead outside the tree (see the module notes)."""
    if not target:
        raise _entry(name, "symlink with an empty target")
    shown = _q(target)
    if "\x00" in target or "\\" in target or len(target) > limits.max_name:
        raise _entry(name, f"symlink target {shown} is not allowed")
    if target.startswith("/"):
        raise _entry(name, f"symlink target {shown} is absolute")
    steps = [p for p in target.split("/") if p not in ("", ".")]
    ups = 0
    while ups < len(steps) and steps[ups] == "..":
        ups += 1
    if ".." in steps[ups:]:
        raise _entry(name, f"symlink target {shown} has '..' after a name")
    if ups > len(parts) - 1:
        raise _entry(name, f"symlink target {shown} escapes the working directory")
    resolved = parts[:len(parts) - 1 - ups] + steps[ups:]
    if resolved[:len(parts)] == parts:  # a loop: path tools resolve it in surprising ways
        raise _entry(name, f"symlink target {shown} leads through the link itself")


# -- detection --------------------------------------------------------------------------------


def _is_tar_header(block: bytes) -> bool:
    """A valid ustar/gnu/v7 header: the checksum (what tarfile checks) must match."""
    if len(block) < 512:
        return False
    field = block[148:156].replace(b"\x00", b" ").strip()
    if not field or not all(48 <= c <= 55 for c in field):
        return False
    stored = int(field, 8)
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:512])
    signed = unsigned - 256 * sum(1 for c in block[:148] + block[156:512] if c > 127)
    return stored in (unsigned, signed)


_COMPRESSED = (("tar.gz", b"\x1f\x8b"), ("tar.bz2", b"BZh"), ("tar.xz", b"\xfd7zXZ\x00"))


def _decompressed(kind: str, raw: BinaryIO) -> BinaryIO:
    """The tar stream inside a compressed file (`raw` itself for a plain tar)."""
    if kind == "tar.gz":
        import gzip  # on first use: keeps idle memory down (see _tar_read_errors)

        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if kind == "tar.bz2":
        return bz2.BZ2File(raw)  # type: ignore[return-value]
    if kind == "tar.xz" and lzma is not None:
        return lzma.LZMAFile(raw)  # type: ignore[return-value]
    return raw


def detect(path: PathLike) -> str | None:
    """"zip", "tar", "tar.gz", "tar.bz2" or "tar.xz" by content (never by name), else None."""
    with open(path, "rb") as f:
        head = f.read(512)
        if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
            return "zip"
        if _is_tar_header(head):
            return "tar"
        for kind, magic in _COMPRESSED:
            if head.startswith(magic):
                f.seek(0)
                inner = _decompressed(kind, f)
                if inner is f:
                    return None  # xz without the lzma module
                try:
                    with inner:
                        first = inner.read(512)
                except _READ_ERRORS as exc:
                    log.debug("%s looks like %s but does not decompress: %s", path, kind, exc)
                    return None
                return kind if _is_tar_header(first) else None
    return None


# -- zip --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Member:
    """One checked entry: what to create, independent of the archive format."""

    name: str  # as in the archive, for messages
    parts: tuple[str, ...]
    kind: str  # "file", "dir", "link" or "hardlink"
    mode: int = 0o644
    mtime: float | None = None
    target: str = ""  # symlink target, or hard link source (normalised)
    source: zipfile.ZipInfo | tarfile.TarInfo | None = None  # where contents come from


def _damaged_zip(detail: object) -> ArchiveError:
    return ArchiveError(f"input is a damaged zip file: {detail}")


def _check_directory(f: BinaryIO, limits: Limits) -> None:
    """Refuse a central directory zipfile should not load: too many records or bytes.

    zipfile reads the whole directory into memory and builds an object per record before
    anyone can count them, so the directory is first walked here, record sizes only, from
    where zipfile will start (its own _EndRecData, so both see the same directory). Anything
    malformed is left to zipfile to report.
    """
    z: Any = zipfile  # its private helpers, present from 2.x to 3.13
    if not hasattr(z, "_EndRecData"):  # a future Python: zipfile alone must do
        log.warning("zipfile._EndRecData is gone: central directories are not pre-checked")
        return
    try:
        end = z._EndRecData(f)  # raises for some damaged zip64 records (found by fuzzing)
    except _READ_ERRORS as exc:
        raise _damaged_zip(exc) from exc
    if not end:
        return
    size = end[z._ECD_SIZE]
    start = end[z._ECD_LOCATION] - size
    if end[z._ECD_SIGNATURE] == z.stringEndArchive64:
        start -= z.sizeEndCentDir64 + z.sizeEndCentDir64Locator
    cap = max(16 << 20, limits.max_entries << 10)
    if size > cap:
        raise ArchiveError(f"input has a central directory larger than {cap} bytes")
    f.seek(max(0, start))
    walked = seen = 0
    while walked < size:
        record = f.read(46)
        if len(record) < 46 or record[:4] != b"PK\x01\x02":
            return
        n, m, k = struct.unpack("<3H", record[28:34])
        f.seek(n + m + k, io.SEEK_CUR)
        walked += 46 + n + m + k
        seen += 1
        if seen > limits.max_entries:
            raise ArchiveError(f"input has more than {limits.max_entries} entries")


def _check_layout(zf: zipfile.ZipFile, f: BinaryIO, size: int) -> None:
    """Each entry's local header and data inside the file, before the central directory,
    named as in the directory, and no two entries sharing bytes (overlap is how the
    non-recursive zip bombs multiply their output)."""
    cd_start = getattr(zf, "start_dir", size)
    spans = []
    for info in zf.infolist():
        name = info.orig_filename
        at = info.header_offset
        if at < 0 or at + 30 > cd_start:
            raise _damaged_zip(f"entry {_q(name)} lies outside the file")
        f.seek(at)
        header = f.read(30)
        if header[:4] != b"PK\x03\x04":
            raise _damaged_zip(f"entry {_q(name)} has no local header")
        n, m = struct.unpack("<2H", header[26:30])
        local_name = f.read(n)
        encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
        try:
            central = name.encode(encoding)
        except UnicodeEncodeError:  # zipfile decoded it otherwise (metadata_encoding)
            central = local_name
        if local_name != central:
            raise _damaged_zip(f"entry {_q(name)} has another name in its local header")
        data_end = at + 30 + n + m + info.compress_size
        if data_end > cd_start:
            raise _damaged_zip(f"entry {_q(name)} lies outside the file")
        spans.append((at, data_end, name))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise _damaged_zip(f"entries {_q(first)} and {_q(second)} overlap")


def _zip_mtime(info: zipfile.ZipInfo) -> float | None:
    """The extended timestamp (UTC) when present, else the DOS time (local time)."""
    extra = info.extra
    while len(extra) >= 4:
        tag, length = struct.unpack("<2H", extra[:4])
        body = extra[4:4 + length]
        if tag == 0x5455 and len(body) >= 5 and body[0] & 1:
            return float(struct.unpack("<i", body[1:5])[0])
        extra = extra[4 + length:]
    try:
        return time.mktime((*info.date_time, 0, 0, -1))
    except (OverflowError, ValueError):
        return None


def _zip_members(zf: zipfile.ZipFile, f: BinaryIO, size: int, limits: Limits,
                 required: str | None) -> list[_Member]:
    _check_layout(zf, f, size)
    members: list[_Member] = []
    total = 0
    for info in zf.infolist():
        name = info.orig_filename  # before zipfile cut it at a NUL byte
        unix = info.external_attr >> 16
        ftype = stat.S_IFMT(unix)
        is_dir = name.endswith(("/", "\\")) or ftype == stat.S_IFDIR
        parts = _parts(name, limits)
        if not parts:
            if is_dir:
                continue  # "./": the top directory itself
            safe_name(name, limits)  # raises
        if info.flag_bits & 0x1:
            raise ArchiveError(f"entry {_q(name)} is encrypted")
        if ftype in _SPECIAL:
            raise _entry(name, f"{_SPECIAL[ftype]} entries are not allowed")
        if is_dir:
            members.append(_Member(name, tuple(parts), "dir", 0o755, _zip_mtime(info)))
            continue
        if info.compress_type not in _ZIP_METHODS:
            raise _entry(name, f"unsupported compression method {info.compress_type}")
        total += info.file_size
        _check_total(name, total, size, limits)
        if ftype == stat.S_IFLNK:
            target = _zip_link_target(zf, info, limits)
            _check_link(name, parts, target, limits)
            members.append(_Member(name, tuple(parts), "link", 0o777, _zip_mtime(info),
                                   target))
        elif ftype in (0, stat.S_IFREG):
            mode = 0o755 if unix & 0o111 else 0o644
            members.append(_Member(name, tuple(parts), "file", mode, _zip_mtime(info),
                                   source=info))
        else:
            raise _entry(name, f"unknown file type {ftype:#o}")
    _check_tree(members, required)
    return members


def _zip_link_target(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: Limits) -> str:
    name = info.orig_filename
    if info.file_size > limits.max_name:
        raise _entry(name, "symlink target is too long")
    try:
        with zf.open(info) as member:
            raw = member.read(limits.max_name + 1)
    except _READ_ERRORS as exc:
        raise _damaged_zip(f"entry {_q(name)}: {exc}") from exc
    return raw.decode("utf-8", "surrogateescape")


def _check_total(name: str, total: int, archive_size: int, limits: Limits) -> None:
    """The size and ratio caps, on declared or on written bytes."""
    if total > limits.max_size:
        raise _entry(name, f"input unpacks to more than {limits.max_size} bytes")
    if total > limits.ratio_floor and total > archive_size * limits.max_ratio:
        raise _entry(name, f"compression ratio above {limits.max_ratio}:1")


class _Names:
    """The paths claimed so far: refuses duplicates and entries below a file or a symlink.

    Entries are claimed in archive order; a directory that only exists as the parent of
    earlier entries ("parent") may still get its own directory entry.
    """

    def __init__(self) -> None:
        self.kinds: dict[tuple[str, ...], str] = {(): "dir"}

    def claim(self, member: _Member) -> None:
        for depth in range(1, len(member.parts)):
            here = member.parts[:depth]
            if self.kinds.setdefault(here, "parent") not in ("dir", "parent"):
                raise _entry(member.name, f"parent {'/'.join(here)!r} is not a directory")
        old = self.kinds.get(member.parts)
        if old == "parent" and member.kind != "dir":
            raise _entry(member.name, "is also the directory of other entries")
        if old is not None and not (member.kind == "dir" and old in ("dir", "parent")):
            raise _entry(member.name, "duplicate entry")
        self.kinds[member.parts] = member.kind


def _check_tree(members: list[_Member], required: str | None) -> None:
    """The tree the members make is sound, and the required file is in it."""
    names = _Names()
    for member in members:
        names.claim(member)
    if required is not None:
        kind = names.kinds.get(tuple(p for p in required.split("/") if p not in ("", ".")))
        if kind is None:
            raise ArchiveError(f"{required} does not exist in the input file")
        if kind != "file":
            raise _entry(required, "must be a regular file")


def _open_zip(f: BinaryIO, limits: Limits) -> zipfile.ZipFile:
    """zipfile's view of `f` once it is a zip of acceptable size (zipfile shares `f`)."""
    if f.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):
        raise ArchiveError("input is not a zip file")
    _check_directory(f, limits)
    try:
        return zipfile.ZipFile(f)
    except _READ_ERRORS as exc:
        raise _damaged_zip(exc) from exc


def check_zip(path: PathLike, limits: Limits = _DEFAULT,
              required: str | None = "run.sh") -> list[str]:
    """Validate a zip without extracting it; the normalised names, in archive order.

    Reads the central directory and the local headers, and only the contents of symlink
    entries (their targets). `required` (a relative POSIX path, `run.sh` or the entry point of
    a native job such as `bin/main.py`) must be a regular file of the archive.
    """
    with open(path, "rb") as f, _open_zip(f, limits) as zf:
        size = os.fstat(f.fileno()).st_size
        members = _zip_members(zf, f, size, limits, required)
    return ["/".join(m.parts) + ("/" if m.kind == "dir" else "") for m in members]


# -- writing ----------------------------------------------------------------------------------


class _Tree:
    """Creates entries below `dest` through directory descriptors, never following a link."""

    def __init__(self, dest: Path, limits: Limits, archive_size: int, damaged: str,
                 read_errors: tuple[type[BaseException], ...] = _READ_ERRORS) -> None:
        self.limits = limits
        self.damaged = damaged  # "input is a damaged zip file", or tar
        self.read_errors = read_errors  # what reading the archive may raise
        self.archive_size = archive_size
        self.written = 0
        self.entries = 0
        self.names = _Names()
        self.made: set[tuple[str, ...]] = {()}  # directories known to exist
        self.dir_times: list[tuple[tuple[str, ...], float]] = []
        dest.mkdir(parents=True, exist_ok=True)
        self.root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._cached: tuple[tuple[str, ...], int] = ((), self.root)

    def close(self) -> None:
        if self._cached[1] != self.root:
            os.close(self._cached[1])
        os.close(self.root)

    def count(self) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise ArchiveError(f"input has more than {self.limits.max_entries} entries")

    def add(self, member: _Member, contents: BinaryIO | None = None) -> None:
        """Create one checked member (`contents` for files)."""
        self.names.claim(member)
        if member.kind == "dir":
            self._dir(member.parts, member.name)
            if member.mtime is not None:
                self.dir_times.append((member.parts, member.mtime))
            return
        parent = self._dir(member.parts[:-1], member.name)
        leaf = member.parts[-1]
        try:
            if member.kind == "link":
                os.symlink(member.target, leaf, dir_fd=parent)
            elif member.kind == "hardlink":
                self._hardlink(member, parent, leaf)
                return
            else:
                fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600, dir_fd=parent)
        except OSError as exc:
            raise _entry(member.name, f"cannot create: {exc.strerror}") from exc
        if member.kind == "link":
            _set_mtime(leaf, member.mtime, dir_fd=parent)
            return
        assert contents is not None
        with os.fdopen(fd, "wb") as out:
            self._copy(member.name, contents, out)
            out.flush()
            os.fchmod(out.fileno(), member.mode)
            _set_mtime(out.fileno(), member.mtime)

    def _copy(self, name: str, contents: BinaryIO, out: BinaryIO) -> None:
        """Copy while counting written bytes against the caps (headers are not trusted)."""
        while True:
            try:
                piece = contents.read(_CHUNK)
            except ArchiveError:
                raise
            except self.read_errors as exc:
                raise ArchiveError(f"{self.damaged}: entry {_q(name)}: {exc}") from exc
            if not piece:
                return
            self.written += len(piece)
            _check_total(name, self.written, self.archive_size, self.limits)
            out.write(piece)

    def _hardlink(self, member: _Member, parent: int, leaf: str) -> None:
        source = tuple(member.target.split("/"))
        if self.names.kinds.get(source) != "file":
            raise _entry(member.name, f"hard link target {member.target!r} is not an earlier "
                         "regular file of the archive")
        source_dir = self._open_dir(source[:-1], member.name, create=False)
        try:
            os.link(source[-1], leaf, src_dir_fd=source_dir, dst_dir_fd=parent,
                    follow_symlinks=False)
        except OSError as exc:
            raise _entry(member.name, f"cannot create: {exc.strerror}") from exc
        finally:
            os.close(source_dir)

    def _dir(self, parts: tuple[str, ...], name: str) -> int:
        """A descriptor of directory `parts` (created as needed), cached for the next entry."""
        if self._cached[0] == parts:
            return self._cached[1]
        fd = self._open_dir(parts, name, create=True)
        if self._cached[1] != self.root:
            os.close(self._cached[1])
        self._cached = (parts, fd)
        return fd

    def _open_dir(self, parts: tuple[str, ...], name: str, *, create: bool) -> int:
        """Walk down from the root one O_NOFOLLOW open at a time; a new descriptor."""
        current = os.dup(self.root)
        try:
            for depth in range(1, len(parts) + 1):
                here = parts[:depth]
                made = False
                if create and here not in self.made:
                    try:
                        os.mkdir(here[-1], 0o700, dir_fd=current)
                        made = True
                    except FileExistsError:  # dest was not empty: opened without following
                        log.debug("%s already exists in the destination", "/".join(here))
                    self.made.add(here)
                fd = os.open(here[-1], _NOFOLLOW_DIR, dir_fd=current)
                os.close(current)
                current = fd
                if made:
                    os.fchmod(current, 0o755)
        except OSError as exc:
            os.close(current)
            raise _entry(name, f"cannot create a directory: {exc.strerror}") from exc
        return current

    def finish(self) -> None:
        """Directory times last (creating their entries changed them), deepest first."""
        for parts, mtime in sorted(self.dir_times, key=lambda item: -len(item[0])):
            fd = self._open_dir(parts, "/".join(parts), create=False)
            try:
                _set_mtime(fd, mtime)
            finally:
                os.close(fd)


def _set_mtime(target: int | str, mtime: float | None, *, dir_fd: int | None = None) -> None:
    """Keep the archive's time where the OS can store it; an odd time is not worth failing."""
    if mtime is None:
        return
    try:
        if isinstance(target, int):
            os.utime(target, (mtime, mtime))
        else:
            os.utime(target, (mtime, mtime), dir_fd=dir_fd, follow_symlinks=False)
    except (OverflowError, ValueError, OSError) as exc:
        log.debug("cannot set the time of %s to %r: %s", target, mtime, exc)


# -- extraction -------------------------------------------------------------------------------


class _HeaderBudget:
    """A file wrapper that caps what tarfile may read while parsing headers.

    tarfile reads GNU long names, pax headers and sparse maps whole into memory; a few
    kilobytes of gzip can declare gigabytes of them. While `budget` is set, reads beyond it
    raise instead.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.budget: int | None = None

    def read(self, size: int = -1) -> bytes:
        if self.budget is not None:
            if size is None or size < 0 or size > self.budget:
                raise ArchiveError("input is a damaged tar file: a member's headers are "
                                   f"larger than {_HEADER_BUDGET} bytes")
            data = self._raw.read(size)
            self.budget -= len(data)
            return data
        return self._raw.read(size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()


def _tar_members(tf: tarfile.TarFile, reader: _HeaderBudget,
                 limits: Limits) -> Iterator[_Member]:
    """Checked members, read one at a time (tarfile's member list is not kept)."""
    read_errors = _tar_read_errors()
    while True:
        reader.budget = _HEADER_BUDGET
        try:
            info = tf.next()
        except ArchiveError:
            raise
        except read_errors as exc:
            raise ArchiveError(f"input is a damaged tar file: {exc}") from exc
        finally:
            reader.budget = None
        if info is None:
            return
        tf.members = []  # memory stays flat however many members there are
        name = info.name
        parts = tuple(_parts(name, limits))
        if not parts:
            if info.isdir():
                yield _Member(name, parts, "skip")
                continue
            safe_name(name, limits)  # raises
        if info.isdir():
            yield _Member(name, parts, "dir", 0o755, info.mtime)
        elif info.issym():
            _check_link(name, list(parts), info.linkname, limits)
            yield _Member(name, parts, "link", 0o777, info.mtime, info.linkname)
        elif info.islnk():
            try:
                target = "/".join(_parts(info.linkname, limits))
            except ArchiveError as exc:  # name the link, not only its target
                detail = str(exc).split(": ", 1)[-1]
                raise _entry(name, f"hard link target {_q(info.linkname)}: {detail}") from None
            yield _Member(name, parts, "hardlink", target=target)
        elif info.isreg():
            mode = 0o755 if info.mode & 0o111 else 0o644
            yield _Member(name, parts, "file", mode, info.mtime, source=info)
        elif info.ischr() or info.isblk() or info.isfifo():
            kind = "character device" if info.ischr() else (
                "block device" if info.isblk() else "FIFO")
            raise _entry(name, f"{kind} entries are not allowed")
        else:
            raise _entry(name, f"unsupported tar entry type {info.type!r}")


def _extract_tar(path: PathLike, kind: str, tree: _Tree) -> None:
    import tarfile  # on first use: keeps idle memory down (see _tar_read_errors)

    with open(path, "rb") as raw, _decompressed(kind, raw) as stream:
        reader = _HeaderBudget(stream)
        try:
            reader.budget = _HEADER_BUDGET
            tf = tarfile.open(  # noqa: SIM115 - entered below, once errors are translated
                fileobj=reader, mode="r:", encoding="utf-8", errors="surrogateescape")
        except ArchiveError:
            raise
        except tree.read_errors as exc:
            raise ArchiveError(f"input is a damaged tar file: {exc}") from exc
        finally:
            reader.budget = None
        with tf:
            for member in _tar_members(tf, reader, tree.limits):
                tree.count()
                if member.kind == "skip":
                    continue
                if member.kind != "file":
                    tree.add(member)
                    continue
                contents = tf.extractfile(member.source)  # type: ignore[arg-type]
                assert contents is not None
                with contents:
                    tree.add(member, contents)


def _extract_zip(path: PathLike, tree: _Tree) -> None:
    with open(path, "rb") as f, _open_zip(f, tree.limits) as zf:
        size = os.fstat(f.fileno()).st_size
        members = _zip_members(zf, f, size, tree.limits, None)
        for member in members:
            tree.count()
            if member.kind != "file":
                tree.add(member)
                continue
            try:
                contents = zf.open(member.source)  # type: ignore[arg-type]
            except _READ_ERRORS as exc:
                raise _damaged_zip(f"entry {_q(member.name)}: {exc}") from exc
            with contents:
                tree.add(member, contents)


def extract(path: PathLike, dest: PathLike, limits: Limits = _DEFAULT) -> None:
    """Unpack a zip or tar (any `detect` kind) into `dest`, created if missing.

    Never writes outside `dest`; refuses what `check_zip` refuses and, for tar, devices,
    FIFOs and hard links to anything but an earlier regular member. Caps apply to the bytes
    actually written. On ArchiveError, `dest` keeps what was created so far.
    """
    kind = detect(path)
    if kind is None:
        raise ArchiveError("input is not a zip or tar archive")
    size = os.path.getsize(path)
    if kind == "zip":
        tree = _Tree(Path(dest), limits, size, "input is a damaged zip file")
    else:
        tree = _Tree(Path(dest), limits, size, "input is a damaged tar file", _tar_read_errors())
    try:
        if kind == "zip":
            _extract_zip(path, tree)
        else:
            _extract_tar(path, kind, tree)
        tree.finish()
    finally:
        tree.close()
