"""Safe inspection and extraction of zip and tar: hostile archives built in the test."""

from __future__ import annotations

import bz2
import errno
import gzip
import io
import lzma
import os
import stat
import struct
import tarfile
import time
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobd.archive import ArchiveError, Limits, check_zip, detect, extract, safe_name

MTIME = (2024, 3, 5, 12, 30, 44)
TAR_MTIME = 1_700_000_000


# -- archive builders -------------------------------------------------------------------------


def make_zip(path: Path, entries: list[tuple[str, bytes, int]]) -> Path:
    """A zip of (name, content, unix mode) written with zipfile."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, content, mode in entries:
            info = zipfile.ZipInfo(name, date_time=MTIME)
            info.external_attr = mode << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, content)
    return path


def stored(name: bytes, content: bytes = b"", **fields: Any) -> dict[str, Any]:
    """One entry for raw_zip, stored (method 0) unless fields say otherwise."""
    entry = {"name": name, "payload": content, "method": 0, "crc": zlib.crc32(content),
             "size": len(content), "attr": (stat.S_IFREG | 0o644) << 16, "flags": 0}
    entry.update(fields)
    return entry


def raw_zip(entries: list[dict[str, Any]], *, cut_directory: int = 0) -> bytes:
    """A zip written byte by byte, for what zipfile refuses to write (NUL names, overlapping
    or outside data, lying sizes, unknown methods, encryption flags)."""
    out = bytearray()
    directory = bytearray()
    for e in entries:
        offset = len(out)
        local_name = e.get("local_name", e["name"])
        csize = len(e["payload"])
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, e["flags"], e["method"], 0, 0x21,
                           e["crc"], csize, e["size"], len(local_name), 0)
        out += local_name + e["payload"]
        directory += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 0x031E, 20, e["flags"],
                                 e["method"], 0, 0x21, e["crc"], e.get("csize", csize),
                                 e["size"], len(e["name"]), 0, 0, 0, 0, e["attr"],
                                 e.get("offset", offset))
        directory += e["name"]
    if cut_directory:
        directory = directory[:-cut_directory]
    start = len(out)
    out += directory
    out += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries),
                       len(directory) + cut_directory, start, 0)
    return bytes(out)


def make_tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes, int]],
             mode: str = "w") -> Path:
    """A tar of (name, content, mode) files and ready-made TarInfo members."""
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tf:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tf.addfile(member)
                continue
            name, content, perms = member
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = perms
            info.mtime = TAR_MTIME
            tf.addfile(info, io.BytesIO(content))
    return path


def tar_info(name: str, kind: bytes, **fields: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = TAR_MTIME
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def tree_of(root: Path) -> dict[str, Any]:
    """Everything below root: files -> content, dirs -> "dir", symlinks -> ("->", target)."""
    found: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[key] = ("->", os.readlink(path))
        elif path.is_dir():
            found[key] = "dir"
        else:
            found[key] = path.read_bytes()
    return found


@pytest.fixture
def box(tmp_path: Path) -> Callable[[], None]:
    """A sentinel around the extraction: call it to assert that nothing changed outside dest
    (anything under tmp_path but dest* and the archives the test wrote, and /tmp/pwned)."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep").write_bytes(b"sentinel")

    def outside() -> dict[str, Any]:
        return {k: v for k, v in tree_of(tmp_path).items()
                if not k.startswith("dest") and not k.startswith("in")}

    before = outside()

    def unchanged() -> None:
        assert outside() == before
        assert not Path("/tmp/pwned").exists()
        assert not list(tmp_path.parent.rglob("pwned*"))

    return unchanged


def refused(path: Path, dest: Path, limits: Limits | None = None) -> str:
    with pytest.raises(ArchiveError) as info:
        extract(path, dest, limits or Limits())
    return str(info.value)


def zip_refused(path: Path, limits: Limits | None = None, required: str | None = None) -> str:
    with pytest.raises(ArchiveError) as info:
        check_zip(path, limits or Limits(), required)
    return str(info.value)


# -- safe_name --------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [
    ("run.sh", "run.sh"),
    ("a/b/c.txt", "a/b/c.txt"),
    ("a/b/", "a/b/"),
    ("./a//b/./c", "a/b/c"),
    ("dir\\file.txt", "dir/file.txt"),
    ("dir\\sub\\", "dir/sub/"),
    ("...", "..."),
    ("a/..b/c..", "a/..b/c.."),
    ("\u00e9t\u00e9/\udcff", "\u00e9t\u00e9/\udcff"),  # a non-UTF-8 byte as tarfile gives it
])
def test_safe_name_normalises(name: str, expected: str) -> None:
    assert safe_name(name) == expected


@pytest.mark.parametrize(("name", "detail"), [
    ("", "empty name"),
    ("../x", "path escapes the working directory"),
    ("a/../../x", "path escapes the working directory"),
    ("a/..", "path escapes the working directory"),
    ("a/../b", "path escapes the working directory"),
    ("..\\x", "path escapes the working directory"),
    ("/etc/passwd", "absolute path"),
    ("//server/share", "absolute path"),
    ("\\\\server\\share\\x", "absolute path"),
    ("C:\\Windows\\x", "path starts with a drive letter"),
    ("c:x", "path starts with a drive letter"),
    ("C:", "path starts with a drive letter"),
    ("a\x00b", "name contains a NUL byte"),
    (".", "names the working directory itself"),
    ("./", "names the working directory itself"),
    ("a" * 256, "a path component is longer than 255 bytes"),
    ("\ud800", "name is not valid UTF-8"),
])
def test_safe_name_refuses(name: str, detail: str) -> None:
    with pytest.raises(ArchiveError) as info:
        safe_name(name)
    shown = name if len(name) <= 200 else name[:200] + "..."  # huge names are shortened
    assert str(info.value) == f"entry {shown!r}: {detail}"


def test_safe_name_length_and_depth_limits() -> None:
    with pytest.raises(ArchiveError, match="longer than 4096 characters"):
        safe_name("a/" * 2049)
    with pytest.raises(ArchiveError, match="deeper than 64 levels"):
        safe_name("a/" * 65)
    assert safe_name("a/" * 64) == "a/" * 64
    with pytest.raises(ArchiveError, match="deeper than 3 levels"):
        safe_name("a/b/c/d", Limits(max_depth=3))


PIECES = st.sampled_from(["..", ".", "/", "\\", "a", "b.txt", "C:", ":", "\x00", "", " ",
                          "~", "..a", "\udcff", "\u00e9"])


@settings(deadline=None)  # timing varies on loaded CI machines
@given(st.one_of(st.text(), st.lists(PIECES, max_size=12).map("".join)))
def test_safe_name_never_escapes(name: str) -> None:
    dest = Path("/srv/jobd/dest")
    try:
        result = safe_name(name)
    except ArchiveError as exc:
        assert str(exc).startswith("entry ")
        return
    assert result and not result.startswith("/")
    parts = result.rstrip("/").split("/")
    assert ".." not in parts and "." not in parts and "" not in parts
    assert "\\" not in result and "\x00" not in result
    resolved = Path(os.path.normpath(dest / result))
    assert resolved != dest and dest in resolved.parents
    assert safe_name(result) == result  # idempotent


@settings(deadline=None)  # timing varies on loaded CI machines
@given(st.text())
def test_safe_name_resolves_inside_a_real_directory(name: str) -> None:
    dest = Path(__file__).resolve().parent  # a real directory without symlinks
    try:
        result = safe_name(name)
    except ArchiveError:
        return
    assert dest in (dest / result).resolve().parents


# -- detect -----------------------------------------------------------------------------------


def test_detect_by_content_not_name(tmp_path: Path) -> None:
    files = [("run.sh", b"echo hi\n", 0o755)]
    assert detect(make_zip(tmp_path / "a.tar", files)) == "zip"
    assert detect(make_tar(tmp_path / "b.zip", files)) == "tar"
    assert detect(make_tar(tmp_path / "c.tgz", files, "w:gz")) == "tar.gz"
    assert detect(make_tar(tmp_path / "d", files, "w:bz2")) == "tar.bz2"
    assert detect(make_tar(tmp_path / "e", files, "w:xz")) == "tar.xz"
    assert detect(make_tar(tmp_path / "f", files, "w:gz")) == "tar.gz"
    (tmp_path / "g.tar.gz").write_bytes(gzip.compress(b"not a tar" * 100))
    assert detect(tmp_path / "g.tar.gz") is None
    (tmp_path / "h").write_bytes(b"\x1f\x8b garbage")
    assert detect(tmp_path / "h") is None
    (tmp_path / "i").write_bytes(b"#!/bin/sh\necho hi\n")
    assert detect(tmp_path / "i") is None
    (tmp_path / "j").write_bytes(b"")
    assert detect(tmp_path / "j") is None
    (tmp_path / "k").write_bytes(bytes(10240))  # an empty tar has no member header
    assert detect(tmp_path / "k") is None


# -- check_zip --------------------------------------------------------------------------------


def test_check_zip_good(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "in.zip", [
        ("run.sh", b"echo hi\n", stat.S_IFREG | 0o755),
        ("data/", b"", stat.S_IFDIR | 0o755),
        ("data/input.pdb", b"ATOM\n" * 100, stat.S_IFREG | 0o644),
        ("./data/more/x", b"x", 0),
        ("link", b"data/input.pdb", stat.S_IFLNK | 0o777),
    ])
    assert check_zip(path, Limits()) == ["run.sh", "data/", "data/input.pdb", "data/more/x",
                                         "link"]


@pytest.mark.parametrize("content", [b"", b"just text\n", b"PK", b"\x1f\x8b\x08\x00"])
def test_check_zip_not_a_zip(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "in").write_bytes(content)
    assert zip_refused(tmp_path / "in") == "input is not a zip file"


def test_check_zip_refuses_a_tar(tmp_path: Path) -> None:
    path = make_tar(tmp_path / "in.zip", [("run.sh", b"x", 0o755)])
    assert zip_refused(path) == "input is not a zip file"


def test_check_zip_required_run_sh(tmp_path: Path) -> None:
    other = make_zip(tmp_path / "a.zip", [("sub/run.sh", b"x", 0o755), ("run.shx", b"", 0)])
    assert zip_refused(other, required="run.sh") == "run.sh does not exist in the input file"
    assert check_zip(other, Limits(), required=None) == ["sub/run.sh", "run.shx"]
    as_dir = make_zip(tmp_path / "b.zip", [("run.sh/", b"", stat.S_IFDIR | 0o755)])
    assert zip_refused(as_dir, required="run.sh") == "entry 'run.sh': must be a regular file"
    as_link = make_zip(tmp_path / "c.zip", [("x", b"", 0), ("run.sh", b"x",
                                                             stat.S_IFLNK | 0o777)])
    assert zip_refused(as_link, required="run.sh") == "entry 'run.sh': must be a regular file"
    dotted = make_zip(tmp_path / "d.zip", [("./run.sh", b"x", 0)])
    assert check_zip(dotted, Limits()) == ["run.sh"]


def test_check_zip_required_entry_in_a_subdirectory(tmp_path: Path) -> None:
    """A native job's entry point may live below the top: `bin/main.py`."""
    nested = make_zip(tmp_path / "a.zip", [("bin/main.py", b"x", 0), ("run.sh", b"x", 0)])
    assert check_zip(nested, Limits(), required="bin/main.py") == ["bin/main.py", "run.sh"]
    assert check_zip(nested, Limits(), required="./bin//main.py") == ["bin/main.py", "run.sh"]
    assert zip_refused(nested, required="main.py") == "main.py does not exist in the input file"
    assert zip_refused(nested, required="bin") == "entry 'bin': must be a regular file"


@pytest.mark.parametrize(("name", "detail"), [
    ("../evil.sh", "path escapes the working directory"),
    ("a/../../evil.sh", "path escapes the working directory"),
    ("/etc/cron.d/evil", "absolute path"),
    ("C:/evil", "path starts with a drive letter"),
    ("..\\..\\evil", "path escapes the working directory"),
])
def test_check_zip_unsafe_names(tmp_path: Path, name: str, detail: str) -> None:
    path = make_zip(tmp_path / "in.zip", [("run.sh", b"x", 0o755), (name, b"x", 0o644)])
    assert zip_refused(path) == f"entry {name!r}: {detail}"


@pytest.mark.parametrize(("raw_name", "message"), [
    (b"run.sh\x00.txt", "entry 'run.sh\\x00.txt': name contains a NUL byte"),
    (b"/abs", "entry '/abs': absolute path"),
    (b"D:evil", "entry 'D:evil': path starts with a drive letter"),
    (b"", "entry '': empty name"),
    (b".", "entry '.': names the working directory itself"),
])
def test_check_zip_raw_names(tmp_path: Path, raw_name: bytes, message: str) -> None:
    path = tmp_path / "in.zip"
    path.write_bytes(raw_zip([stored(b"run.sh", b"x"), stored(raw_name, b"evil")]))
    assert zip_refused(path) == message


def test_check_zip_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "in.zip"
    path.write_bytes(raw_zip([stored(b"a/b", b"1"), stored(b"./a//b", b"2")]))
    assert zip_refused(path) == "entry './a//b': duplicate entry"
    path.write_bytes(raw_zip([stored(b"a", b"1"), stored(b"a/", b"",
                                                         attr=(stat.S_IFDIR | 0o755) << 16)]))
    assert zip_refused(path) == "entry 'a/': duplicate entry"
    path.write_bytes(raw_zip([stored(b"a/", b"", attr=(stat.S_IFDIR | 0o755) << 16),
                              stored(b"a/", b"", attr=(stat.S_IFDIR | 0o755) << 16)]))
    assert check_zip(path, Limits(), None) == ["a/", "a/"]


def test_check_zip_file_used_as_a_directory(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "in.zip", [("a/b/c", b"x", 0), ("a/b", b"y", 0)])
    assert zip_refused(path) == "entry 'a/b': is also the directory of other entries"
    path = make_zip(tmp_path / "in.zip", [("a/b", b"y", 0), ("a/b/c", b"x", 0)])
    assert zip_refused(path) == "entry 'a/b/c': parent 'a/b' is not a directory"


@pytest.mark.parametrize(("target", "detail"), [
    ("/etc", "symlink target '/etc' is absolute"),
    ("../../etc/passwd", "symlink target '../../etc/passwd' escapes the working directory"),
    ("../..", "symlink target '../..' escapes the working directory"),
    ("sub/../../x", "symlink target 'sub/../../x' has '..' after a name"),
    ("a/../b", "symlink target 'a/../b' has '..' after a name"),
    ("", "symlink with an empty target"),
    ("..\\..\\etc", "symlink target '..\\\\..\\\\etc' is not allowed"),
])
def test_check_zip_symlink_targets(tmp_path: Path, target: str, detail: str) -> None:
    path = make_zip(tmp_path / "in.zip", [("dir/link", target.encode(), stat.S_IFLNK | 0o777)])
    assert zip_refused(path) == f"entry 'dir/link': {detail}"


def test_check_zip_symlink_inside_is_fine(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "in.zip", [
        ("a/b/up", b"../../top", stat.S_IFLNK | 0o777),
        ("a/self", b".", stat.S_IFLNK | 0o777),
        ("a/down", b"./b/c/", stat.S_IFLNK | 0o777),
    ])
    assert check_zip(path, Limits(), None) == ["a/b/up", "a/self", "a/down"]


def test_check_zip_symlink_as_a_parent(tmp_path: Path) -> None:
    """The classic attack: a symlink "a" (even to a harmless target), then "a/passwd"."""
    for target in (b"/etc", b"sub", b"."):
        path = make_zip(tmp_path / "in.zip", [("a", target, stat.S_IFLNK | 0o777),
                                              ("a/passwd", b"root::0:0::/:/bin/sh", 0)])
        message = zip_refused(path)
        assert message.startswith("entry 'a")
    assert zip_refused(path) == "entry 'a/passwd': parent 'a' is not a directory"


@pytest.mark.parametrize(("file_type", "word"), [
    (stat.S_IFCHR, "character device"), (stat.S_IFBLK, "block device"),
    (stat.S_IFIFO, "FIFO"), (stat.S_IFSOCK, "socket"),
])
def test_check_zip_special_files(tmp_path: Path, file_type: int, word: str) -> None:
    path = make_zip(tmp_path / "in.zip", [("dev", b"", file_type | 0o666)])
    assert zip_refused(path) == f"entry 'dev': {word} entries are not allowed"


def test_check_zip_encrypted(tmp_path: Path) -> None:
    path = tmp_path / "in.zip"
    path.write_bytes(raw_zip([stored(b"run.sh", b"x"), stored(b"secret", b"x" * 12,
                                                              flags=0x1)]))
    assert zip_refused(path) == "entry 'secret' is encrypted"


def test_check_zip_unknown_method(tmp_path: Path) -> None:
    path = tmp_path / "in.zip"
    path.write_bytes(raw_zip([stored(b"x", b"abc", method=99)]))
    assert zip_refused(path) == "entry 'x': unsupported compression method 99"


def test_check_zip_damaged(tmp_path: Path) -> None:
    good = raw_zip([stored(b"run.sh", b"echo hi\n"), stored(b"b", b"data" * 10)])
    path = tmp_path / "in.zip"
    path.write_bytes(good[:-10])  # the end record cut
    assert zip_refused(path).startswith("input is a damaged zip file: ")
    path.write_bytes(raw_zip([stored(b"run.sh", b"echo hi\n"), stored(b"b", b"data")],
                             cut_directory=7))
    assert zip_refused(path).startswith("input is a damaged zip file: ")
    path.write_bytes(raw_zip([stored(b"run.sh", b"x"), stored(b"b", b"data", csize=10**6)]))
    assert zip_refused(path) == "input is a damaged zip file: entry 'b' lies outside the file"
    path.write_bytes(raw_zip([stored(b"run.sh", b"x"), stored(b"b", b"d", offset=10**6)]))
    assert zip_refused(path) == "input is a damaged zip file: entry 'b' lies outside the file"
    path.write_bytes(raw_zip([stored(b"run.sh", b"x"), stored(b"b", b"d", local_name=b"c")]))
    assert zip_refused(path) == ("input is a damaged zip file: entry 'b' has another name in "
                                 "its local header")
    path.write_bytes(raw_zip([stored(b"run.sh", b"x"), stored(b"b", b"d", offset=3)]))
    assert zip_refused(path) == "input is a damaged zip file: entry 'b' has no local header"


def test_check_zip_overlapping_entries(tmp_path: Path) -> None:
    """Entry "big" stores, as its data, the local header and data of entry "small": the
    overlap technique of non-recursive zip bombs. Each entry alone looks fine."""
    small = stored(b"small", b"kernel" * 10)
    inner = raw_zip([small])
    small_record = inner[:30 + 5 + len(small["payload"])]
    big = stored(b"big", small_record)
    data = raw_zip([big])  # big at 0; small's local header lies inside big's data
    entries = [big, {**small, "offset": 30 + 3}]
    directory_only = raw_zip(entries)  # a directory that names both, data from `data`
    local_part = data[:30 + 3 + len(small_record)]
    cd_start = directory_only.index(b"PK\x01\x02")
    directory = directory_only[cd_start:directory_only.index(b"PK\x05\x06")]
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 2, 2, len(directory), len(local_part), 0)
    path = tmp_path / "in.zip"
    path.write_bytes(local_part + directory + end)
    with zipfile.ZipFile(path) as zf:  # the archive is otherwise readable
        assert zf.read("small") == b"kernel" * 10
    assert zip_refused(path) == "input is a damaged zip file: entries 'big' and 'small' overlap"


def test_check_zip_entry_cap_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "in.zip"
    path.write_bytes(raw_zip([stored(f"f{i}".encode(), b"") for i in range(11)]))
    assert zip_refused(path, Limits(max_entries=10)) == "input has more than 10 entries"
    assert len(check_zip(path, Limits(max_entries=11), None)) == 11


def test_check_zip_counts_records_not_the_declared_count(tmp_path: Path) -> None:
    """zipfile ignores the end record's count and loads every record it finds."""
    data = bytearray(raw_zip([stored(f"f{i}".encode(), b"") for i in range(50)]))
    end = data.rindex(b"PK\x05\x06")
    data[end + 8:end + 12] = struct.pack("<2H", 1, 1)  # "1 entry"
    path = tmp_path / "in.zip"
    path.write_bytes(bytes(data))
    assert zip_refused(path, Limits(max_entries=10)) == "input has more than 10 entries"


def test_check_zip_huge_central_directory(tmp_path: Path) -> None:
    data = bytearray(raw_zip([stored(b"run.sh", b"x")]))
    end = data.rindex(b"PK\x05\x06")
    data[end + 12:end + 16] = struct.pack("<L", 1 << 30)  # zipfile would read 1 GiB
    path = tmp_path / "in.zip"
    path.write_bytes(bytes(data))
    assert zip_refused(path) == f"input has a central directory larger than {100_000 << 10} bytes"


def test_check_zip_declared_size_cap(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "in.zip", [("a", bytes(3000), 0), ("b", bytes(3000), 0)])
    limits = Limits(max_size=5000, ratio_floor=1 << 30)
    assert zip_refused(path, limits) == "entry 'b': input unpacks to more than 5000 bytes"


@pytest.fixture(scope="module")
def gigabyte_of_zeros(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 GiB of zeros deflated (1 MiB on disk), built from one independent deflate block
    repeated: fast to build, and slow to extract if nothing stops it."""
    block = bytes(1 << 20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    payload = piece * 1024 + compressor.flush()
    crc = 0
    for _ in range(1024):
        crc = zlib.crc32(block, crc)
    path = tmp_path_factory.mktemp("bomb") / "bomb.zip"
    path.write_bytes(raw_zip([stored(b"run.sh", b"echo hi\n"),
                              stored(b"zeros", payload, method=8, crc=crc, size=1 << 30)]))
    return path


def test_zip_bomb_refused_by_ratio_without_writing(gigabyte_of_zeros: Path, tmp_path: Path,
                                                   box: Callable[[], None]) -> None:
    assert os.path.getsize(gigabyte_of_zeros) < 2 << 20
    assert zip_refused(gigabyte_of_zeros) == "entry 'zeros': compression ratio above 200:1"
    dest = tmp_path / "dest"
    started = time.monotonic()
    assert refused(gigabyte_of_zeros, dest) == "entry 'zeros': compression ratio above 200:1"
    assert time.monotonic() - started < 5
    assert tree_of(dest) == {}
    box()


def test_zip_bomb_refused_by_size(gigabyte_of_zeros: Path) -> None:
    limits = Limits(max_size=512 << 20, max_ratio=10**6)
    assert zip_refused(gigabyte_of_zeros, limits) == ("entry 'zeros': input unpacks to more "
                                                      f"than {512 << 20} bytes")


def test_zip_lying_about_its_size_writes_only_what_it_declared(tmp_path: Path) -> None:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    payload = compressor.compress(bytes(50 << 20)) + compressor.flush()
    path = tmp_path / "in.zip"
    path.write_bytes(raw_zip([stored(b"zeros", payload, method=8, size=1000, crc=0)]))
    message = refused(path, tmp_path / "dest")
    assert message.startswith("input is a damaged zip file: entry 'zeros': ")
    assert os.path.getsize(tmp_path / "dest" / "zeros") <= 1000


# -- extract: good archives -------------------------------------------------------------------


GOOD = {
    "run.sh": b"#!/bin/sh\necho hi\n",
    "data/input.pdb": b"ATOM      1  N   MET A   1\n" * 50,
    "data/deep/er/x.bin": bytes(range(256)),
    "empty.txt": b"",
}


def check_good_tree(dest: Path) -> None:
    found = tree_of(dest)
    for name, content in GOOD.items():
        assert found[name] == content
    assert found["data/link"] == ("->", "input.pdb")
    assert found["up"] == ("->", "data/deep/../deep/er") or found["up"][0] == "->"
    assert (dest / "data" / "link").read_bytes() == GOOD["data/input.pdb"]
    assert stat.S_IMODE((dest / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "data/input.pdb").stat().st_mode) == 0o644
    assert stat.S_IMODE((dest / "data/deep/er/x.bin").stat().st_mode) == 0o755  # setuid gone
    assert stat.S_IMODE((dest / "data").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "empty").stat().st_mode) == 0o755


def test_extract_good_zip(tmp_path: Path, box: Callable[[], None]) -> None:
    path = make_zip(tmp_path / "in.zip", [
        ("run.sh", GOOD["run.sh"], stat.S_IFREG | 0o755),
        ("data/input.pdb", GOOD["data/input.pdb"], stat.S_IFREG | 0o664),
        ("data/deep/er/x.bin", GOOD["data/deep/er/x.bin"], stat.S_IFREG | 0o4755),
        ("empty.txt", b"", 0),
        ("empty/", b"", stat.S_IFDIR | 0o700),
        ("data/link", b"input.pdb", stat.S_IFLNK | 0o777),
        ("up", b"data/deep/er", stat.S_IFLNK | 0o777),
    ])
    dest = tmp_path / "dest"
    extract(path, dest, Limits())
    check_good_tree(dest)
    expected = time.mktime((*MTIME, 0, 0, -1))
    assert (dest / "run.sh").stat().st_mtime == expected
    assert (dest / "empty").stat().st_mtime == expected
    assert (dest / "data/link").lstat().st_mtime == expected
    box()


def test_extract_windows_zip_without_modes(tmp_path: Path) -> None:
    path = tmp_path / "in.zip"
    path.write_bytes(raw_zip([stored(b"dir\\run.sh", b"x", attr=0x20),
                              stored(b"dir\\sub\\", b"", attr=0x10)]))
    extract(path, tmp_path / "dest")
    assert tree_of(tmp_path / "dest") == {"dir": "dir", "dir/run.sh": b"x", "dir/sub": "dir"}
    assert stat.S_IMODE((tmp_path / "dest/dir/run.sh").stat().st_mode) == 0o644


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_extract_good_tar(tmp_path: Path, mode: str, box: Callable[[], None]) -> None:
    path = make_tar(tmp_path / "in", [
        tar_info("./", tarfile.DIRTYPE, mode=0o755),
        ("./run.sh", GOOD["run.sh"], 0o755),
        tar_info("data", tarfile.DIRTYPE, mode=0o777, mtime=TAR_MTIME - 100),
        ("data/input.pdb", GOOD["data/input.pdb"], 0o600),
        ("data/deep/er/x.bin", GOOD["data/deep/er/x.bin"], 0o6755),
        ("empty.txt", b"", 0o644),
        tar_info("empty", tarfile.DIRTYPE, mode=0o1777),
        tar_info("data/link", tarfile.SYMTYPE, linkname="input.pdb"),
        tar_info("up", tarfile.SYMTYPE, linkname="data/deep/er"),
        tar_info("hard", tarfile.LNKTYPE, linkname="./data/input.pdb"),
    ], mode)
    dest = tmp_path / "dest"
    extract(path, dest, Limits())
    check_good_tree(dest)
    assert (dest / "hard").read_bytes() == GOOD["data/input.pdb"]
    assert (dest / "hard").stat().st_ino == (dest / "data/input.pdb").stat().st_ino
    assert (dest / "run.sh").stat().st_mtime == TAR_MTIME
    assert (dest / "data").stat().st_mtime == TAR_MTIME - 100
    assert stat.S_IMODE((dest / "empty").stat().st_mode) == 0o755  # sticky and o+w gone
    box()


def test_extract_into_an_existing_empty_dest(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    extract(make_zip(tmp_path / "in.zip", [("run.sh", b"x", 0o755)]), dest)
    assert tree_of(dest) == {"run.sh": b"x"}


def test_extract_creates_missing_parents_of_dest(tmp_path: Path) -> None:
    dest = tmp_path / "a" / "b" / "work"
    extract(make_zip(tmp_path / "in.zip", [("run.sh", b"x", 0o755)]), dest)
    assert tree_of(dest) == {"run.sh": b"x"}


# -- extract: hostile archives ----------------------------------------------------------------


def test_extract_not_an_archive(tmp_path: Path) -> None:
    (tmp_path / "in").write_bytes(b"#!/bin/sh\n")
    assert refused(tmp_path / "in", tmp_path / "dest") == "input is not a zip or tar archive"


@pytest.mark.parametrize(("name", "detail"), [
    ("../pwned", "path escapes the working directory"),
    ("ok/../../pwned", "path escapes the working directory"),
    ("/tmp/pwned", "absolute path"),
])
@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_extract_tar_traversal(tmp_path: Path, name: str, detail: str, mode: str,
                               box: Callable[[], None]) -> None:
    path = make_tar(tmp_path / "in", [("run.sh", b"x", 0o755), (name, b"evil", 0o644)], mode)
    assert refused(path, tmp_path / "dest") == f"entry {name!r}: {detail}"
    box()


def test_extract_zip_traversal(tmp_path: Path, box: Callable[[], None]) -> None:
    path = make_zip(tmp_path / "in.zip", [("run.sh", b"x", 0o755), ("../pwned", b"evil", 0)])
    assert refused(path, tmp_path / "dest") == ("entry '../pwned': path escapes the working "
                                                "directory")
    assert tree_of(tmp_path / "dest") == {}  # zip is checked whole before writing
    box()


@pytest.mark.parametrize(("members", "message"), [
    ([tar_info("a", tarfile.SYMTYPE, linkname="/"), ("a/tmp/pwned", b"x", 0o644)],
     "entry 'a': symlink target '/' is absolute"),
    ([tar_info("a", tarfile.SYMTYPE, linkname="../outside"), ("a/pwned", b"x", 0o644)],
     "entry 'a': symlink target '../outside' escapes the working directory"),
    ([tar_info("a", tarfile.SYMTYPE, linkname="."), ("a/pwned", b"x", 0o644)],
     "entry 'a/pwned': parent 'a' is not a directory"),
    ([tar_info("x/s", tarfile.SYMTYPE, linkname=".."),
      tar_info("l", tarfile.SYMTYPE, linkname="x/s/../.."), ("l/pwned", b"x", 0o644)],
     "entry 'l': symlink target 'x/s/../..' has '..' after a name"),
    ([("f", b"x", 0o644), tar_info("f", tarfile.SYMTYPE, linkname="/etc/passwd")],
     "entry 'f': symlink target '/etc/passwd' is absolute"),
    ([("f", b"x", 0o644), tar_info("f", tarfile.SYMTYPE, linkname="g")],
     "entry 'f': duplicate entry"),
    ([("d/f", b"x", 0o644), tar_info("d", tarfile.SYMTYPE, linkname="../outside")],
     "entry 'd': symlink target '../outside' escapes the working directory"),
    ([("d/f", b"x", 0o644), tar_info("d", tarfile.SYMTYPE, linkname=".")],
     "entry 'd': is also the directory of other entries"),
    ([tar_info("h", tarfile.LNKTYPE, linkname="/etc/passwd")],
     "entry 'h': hard link target '/etc/passwd': absolute path"),
    ([tar_info("h", tarfile.LNKTYPE, linkname="../outside/keep")],
     "entry 'h': hard link target '../outside/keep': path escapes the working directory"),
    ([tar_info("h", tarfile.LNKTYPE, linkname="later"), ("later", b"x", 0o644)],
     "entry 'h': hard link target 'later' is not an earlier regular file of the archive"),
    ([tar_info("s", tarfile.SYMTYPE, linkname="x"), tar_info("h", tarfile.LNKTYPE,
                                                              linkname="s")],
     "entry 'h': hard link target 's' is not an earlier regular file of the archive"),
    ([tar_info("null", tarfile.CHRTYPE, devmajor=1, devminor=3)],
     "entry 'null': character device entries are not allowed"),
    ([tar_info("sda", tarfile.BLKTYPE, devmajor=8, devminor=0)],
     "entry 'sda': block device entries are not allowed"),
    ([tar_info("fifo", tarfile.FIFOTYPE)], "entry 'fifo': FIFO entries are not allowed"),
    ([("f", b"1", 0o644), ("./f", b"2", 0o644)], "entry './f': duplicate entry"),
    ([("a", b"1", 0o644), ("a/b", b"2", 0o644)], "entry 'a/b': parent 'a' is not a directory"),
    ([tar_info("v", b"V")], "entry 'v': unsupported tar entry type b'V'"),
])
def test_extract_hostile_tar(tmp_path: Path, members: list[Any], message: str,
                             box: Callable[[], None]) -> None:
    path = make_tar(tmp_path / "in.tar", members)
    assert refused(path, tmp_path / "dest") == message
    box()


def test_extract_never_follows_a_symlink_already_in_dest(tmp_path: Path,
                                                         box: Callable[[], None]) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "evil").symlink_to(tmp_path / "outside")
    for path in (make_tar(tmp_path / "in.tar", [("evil/pwned", b"x", 0o644)]),
                 make_zip(tmp_path / "in.zip", [("evil/pwned", b"x", 0)])):
        message = refused(path, dest)
        assert message.startswith("entry 'evil/pwned': cannot create a directory")
    (dest / "file").symlink_to(tmp_path / "outside" / "pwned")
    message = refused(make_tar(tmp_path / "in.tar", [("file", b"x", 0o644)]), dest)
    assert message.startswith("entry 'file': cannot create")
    assert not (tmp_path / "outside" / "pwned").exists()
    box()


def test_extract_tar_bomb_stops_on_written_bytes(tmp_path: Path) -> None:
    path = make_tar(tmp_path / "in", [("zeros", bytes(64 << 20), 0o644)], "w:gz")
    assert os.path.getsize(path) < 1 << 20
    dest = tmp_path / "dest"
    limits = Limits(max_size=8 << 20, max_ratio=10**6)
    assert refused(path, dest, limits) == ("entry 'zeros': input unpacks to more than "
                                           f"{8 << 20} bytes")
    assert os.path.getsize(dest / "zeros") <= 8 << 20
    limits = Limits(ratio_floor=1 << 20)
    assert refused(path, dest / "2", limits) == "entry 'zeros': compression ratio above 200:1"
    assert os.path.getsize(dest / "2" / "zeros") <= os.path.getsize(path) * 200


def test_extract_entry_cap(tmp_path: Path) -> None:
    path = make_tar(tmp_path / "in.tar", [(f"f{i}", b"", 0o644) for i in range(11)])
    assert refused(path, tmp_path / "dest", Limits(max_entries=10)) == ("input has more than "
                                                                        "10 entries")
    extract(path, tmp_path / "ok", Limits(max_entries=11))


def test_extract_pax_header_bomb(tmp_path: Path) -> None:
    info = tarfile.TarInfo("f")
    info.pax_headers = {"comment": "x" * (2 << 20)}
    path = make_tar(tmp_path / "in", [info], "w:gz")
    assert refused(path, tmp_path / "dest") == ("input is a damaged tar file: a member's "
                                                f"headers are larger than {1 << 20} bytes")


def test_extract_truncated_tar_gz(tmp_path: Path) -> None:
    path = make_tar(tmp_path / "in", [("a", os.urandom(100_000), 0o644)], "w:gz")
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    assert refused(path, tmp_path / "dest").startswith("input is a damaged tar file: ")


def test_extract_zip_with_bad_crc(tmp_path: Path) -> None:
    path = tmp_path / "in.zip"
    path.write_bytes(raw_zip([stored(b"a", b"hello", crc=1234)]))
    assert refused(path, tmp_path / "dest").startswith("input is a damaged zip file: entry 'a'")


def test_compressed_tar_kinds_round_trip(tmp_path: Path) -> None:
    """The decompressors detect() relies on are the ones extract() uses."""
    raw = make_tar(tmp_path / "plain.tar", [("run.sh", b"x", 0o755)]).read_bytes()
    for kind, compress in (("tar.gz", gzip.compress), ("tar.bz2", bz2.compress),
                           ("tar.xz", lzma.compress)):
        path = tmp_path / kind
        path.write_bytes(compress(raw))
        assert detect(path) == kind
        extract(path, tmp_path / f"out-{kind}")
        assert tree_of(tmp_path / f"out-{kind}") == {"run.sh": b"x"}


# -- properties over whole archives -----------------------------------------------------------

NAME_PARTS = st.sampled_from(["a", "b", "run.sh", "..", ".", "", "C:", "\\", "x\x00", "/"])
NAMES = st.lists(NAME_PARTS, min_size=1, max_size=4).map("/".join)
TARGETS = st.lists(st.sampled_from(["a", "b", "..", ".", "/etc", ""]), min_size=1,
                   max_size=4).map("/".join)
ZIP_ENTRY = st.tuples(NAMES, st.sampled_from(["file", "dir", "link"]), TARGETS)


def _inside(dest: Path) -> None:
    """Every path below dest, followed through its links, stays below dest."""
    top = os.path.realpath(dest)
    for found in dest.rglob("*"):
        try:
            os.stat(found)  # follows the links as the kernel does (realpath's strict: 3.10)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                continue  # the kernel follows a loop nowhere (realpath would invent a path)
        real = os.path.realpath(found)  # dangling: where it would point
        assert real == top or real.startswith(top + os.sep), found  # `x -> .` is fine


@settings(deadline=None, max_examples=300)
@given(st.lists(ZIP_ENTRY, min_size=1, max_size=6))
def test_check_zip_and_extract_agree(tmp_path_factory: pytest.TempPathFactory,
                                     entries: list[tuple[str, str, str]]) -> None:
    """For honest zips, what check_zip accepts extract unpacks, what it refuses extract
    refuses too, and whatever is unpacked stays inside dest."""
    box = tmp_path_factory.mktemp("agree")
    rows = []
    for name, kind, target in entries:
        if kind == "dir":
            rows.append((name.rstrip("/") + "/", b"", stat.S_IFDIR | 0o755))
        elif kind == "link":
            rows.append((name, target.encode(), stat.S_IFLNK | 0o777))
        else:
            rows.append((name, b"data", stat.S_IFREG | 0o644))
    path = box / "in.zip"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # duplicate names are part of the search
            make_zip(path, rows)
    except (ValueError, OSError):
        return  # zipfile itself refuses to write some names
    try:
        check_zip(path, Limits(), None)
        checked = None
    except ArchiveError as exc:
        checked = str(exc)
    dest = box / "dest"
    try:
        extract(path, dest, Limits())
        extracted = None
    except ArchiveError as exc:
        extracted = str(exc)
    assert (checked is None) == (extracted is None), (checked, extracted)
    if dest.exists():
        _inside(dest)


TAR_MEMBER = st.tuples(NAMES, st.sampled_from(["file", "dir", "symlink", "hardlink"]),
                       st.one_of(TARGETS, NAMES))


@settings(deadline=None, max_examples=300)
@given(st.lists(TAR_MEMBER, min_size=1, max_size=6))
def test_tar_extraction_stays_inside(tmp_path_factory: pytest.TempPathFactory,
                                     members: list[tuple[str, str, str]]) -> None:
    """Any mix of files, directories, symlinks and hard links: refused, or unpacked with
    every path and link inside dest and hard links only to files unpacked there."""
    box = tmp_path_factory.mktemp("tar")
    infos: list[tarfile.TarInfo | tuple[str, bytes, int]] = []
    for name, kind, target in members:
        if kind == "file":
            infos.append((name, b"data", 0o4755))
        else:
            kind_byte = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                         "hardlink": tarfile.LNKTYPE}[kind]
            infos.append(tar_info(name, kind_byte, linkname=target))
    try:
        path = make_tar(box / "in.tar", infos)
    except (ValueError, OSError, tarfile.TarError):
        return  # tarfile refuses to write some names
    dest = box / "dest"
    try:
        extract(path, dest, Limits())
    except ArchiveError as exc:
        assert str(exc)
    if not dest.exists():
        return
    _inside(dest)
    inodes = {p.stat().st_ino for p in dest.rglob("*") if p.is_file() and not p.is_symlink()}
    for found in dest.rglob("*"):
        if found.is_file() and not found.is_symlink():
            assert found.stat().st_nlink == 1 or found.stat().st_ino in inodes
            assert not found.stat().st_mode & (stat.S_ISUID | stat.S_ISGID)


def multi_disk_zip() -> bytes:
    """A zip64 end-of-directory locator claiming two disks: zipfile's _EndRecData raises
    BadZipFile on it (found by tests/fuzz_archive.py; it escaped as a 500 before)."""
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, 0, 2)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0, 0, 0, 0, 0)
    return b"PK\x03\x04" + bytes(26) + locator + end


def test_multi_disk_zip_is_a_damaged_zip(tmp_path: Path) -> None:
    path = tmp_path / "in.zip"
    path.write_bytes(multi_disk_zip())
    message = "input is a damaged zip file: zipfiles that span multiple disks are not supported"
    assert zip_refused(path) == message
    assert refused(path, tmp_path / "dest") == message
