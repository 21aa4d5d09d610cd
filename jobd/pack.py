"""Packing a job's working directory and streaming archives and base64 out of it.

Everything here streams in bounded chunks: a 1 GiB result is packed and served with
a few MiB of memory (the zip central directory, O(entries), is the only thing that
grows, and it grows with the number of files, not their size).

jobd may run as root while the job it packs is still running and hostile, so the
directory walk never follows a symlink: it walks with directory file descriptors
(``openat`` with ``O_NOFOLLOW``), so a directory swapped for a symlink halfway
through cannot redirect it to ``/etc``. Symlinks are stored as symlinks.
POSIX only (jobd is a Linux daemon).
"""

from __future__ import annotations

import binascii
import errno
import logging
import mimetypes
import os
import stat
import struct
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Optional

from jobd.files import fsync_dir

if TYPE_CHECKING:
    import tarfile

__all__ = [
    "FileInfo",
    "base64_size",
    "iter_base64",
    "iter_tar_gz",
    "iter_zip",
    "list_dir",
    "list_zip",
    "open_child",
    "open_in_zip",
    "pack_zip",
    "safe_child",
]

log = logging.getLogger("jobd.pack")

#: Deeper trees are cut (with a warning): the walk holds one fd per level.
MAX_DEPTH = 256
#: A symlink entry's content is its target; anything longer is not a real target.
MAX_LINK_TARGET = 64 * 1024
_READ_CHUNK = 1 << 20
_DOS_MIN = (1980, 1, 1, 0, 0, 0)
_DOS_MAX = (2107, 12, 31, 23, 59, 58)
_UT_EXTRA_ID = 0x5455  # Info-ZIP "extended timestamp": mtime in UTC, 1 s resolution
_TAR_BLOCK = 512  # tarfile.BLOCKSIZE
_TAR_RECORD = 20 * _TAR_BLOCK  # tarfile.RECORDSIZE

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in after lstat must not hang the open.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

# Text formats of the science codes jobd runs: shown inline rather than downloaded.
# fmt: off
_TEXT_SUFFIXES = frozenset(
    [
        ".txt", ".log", ".out", ".err", ".csv", ".tsv", ".pdb", ".ent", ".pqr", ".cif", ".mmcif",
        ".fasta", ".fa", ".faa", ".fna", ".fastq", ".fq", ".aln", ".sdf", ".mol", ".mol2", ".xyz",
        ".gro", ".top", ".itp", ".mdp", ".ndx", ".psf", ".crd", ".sh", ".py", ".r", ".md", ".yaml",
        ".yml", ".ini", ".cfg", ".conf", ".toml", ".param", ".inp", ".in",
    ]
)
# fmt: on
_ENCODING_MIME = {
    "gzip": "application/gzip",
    "bzip2": "application/x-bzip2",
    "xz": "application/x-xz",
    "compress": "application/x-compress",
    "br": "application/x-brotli",
}


@dataclass
class FileInfo:
    """One entry of a listing; `path` is relative, POSIX, without a trailing slash."""

    path: str
    size: int
    mtime: float
    mime: str
    kind: str  # "file", "dir" or "symlink"


# ---------------------------------------------------------------------------
# The walk


@dataclass
class _Entry:
    """One directory entry; `dir_fd` is only valid while the walk is suspended on it."""

    rel: str
    kind: str
    st: os.stat_result
    dir_fd: int
    name: str
    target: str = ""


def _check_dir(path: Path) -> None:
    """Fail at call time (before a response starts), not at the first chunk."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(
            errno.ENOTDIR, "not a directory (symlinks are not followed)", str(path)
        )


def _sorted_names(fd: int) -> list[str]:
    """Reverse-sorted so the walk pops them in order."""
    return sorted(os.listdir(fd), reverse=True)


def _walk(root: Path) -> Iterator[_Entry]:
    """Depth-first, sorted, directories before their content; never follows symlinks.

    Iterative with an explicit stack so a deep tree cannot hit the recursion limit.
    Entries that vanish while walking are logged and skipped.
    """
    root_fd = os.open(root, _DIR_FLAGS)
    stack: list[tuple[int, str, list[str]]] = []
    try:
        stack.append((root_fd, "", []))  # on the stack first: closed even if listing fails
        stack[-1][2].extend(_sorted_names(root_fd))
        while stack:
            fd, prefix, names = stack[-1]
            if not names:
                stack.pop()
                os.close(fd)
                continue
            name = names.pop()
            rel = prefix + name
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                log.warning("skipping %r: name is not valid UTF-8", rel)
                continue
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                log.info("skipping %s: vanished while packing", rel)
                continue
            except OSError as exc:  # EACCES when jobd is not root
                log.warning("skipping %s: %s", rel, exc)
                continue
            mode = st.st_mode
            if stat.S_ISREG(mode):
                yield _Entry(rel, "file", st, fd, name)
            elif stat.S_ISLNK(mode):
                try:
                    target = os.readlink(name, dir_fd=fd)
                except OSError as exc:
                    log.info("skipping symlink %s: %s", rel, exc)
                    continue
                yield _Entry(rel, "symlink", st, fd, name, target)
            elif stat.S_ISDIR(mode):
                yield _Entry(rel, "dir", st, fd, name)
                if len(stack) >= MAX_DEPTH:
                    log.warning("not descending into %s: deeper than %d levels", rel, MAX_DEPTH)
                    continue
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:  # vanished, or swapped for a symlink (ELOOP)
                    log.info("not descending into %s: %s", rel, exc)
                    continue
                stack.append((child, rel + "/", []))
                try:
                    stack[-1][2].extend(_sorted_names(child))
                except OSError as exc:
                    log.warning("cannot list %s: %s", rel, exc)
            else:
                log.info("skipping %s: not a file, directory or symlink (mode %o)", rel, mode)
    finally:
        for fd, _, _ in stack:
            os.close(fd)


def _open_regular(entry: _Entry) -> Optional[tuple[int, os.stat_result]]:
    """Open a walked file without following links; None (logged) if that is not possible."""
    try:
        fd = os.open(entry.name, _FILE_FLAGS, dir_fd=entry.dir_fd)
    except FileNotFoundError:
        log.info("skipping %s: vanished while packing", entry.rel)
        return None
    except OSError as exc:  # ELOOP: replaced by a symlink; EACCES: unreadable
        log.warning("skipping %s: %s", entry.rel, exc)
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        log.info("skipping %s: no longer a regular file", entry.rel)
        return None
    return fd, st


def _read_upto(fd: int, limit: int, chunk_size: int) -> Iterator[bytes]:
    """At most `limit` bytes: a file appended to meanwhile is taken as it was at open."""
    remaining = limit
    while remaining > 0:
        data = os.read(fd, min(chunk_size, remaining))
        if not data:
            return
        remaining -= len(data)
        yield data


# ---------------------------------------------------------------------------
# Zip


class _Sink:
    """A write-only, unseekable buffer: zipfile then writes data descriptors, and the
    caller drains what was produced so far."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._discard = False

    def write(self, data: bytes) -> int:
        n = len(data)
        if not self._discard:
            self._parts.append(bytes(data))
            self._size += n
        return n

    def flush(self) -> None:
        """zipfile flushes; nothing is buffered below us."""

    def __len__(self) -> int:
        return self._size

    def drain(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        self._size = 0
        return data

    def discard(self) -> None:
        """The reader is gone: drop what cleanup still writes."""
        self._discard = True
        self._parts.clear()
        self._size = 0


def _check_level(level: int) -> None:
    if not 0 <= level <= 9:
        raise ValueError(f"compression level must be 0 to 9, not {level}")


def _dos_date_time(mtime: float) -> tuple[int, int, int, int, int, int]:
    """Local time as zipfile does, clamped to what a DOS date can hold (1980-2107)."""
    try:
        t = time.localtime(mtime)
    except (OverflowError, OSError, ValueError):
        return _DOS_MIN if mtime < 0 else _DOS_MAX
    if t.tm_year < 1980:
        return _DOS_MIN
    if t.tm_year > 2107:
        return _DOS_MAX
    return (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)


def _ut_extra(mtime: float) -> bytes:
    """The exact UTC mtime, which DOS time (local, 2 s, 1980-2107) cannot carry."""
    secs = int(mtime)
    if -(1 << 31) <= secs < (1 << 31):
        return struct.pack("<HHBl", _UT_EXTRA_ID, 5, 1, secs)
    return b""


def _zipinfo(name: str, ftype: int, perm: int, mtime: float) -> zipfile.ZipInfo:
    """Unix mode in the high bits of external_attr (the Info-ZIP convention unzip reads).

    setuid/setgid/sticky are dropped: a root job must not hand out setuid files.
    """
    zi = zipfile.ZipInfo(name, date_time=_dos_date_time(mtime))
    zi.create_system = 3
    zi.external_attr = (ftype | (perm & 0o777)) << 16
    zi.extra = _ut_extra(mtime)
    return zi


def _zip_entries(zf: zipfile.ZipFile, root: Path, level: int, chunk_size: int) -> Iterator[None]:
    """Write the tree into `zf`, yielding after every chunk so a streaming caller can
    drain its sink (a file-backed caller just exhausts this)."""
    for entry in _walk(root):
        if entry.kind == "dir":
            zi = _zipinfo(entry.rel + "/", stat.S_IFDIR, entry.st.st_mode, entry.st.st_mtime)
            zi.external_attr |= 0x10  # MS-DOS directory bit
            zf.writestr(zi, b"")
        elif entry.kind == "symlink":
            zi = _zipinfo(entry.rel, stat.S_IFLNK, 0o777, entry.st.st_mtime)
            zf.writestr(zi, os.fsencode(entry.target))
        else:
            opened = _open_regular(entry)
            if opened is None:
                continue
            fd, st = opened
            try:
                zi = _zipinfo(entry.rel, stat.S_IFREG, st.st_mode, st.st_mtime)
                if level:
                    zi.compress_type = zipfile.ZIP_DEFLATED
                    zi._compresslevel = level  # the only way to set it per entry on 3.9
                zi.file_size = st.st_size
                # Decided up front: a streamed entry cannot switch to ZIP64 later.
                zip64 = st.st_size * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own margin
                with zf.open(zi, "w", force_zip64=zip64) as dest:
                    for data in _read_upto(fd, st.st_size, chunk_size):
                        dest.write(data)
                        yield
            finally:
                os.close(fd)
        yield


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def pack_zip(src_dir: Path, dest: Path, *, level: int = 1, sync: bool = True) -> int:
    """Zip the whole working directory into `dest` atomically; return the zip's size.

    Written to a temporary file beside `dest`, fsynced and renamed, so a crash never
    leaves a partial result under the final name. `sync=False` leaves the fsyncs (of `dest`
    and its directory) to the caller, who must do them before anything says `dest` exists.
    """
    _check_level(level)
    src_dir, dest = Path(src_dir), Path(dest)
    if _is_within(dest.parent.resolve(), src_dir.resolve()):
        raise ValueError(f"{dest} is inside {src_dir}: it would pack itself")
    _check_dir(src_dir)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            zf = zipfile.ZipFile(f, "w", allowZip64=True)
            steps = _zip_entries(zf, src_dir, level, _READ_CHUNK)
            try:
                for _ in steps:
                    pass
            finally:
                steps.close()  # closes an open member and the walk's fds first
                zf.close()
            f.flush()
            if sync:
                os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp_name, dest)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            log.debug("temporary %s already gone", tmp_name)
        raise
    if sync:
        fsync_dir(dest.parent)
    return size


def is_small(root: Path, *, max_entries: int = 64, max_bytes: int = 64 << 10) -> bool:
    """Does the tree under `root` hold at most `max_entries` entries and `max_bytes` bytes?

    Stops looking as soon as it is not: costs at most `max_entries` lstat calls. Packing a
    small tree on the event loop is cheaper than handing it to a worker thread.
    """
    entries = 0
    total = 0
    pending = [root]
    while pending:
        try:
            with os.scandir(pending.pop()) as listing:
                for entry in listing:
                    entries += 1
                    if entries > max_entries:
                        return False
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(Path(entry.path))
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                        if total > max_bytes:
                            return False
        except FileNotFoundError:
            continue  # nothing there (a job may remove its own directories)
        except OSError:
            return False  # let the packer meet and report the problem
    return True


def iter_zip(src_dir: Path, *, level: int = 0, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """A zip of the directory as it is now, produced on the fly (no temp file).

    For live snapshots of running jobs: each file is taken up to the size it had when
    it was opened. Entries carry data descriptors (the output is not seekable);
    level 0 (stored) is the default because snapshots should be cheap.
    """
    _check_level(level)
    _check_positive(chunk_size)
    src_dir = Path(src_dir)
    _check_dir(src_dir)
    return _started(_iter_zip(src_dir, level, chunk_size))


def _started(body: Iterator[bytes]) -> Iterator[bytes]:
    """`body` run up to its first chunk: the directory is open, or the error raised, now.

    A job that ends removes its working directory; a snapshot asked for at that moment must
    fail before its answer starts (the caller then serves the result), not halfway through.
    """
    return _resumed(next(body, None), body)


def _resumed(first: bytes | None, body: Iterator[bytes]) -> Iterator[bytes]:
    try:
        if first is not None:
            yield first
            yield from body
    finally:
        body.close()  # type: ignore[attr-defined]  # a generator


def _iter_zip(src_dir: Path, level: int, chunk_size: int) -> Iterator[bytes]:
    sink = _Sink()
    zf = zipfile.ZipFile(sink, "w", allowZip64=True)  # type: ignore[arg-type]
    steps = _zip_entries(zf, src_dir, level, chunk_size)
    try:
        for _ in steps:
            if len(sink) >= chunk_size:
                yield sink.drain()
    except BaseException:  # includes GeneratorExit: the client went away
        sink.discard()
        steps.close()
        zf.close()
        raise
    zf.close()  # the central directory
    tail = sink.drain()
    if tail:
        yield tail


def _check_positive(chunk_size: int) -> None:
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, not {chunk_size}")


# ---------------------------------------------------------------------------
# tar.gz


if TYPE_CHECKING:
    _TarMember = tuple[tarfile.TarInfo, Optional[Iterator[bytes]]]


def _tarinfo(name: str, kind: str, perm: int, mtime: float, size: int = 0) -> tarfile.TarInfo:
    """Owner-neutral (uid 0, no names): the client's user owns what it extracts."""
    # tarfile only when a tar.gz is asked for (a dict lookup after the first): it keeps an
    # idle daemon's memory down.
    import tarfile

    ti = tarfile.TarInfo(name)
    ti.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE}[kind]
    ti.mode = perm & 0o777
    ti.mtime = max(0, int(mtime))
    ti.size = size if kind == "file" else 0
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def _tar_members_from_dir(root: Path, chunk_size: int) -> Iterator[_TarMember]:
    for entry in _walk(root):
        if entry.kind == "dir":
            yield _tarinfo(entry.rel, "dir", entry.st.st_mode, entry.st.st_mtime), None
        elif entry.kind == "symlink":
            ti = _tarinfo(entry.rel, "symlink", 0o777, entry.st.st_mtime)
            ti.linkname = entry.target
            yield ti, None
        else:
            opened = _open_regular(entry)
            if opened is None:
                continue
            fd, st = opened
            try:
                ti = _tarinfo(entry.rel, "file", st.st_mode, st.st_mtime, st.st_size)
                yield ti, _read_upto(fd, st.st_size, chunk_size)
            finally:
                os.close(fd)


def _tar_members_from_zip(zf: zipfile.ZipFile, chunk_size: int) -> Iterator[_TarMember]:
    try:
        for zi in zf.infolist():
            try:
                name = "/".join(_split_rel(zi.filename))
            except ValueError as exc:
                log.warning("skipping zip member %r: %s", zi.filename, exc)
                continue
            kind = _zip_kind(zi)
            mode = zi.external_attr >> 16
            mtime = _zip_mtime(zi)
            if kind == "dir":
                yield _tarinfo(name, "dir", mode or 0o755, mtime), None
            elif kind == "symlink":
                ti = _tarinfo(name, "symlink", 0o777, mtime)
                with zf.open(zi) as member:
                    target = member.read(MAX_LINK_TARGET + 1)
                if len(target) > MAX_LINK_TARGET:
                    log.warning("skipping zip member %r: symlink target too long", zi.filename)
                    continue
                ti.linkname = os.fsdecode(target)
                yield ti, None
            else:
                with zf.open(zi) as member:
                    ti = _tarinfo(name, "file", mode or 0o644, mtime, zi.file_size)
                    yield ti, _read_member(member, zi.file_size, chunk_size)
    finally:
        zf.close()


def _read_member(member: BinaryIO, limit: int, chunk_size: int) -> Iterator[bytes]:
    remaining = limit
    while remaining > 0:
        data = member.read(min(chunk_size, remaining))
        if not data:
            return
        remaining -= len(data)
        yield data


def iter_tar_gz(src: Path, *, chunk_size: int = 1 << 20, level: int = 1) -> Iterator[bytes]:
    """A .tar.gz of a live directory or of a result zip, streamed without temp files.

    The tar stream is assembled here from TarInfo.tobuf() headers and the members'
    bytes (tarfile's addfile() would copy a whole member in one call, which cannot be
    drained in between), and gzip-compressed with zlib.
    """
    _check_positive(chunk_size)
    if not 1 <= level <= 9:
        raise ValueError(f"gzip level must be 1 to 9, not {level}")
    src = Path(src)
    st = os.lstat(src)
    members: Iterator[_TarMember]
    if stat.S_ISDIR(st.st_mode):
        members = _tar_members_from_dir(src, chunk_size)
    elif stat.S_ISREG(st.st_mode):
        members = _tar_members_from_zip(zipfile.ZipFile(src), chunk_size)
    else:
        raise ValueError(f"{src} is neither a directory nor a zip file")
    return _started(_iter_tar_gz(members, chunk_size, level))


def _iter_tar_gz(members: Iterator[_TarMember], chunk_size: int, level: int) -> Iterator[bytes]:
    import tarfile  # on first use, as in _tarinfo: keeps idle memory down

    gz = zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 31: gzip framing
    out: list[bytes] = []
    pending = 0
    offset = 0  # uncompressed tar bytes so far

    def feed(data: bytes) -> None:
        nonlocal pending, offset
        offset += len(data)
        compressed = gz.compress(data)
        if compressed:
            out.append(compressed)
            pending += len(compressed)

    def drain() -> bytes:
        nonlocal pending
        data = b"".join(out)
        out.clear()
        pending = 0
        return data

    try:
        for ti, content in members:
            feed(ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
            if content is not None:
                written = 0
                for data in content:
                    feed(data)
                    written += len(data)
                    if pending >= chunk_size:
                        yield drain()
                if written < ti.size:  # shrank while we read: the header is already out
                    log.warning(
                        "%s shrank while packing: padded %d bytes with zeros",
                        ti.name,
                        ti.size - written,
                    )
                    _pad(feed, ti.size - written, chunk_size)
                _pad(feed, -ti.size % _TAR_BLOCK, chunk_size)
            if pending >= chunk_size:
                yield drain()
        feed(b"\0" * (2 * _TAR_BLOCK))  # end of archive
        _pad(feed, -offset % _TAR_RECORD, chunk_size)
    finally:
        members.close()  # type: ignore[attr-defined]
    out.append(gz.flush())
    yield drain()


def _pad(feed: Callable[[bytes], None], n: int, chunk_size: int) -> None:
    while n > 0:
        step = min(n, chunk_size)
        feed(b"\0" * step)
        n -= step


# ---------------------------------------------------------------------------
# Base64


def base64_size(n: int) -> int:
    """Length of the padded base64 of `n` bytes, for Content-Length before streaming."""
    if n < 0:
        raise ValueError(f"size must not be negative, not {n}")
    return 4 * ((n + 2) // 3)


def iter_base64(path: Path, *, chunk_size: int = 3 << 20) -> Iterator[bytes]:
    """Base64 of a file in chunks whose concatenation is base64.b64encode(whole file).

    Raw chunks are a multiple of 3 bytes, so no chunk but the last carries padding.
    The file is opened now, so a missing file fails before a response starts.
    """
    _check_positive(chunk_size)
    step = max(3, chunk_size - chunk_size % 3)
    f = open(path, "rb")  # noqa: SIM115 - the generator owns and closes it
    return _iter_base64(f, step)


def _iter_base64(f: BinaryIO, step: int) -> Iterator[bytes]:
    b2a = binascii.b2a_base64
    with f:
        carry = b""
        while True:
            data = f.read(step)
            if not data:
                break
            if carry:
                data = carry + data
            cut = len(data) - len(data) % 3
            if cut == len(data):
                carry = b""
                yield b2a(data, newline=False)
            else:  # only after a short read (end of file, or a file still growing)
                carry = data[cut:]
                if cut:
                    yield b2a(memoryview(data)[:cut], newline=False)
        if carry:
            yield b2a(carry, newline=False)


# ---------------------------------------------------------------------------
# Listings and single files


@cache
def _mime_db() -> mimetypes.MimeTypes:
    """Built-in table only (ignores the host's /etc/mime.types)."""
    return mimetypes.MimeTypes()


def _mime(path: str, kind: str = "file") -> str:
    """From the name only, with Python's built-in table (not /etc/mime.types), so the
    answer is the same on every host."""
    if kind == "dir":
        return "inode/directory"
    if kind == "symlink":
        return "inode/symlink"
    suffix = os.path.splitext(path)[1].lower()
    if suffix in _TEXT_SUFFIXES:
        return "text/plain"
    mime, encoding = _mime_db().guess_type(path, strict=False)
    if encoding:
        return _ENCODING_MIME.get(encoding, "application/octet-stream")
    return mime or "application/octet-stream"


def list_dir(src_dir: Path) -> list[FileInfo]:
    """Every entry of a live working directory, sorted, without following symlinks."""
    src_dir = Path(src_dir)
    _check_dir(src_dir)
    infos = []
    for entry in _walk(src_dir):
        size = entry.st.st_size if entry.kind != "dir" else 0
        infos.append(
            FileInfo(entry.rel, size, entry.st.st_mtime, _mime(entry.rel, entry.kind), entry.kind)
        )
    return infos


def _zip_kind(zi: zipfile.ZipInfo) -> str:
    if zi.is_dir():
        return "dir"
    if zi.create_system == 3 and stat.S_ISLNK(zi.external_attr >> 16):
        return "symlink"
    return "file"


def _zip_mtime(zi: zipfile.ZipInfo) -> float:
    """The UTC mtime of the extended-timestamp field if present, else the DOS time."""
    extra = zi.extra
    i = 0
    while i + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, i)
        body = extra[i + 4 : i + 4 + size]
        if tag == _UT_EXTRA_ID and len(body) >= 5 and body[0] & 1:
            return float(struct.unpack_from("<l", body, 1)[0])
        i += 4 + size
    return time.mktime((*zi.date_time, 0, 0, -1))


def _zip_fileinfo(zi: zipfile.ZipInfo, name: str) -> FileInfo:
    kind = _zip_kind(zi)
    size = 0 if kind == "dir" else zi.file_size
    return FileInfo(name, size, _zip_mtime(zi), _mime(name, kind), kind)


def list_zip(zip_path: Path) -> list[FileInfo]:
    """Entries of a finished job's result, from the central directory only."""
    with zipfile.ZipFile(zip_path) as zf:
        return [_zip_fileinfo(zi, zi.filename.rstrip("/")) for zi in zf.infolist()]


def _split_rel(rel: str) -> list[str]:
    """The components of a client-given relative path; ValueError for anything that
    could leave the directory."""
    if "\0" in rel:
        raise ValueError("path contains a NUL byte")
    if rel.startswith("/"):
        raise ValueError(f"absolute path not allowed: {rel!r}")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"'..' not allowed in path: {rel!r}")
    if not parts:
        raise ValueError("empty path")
    return parts


def open_in_zip(zip_path: Path, name: str) -> tuple[BinaryIO, FileInfo]:
    """One regular-file member of a result zip, streamed (for single-file download).

    KeyError if absent; ValueError for unsafe names and for directories or symlinks.
    The returned file keeps the archive open until it is closed itself.
    """
    norm = "/".join(_split_rel(name))
    zf = zipfile.ZipFile(zip_path)
    try:
        try:
            zi = zf.getinfo(norm)
        except KeyError:
            zi = zf.getinfo(norm + "/")  # a directory, refused below; else KeyError
        kind = _zip_kind(zi)
        if kind != "file":
            raise ValueError(f"{norm!r} is a {kind}, not a file")
        member = zf.open(zi)
    finally:
        zf.close()  # the member holds its own reference to the file
    return member, _zip_fileinfo(zi, norm)  # type: ignore[return-value]


def safe_child(root: Path, rel: str) -> Path:
    """The real path of `rel` inside `root`; ValueError for traversal, absolute
    paths, NUL, or symlinks that lead outside root.

    The returned path contains no symlinks; a job can still swap one in before the
    caller opens it, which open_child() closes.
    """
    parts = _split_rel(rel)
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(real_root.joinpath(*parts)))
    if not _is_within(real, real_root):
        raise ValueError(f"{rel!r} resolves outside the working directory")
    return real


def open_child(root: Path, rel: str) -> tuple[BinaryIO, FileInfo]:
    """Open a regular file of a live directory for download, race-free.

    safe_child() first; then every component is opened relative to the previous one
    with O_NOFOLLOW, so a symlink swapped in after the check fails the open (ELOOP)
    instead of leading anywhere. FileNotFoundError if absent, IsADirectoryError or
    ValueError if not a regular file.
    """
    real = safe_child(root, rel)
    real_root = Path(os.path.realpath(root))
    parts = real.relative_to(real_root).parts
    if not parts:
        raise IsADirectoryError(errno.EISDIR, "is the working directory", rel)
    fd = os.open(real_root, _DIR_FLAGS)
    try:
        for part in parts[:-1]:
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
        file_fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
    finally:
        os.close(fd)
    st = os.fstat(file_fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(file_fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", rel)
        raise ValueError(f"{rel!r} is not a regular file")
    os.set_blocking(file_fd, True)
    rel_path = "/".join(parts)
    info = FileInfo(rel_path, st.st_size, st.st_mtime, _mime(rel_path), "file")
    return os.fdopen(file_fd, "rb"), info
