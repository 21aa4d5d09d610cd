"""Tests for jobd.pack: packing a working directory and streaming archives out of it."""

from __future__ import annotations

import base64
import io
import json
import os
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobd import pack

ROOT = Path(__file__).resolve().parent.parent
MTIME = 1_600_000_000  # 2020-09-13, a whole second


# ---------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A working directory with everything a job may leave behind."""
    w = tmp_path / "work"
    (w / "a" / "b").mkdir(parents=True)
    (w / "empty").mkdir()
    (w / "a" / "b" / "deep.txt").write_text("deep\n")
    (w / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (w / "run.sh").chmod(0o755)
    (w / "data.pdb").write_bytes(b"ATOM      1  N   MET A   1\n" * 1000)
    (w / "bin.dat").write_bytes(os.urandom(100_000))
    (w / "zero").write_bytes(b"")
    (w / "old.txt").write_text("old\n")
    os.utime(w / "old.txt", (0, 86_400))  # 1970: before what zip can hold
    (w / "a" / "b" / "deep.txt").chmod(0o640)
    secret = tmp_path / "secret"
    secret.write_text("TOP-SECRET-CONTENT\n")
    os.symlink(secret, w / "secret-link")
    os.symlink("/etc/passwd", w / "passwd-link")
    os.symlink("/etc", w / "etc-dir-link")
    os.symlink("a/b/deep.txt", w / "rel-link")
    os.mkfifo(w / "fifo")
    for p in [w / "run.sh", w / "data.pdb", w / "bin.dat", w / "zero", w / "a" / "b" / "deep.txt"]:
        os.utime(p, (MTIME, MTIME))
    return w


def zip_content(data: bytes | Path) -> dict[str, tuple[bytes, int, tuple[int, ...]]]:
    """name -> (content, unix mode, DOS date_time), after a full CRC check."""
    src = io.BytesIO(data) if isinstance(data, bytes) else data
    with zipfile.ZipFile(src) as zf:
        assert zf.testzip() is None
        return {
            zi.filename: (zf.read(zi), zi.external_attr >> 16, zi.date_time) for zi in zf.infolist()
        }


def tar_content(data: bytes) -> dict[str, tuple[str, int, int, int, str, bytes]]:
    """name -> (type, mode, size, mtime, linkname, content)."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
        for ti in tf:
            f = tf.extractfile(ti) if ti.isreg() else None
            body = f.read() if f else b""
            out[ti.name] = (ti.type.decode(), ti.mode, ti.size, ti.mtime, ti.linkname, body)
    return out


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------------------
# pack_zip


def test_pack_zip_content(work: Path, tmp_path: Path) -> None:
    dest = tmp_path / "result.zip"
    size = pack.pack_zip(work, dest, level=0)
    assert size == dest.stat().st_size
    raw = dest.read_bytes()
    content = zip_content(dest)

    assert list(content) == sorted(content)  # deterministic order
    assert set(content) == {
        "a/",
        "a/b/",
        "a/b/deep.txt",
        "bin.dat",
        "data.pdb",
        "empty/",
        "etc-dir-link",
        "old.txt",
        "passwd-link",
        "rel-link",
        "run.sh",
        "secret-link",
        "zero",
    }
    assert content["run.sh"][0] == b"#!/bin/sh\necho hi\n"
    assert content["run.sh"][1] == stat.S_IFREG | 0o755
    assert content["a/b/deep.txt"][1] == stat.S_IFREG | 0o640
    assert stat.S_ISDIR(content["empty/"][1])
    assert content["bin.dat"][0] == (work / "bin.dat").read_bytes()
    assert content["zero"][0] == b""
    # mtimes: the DOS field is local time; clamped to 1980 for the 1970 file
    assert content["run.sh"][2] == time.localtime(MTIME)[:6]
    assert content["old.txt"][2] == (1980, 1, 1, 0, 0, 0)

    # symlinks are stored as links, never followed
    for name, target in [
        ("secret-link", str(tmp_path / "secret")),
        ("passwd-link", "/etc/passwd"),
        ("etc-dir-link", "/etc"),
        ("rel-link", "a/b/deep.txt"),
    ]:
        assert content[name] == (target.encode(), stat.S_IFLNK | 0o777, content[name][2])
    assert b"TOP-SECRET-CONTENT" not in raw
    assert Path("/etc/passwd").read_bytes() not in raw
    assert not any(n.startswith("etc-dir-link/") for n in content)
    assert "fifo" not in content


def test_pack_zip_unzip_restores_tree(work: Path, tmp_path: Path) -> None:
    """Info-ZIP unzip (what users have) restores links, modes and exact mtimes."""
    if not Path("/usr/bin/unzip").exists():
        pytest.skip("no unzip")
    dest = tmp_path / "result.zip"
    pack.pack_zip(work, dest)
    out = tmp_path / "out"
    subprocess.run(["unzip", "-q", str(dest), "-d", str(out)], check=True)
    assert os.readlink(out / "passwd-link") == "/etc/passwd"
    assert os.stat(out / "run.sh").st_mode & 0o777 == 0o755
    assert os.stat(out / "run.sh").st_mtime == MTIME  # from the UTC extended timestamp
    assert (out / "empty").is_dir()
    assert (out / "data.pdb").read_bytes() == (work / "data.pdb").read_bytes()


def test_pack_zip_levels(work: Path, tmp_path: Path) -> None:
    pack.pack_zip(work, tmp_path / "s.zip", level=0)
    stored = zip_content(tmp_path / "s.zip")
    deflated_size = pack.pack_zip(work, tmp_path / "d.zip", level=9)
    assert zip_content(tmp_path / "d.zip") == stored
    with zipfile.ZipFile(tmp_path / "d.zip") as zf:
        assert zf.getinfo("data.pdb").compress_type == zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(tmp_path / "s.zip") as zf:
        assert zf.getinfo("data.pdb").compress_type == zipfile.ZIP_STORED
    assert deflated_size < (tmp_path / "s.zip").stat().st_size
    with pytest.raises(ValueError):
        pack.pack_zip(work, tmp_path / "x.zip", level=10)


def test_pack_zip_drops_setuid(tmp_path: Path) -> None:
    w = tmp_path / "w"
    w.mkdir()
    (w / "suid").write_bytes(b"x")
    (w / "suid").chmod(0o4755)
    pack.pack_zip(w, tmp_path / "r.zip")
    assert zip_content(tmp_path / "r.zip")["suid"][1] == stat.S_IFREG | 0o755


def test_pack_zip_far_future_mtime(tmp_path: Path) -> None:
    w = tmp_path / "w"
    w.mkdir()
    (w / "future").write_bytes(b"x")
    os.utime(w / "future", (0, 7_500_000_000))  # year 2207
    pack.pack_zip(w, tmp_path / "r.zip")
    assert zip_content(tmp_path / "r.zip")["future"][2] == (2107, 12, 31, 23, 59, 58)


def test_pack_zip_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "w").mkdir()
    pack.pack_zip(tmp_path / "w", tmp_path / "r.zip")
    assert zip_content(tmp_path / "r.zip") == {}


def test_pack_zip_is_atomic(work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure halfway leaves neither a partial file nor a temporary behind, and an
    older result under the final name untouched."""
    dest = tmp_path / "out" / "result.zip"
    dest.parent.mkdir()
    dest.write_bytes(b"previous result")
    real = pack._read_upto

    def failing(fd: int, limit: int, chunk_size: int):
        yield from real(fd, min(limit, 10), chunk_size)
        raise OSError("disk on fire")

    monkeypatch.setattr(pack, "_read_upto", failing)
    fds = open_fds()
    with pytest.raises(OSError, match="disk on fire"):
        pack.pack_zip(work, dest)
    assert os.listdir(dest.parent) == ["result.zip"]
    assert dest.read_bytes() == b"previous result"
    assert open_fds() == fds

    monkeypatch.setattr(pack, "_read_upto", real)
    pack.pack_zip(work, dest)
    assert os.listdir(dest.parent) == ["result.zip"]
    assert "run.sh" in zip_content(dest)


def test_pack_zip_refuses(work: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pack itself"):
        pack.pack_zip(work, work / "result.zip")
    link = tmp_path / "link"
    os.symlink(work, link)
    with pytest.raises(NotADirectoryError):
        pack.pack_zip(link, tmp_path / "r.zip")  # the root is not followed either
    with pytest.raises(FileNotFoundError):
        pack.pack_zip(tmp_path / "missing", tmp_path / "r.zip")
    assert not (tmp_path / "r.zip").exists()


def test_zip64(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files past the ZIP64 limit (scaled down here: the code paths are the same)."""
    w = tmp_path / "w"
    w.mkdir()
    (w / "big").write_bytes(os.urandom(5000))
    with monkeypatch.context() as m:
        m.setattr(zipfile, "ZIP64_LIMIT", 1000)
        pack.pack_zip(w, tmp_path / "r.zip", level=0)
        streamed = b"".join(pack.iter_zip(w, level=1))
    assert zip_content(tmp_path / "r.zip")["big"][0] == (w / "big").read_bytes()
    assert zip_content(streamed)["big"][0] == (w / "big").read_bytes()
    assert extra_tags(tmp_path / "r.zip", "big")[0] == 0x0001  # ZIP64 first, then UT
    assert extra_tags(io.BytesIO(streamed), "big")[0] == 0x0001
    pack.pack_zip(w, tmp_path / "small.zip", level=0)
    assert extra_tags(tmp_path / "small.zip", "big") == [0x5455]


def extra_tags(src: Path | io.BytesIO, name: str) -> list[int]:
    """The extra-field tags of a member in the central directory."""
    with zipfile.ZipFile(src) as zf:
        extra = zf.getinfo(name).extra
    tags, i = [], 0
    while i + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, i)
        tags.append(tag)
        i += 4 + size
    return tags


# ---------------------------------------------------------------------------
# walk safety


def test_vanished_file_is_skipped(tmp_path: Path) -> None:
    w = tmp_path / "w"
    w.mkdir()
    for name in "abc":
        (w / name).write_bytes(name.encode() * 10)
    chunks = pack.iter_zip(w, chunk_size=1)  # yields after every entry
    first = next(chunks)
    (w / "b").unlink()
    data = first + b"".join(chunks)
    assert set(zip_content(data)) == {"a", "c"}


def test_file_swapped_for_symlink_is_not_followed(tmp_path: Path) -> None:
    """Between lstat and open the job replaces a file with a link to a secret."""
    w = tmp_path / "w"
    w.mkdir()
    (w / "f").write_bytes(b"harmless")
    (tmp_path / "secret").write_bytes(b"SECRET")
    walk = pack._walk(w)
    entry = next(walk)
    assert entry.kind == "file"
    (w / "f").unlink()
    os.symlink(tmp_path / "secret", w / "f")
    assert pack._open_regular(entry) is None
    walk.close()


def test_dir_swapped_for_symlink_is_not_descended(tmp_path: Path) -> None:
    w = tmp_path / "w"
    (w / "d").mkdir(parents=True)
    (w / "d" / "inner").write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "shadow").write_bytes(b"SECRET")
    walk = pack._walk(w)
    entry = next(walk)
    assert (entry.rel, entry.kind) == ("d", "dir")
    os.rename(w / "d", tmp_path / "d-moved")
    os.symlink(outside, w / "d")
    assert list(walk) == []  # open(O_NOFOLLOW | O_DIRECTORY) refused the swapped link


def test_deep_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pack, "MAX_DEPTH", 5)
    w = tmp_path / "w"
    deep = w.joinpath(*"abcdefgh")
    deep.mkdir(parents=True)
    (deep / "leaf").write_bytes(b"x")
    names = [fi.path for fi in pack.list_dir(w)]
    assert names == ["a", "a/b", "a/b/c", "a/b/c/d", "a/b/c/d/e"]  # cut, logged, no crash


def test_walk_closes_fds_when_abandoned(work: Path) -> None:
    fds = open_fds()
    chunks = pack.iter_zip(work, chunk_size=1)
    next(chunks)
    next(chunks)
    assert open_fds() > fds
    chunks.close()  # the client disconnected
    assert open_fds() == fds
    tars = pack.iter_tar_gz(work, chunk_size=1)
    next(tars)
    tars.close()
    assert open_fds() == fds


# ---------------------------------------------------------------------------
# iter_zip


@pytest.mark.parametrize("level", [0, 1])
@pytest.mark.parametrize("chunk_size", [1, 4096, 1 << 20])
def test_iter_zip_equals_pack_zip(work: Path, tmp_path: Path, level: int, chunk_size: int) -> None:
    pack.pack_zip(work, tmp_path / "r.zip", level=level)
    chunks = list(pack.iter_zip(work, level=level, chunk_size=chunk_size))
    assert all(chunks)
    if chunk_size > 1:
        assert all(len(c) < 2 * chunk_size + 100_000 for c in chunks)  # bounded, not one blob
    assert zip_content(b"".join(chunks)) == zip_content(tmp_path / "r.zip")


def test_iter_zip_while_appending(tmp_path: Path) -> None:
    """A live snapshot of a file the job is still writing: valid, and a prefix."""
    w = tmp_path / "w"
    w.mkdir()
    log_path = w / "growing.log"
    log_path.write_bytes(b"start\n" * 100_000)
    stop = threading.Event()

    def writer() -> None:
        with open(log_path, "ab") as f:
            i = 0
            while not stop.is_set():
                f.write(b"line %d\n" % i)
                f.flush()
                i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        snapshots = [b"".join(pack.iter_zip(w, chunk_size=4096)) for _ in range(5)]
        tars = [b"".join(pack.iter_tar_gz(w, chunk_size=4096)) for _ in range(3)]
    finally:
        stop.set()
        t.join()
    final = log_path.read_bytes()
    for snap in snapshots:
        body = zip_content(snap)["growing.log"][0]
        assert final.startswith(body)
        assert len(body) >= 600_000
    for tgz in tars:
        body = tar_content(tgz)["growing.log"][5]
        assert final.startswith(body)


def test_iter_zip_refuses(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        pack.iter_zip(tmp_path / "missing")  # at call time, before a response starts
    with pytest.raises(ValueError):
        pack.iter_zip(tmp_path, level=-1)


# ---------------------------------------------------------------------------
# iter_tar_gz


def test_iter_tar_gz_dir_and_zip_agree(work: Path, tmp_path: Path) -> None:
    pack.pack_zip(work, tmp_path / "r.zip")
    from_dir = tar_content(b"".join(pack.iter_tar_gz(work, chunk_size=1000)))
    from_zip = tar_content(b"".join(pack.iter_tar_gz(tmp_path / "r.zip", chunk_size=1000)))
    assert from_dir == from_zip

    assert "fifo" not in from_dir
    assert from_dir["run.sh"][:4] == ("0", 0o755, 18, MTIME)
    assert from_dir["run.sh"][5] == b"#!/bin/sh\necho hi\n"
    assert from_dir["bin.dat"][5] == (work / "bin.dat").read_bytes()
    assert from_dir["empty"][0] == "5"  # DIRTYPE
    assert from_dir["passwd-link"][0] == "2"  # SYMTYPE
    assert from_dir["passwd-link"][4] == "/etc/passwd"
    assert from_dir["etc-dir-link"][4] == "/etc"
    assert not any(n.startswith("etc-dir-link/") for n in from_dir)
    assert b"TOP-SECRET-CONTENT" not in b"".join(v[5] for v in from_dir.values())


def test_iter_tar_gz_system_tar(work: Path, tmp_path: Path) -> None:
    data = b"".join(pack.iter_tar_gz(work))
    (tmp_path / "r.tgz").write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "-xzf", str(tmp_path / "r.tgz"), "-C", str(out)], check=True)
    assert (out / "data.pdb").read_bytes() == (work / "data.pdb").read_bytes()
    assert os.readlink(out / "passwd-link") == "/etc/passwd"


def test_iter_tar_gz_long_and_unicode_names(tmp_path: Path) -> None:
    w = tmp_path / "w"
    long_dir = w / ("d" * 120)
    long_dir.mkdir(parents=True)
    (long_dir / "résumé ✓.txt").write_bytes(b"u")
    pack.pack_zip(w, tmp_path / "r.zip")
    a = tar_content(b"".join(pack.iter_tar_gz(w)))
    b = tar_content(b"".join(pack.iter_tar_gz(tmp_path / "r.zip")))
    assert a == b
    assert a["d" * 120 + "/résumé ✓.txt"][5] == b"u"


def test_iter_tar_gz_file_shrinking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file truncated while streamed: its header is out, so it is zero-padded."""
    w = tmp_path / "w"
    w.mkdir()
    (w / "f").write_bytes(b"x" * 1000)
    (w / "g").write_bytes(b"g")
    real = pack._read_upto
    monkeypatch.setattr(pack, "_read_upto", lambda fd, n, c: real(fd, min(n, 300), c))
    content = tar_content(b"".join(pack.iter_tar_gz(w)))
    assert content["f"][5] == b"x" * 300 + b"\0" * 700
    assert content["g"][5] == b"g"


def test_iter_tar_gz_refuses(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError):
        pack.iter_tar_gz(tmp_path / "fifo")
    (tmp_path / "not.zip").write_bytes(b"nope")
    with pytest.raises(zipfile.BadZipFile):
        pack.iter_tar_gz(tmp_path / "not.zip")


# ---------------------------------------------------------------------------
# base64


def b64_of(path: Path, chunk_size: int) -> list[bytes]:
    return list(pack.iter_base64(path, chunk_size=chunk_size))


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 6, 7, 8, 9, 3 << 20])
def test_iter_base64_sizes(tmp_path: Path, chunk_size: int) -> None:
    path = tmp_path / "f"
    step = max(3, chunk_size - chunk_size % 3)
    for size in sorted(
        {
            0,
            1,
            2,
            3,
            4,
            step - 1,
            step,
            step + 1,
            2 * step - 1,
            2 * step,
            2 * step + 1,
            3 * step + 2,
        }
    ):
        data = os.urandom(size)
        path.write_bytes(data)
        chunks = b64_of(path, chunk_size)
        assert b"".join(chunks) == base64.b64encode(data), (chunk_size, size)
        assert all(b"=" not in c and b"\n" not in c for c in chunks[:-1])
        assert pack.base64_size(size) == len(base64.b64encode(data))


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=2000), chunk_size=st.integers(1, 100))
def test_iter_base64_property(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, chunk_size: int
) -> None:
    path = tmp_path_factory.mktemp("b64") / "f"
    path.write_bytes(data)
    assert b"".join(b64_of(path, chunk_size)) == base64.b64encode(data)


def test_base64_size() -> None:
    for n in range(200):
        assert pack.base64_size(n) == len(base64.b64encode(b"\0" * n))
    assert pack.base64_size(10**12) == 4 * ((10**12 + 2) // 3)
    with pytest.raises(ValueError):
        pack.base64_size(-1)


def test_iter_base64_missing_file_fails_at_call(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        pack.iter_base64(tmp_path / "missing")


def test_iter_base64_short_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file read in odd-sized pieces (still growing) still encodes as one whole."""
    data = os.urandom(1000)

    class Dribble(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:
            return super().read(min(7, n if n and n > 0 else 7))

    chunks = list(pack._iter_base64(Dribble(data), 9))
    assert b"".join(chunks) == base64.b64encode(data)


# ---------------------------------------------------------------------------
# listings, single files


def test_list_dir_and_list_zip(work: Path, tmp_path: Path) -> None:
    live = pack.list_dir(work)
    pack.pack_zip(work, tmp_path / "r.zip")
    done = pack.list_zip(tmp_path / "r.zip")
    by_path = {fi.path: fi for fi in live}
    assert [fi.path for fi in live] == [fi.path for fi in done]
    assert "fifo" not in by_path
    assert not any(p.startswith("etc-dir-link/") for p in by_path)
    for a, b in zip(live, done):
        assert (a.path, a.size, a.mime, a.kind) == (b.path, b.size, b.mime, b.kind)
    assert by_path["data.pdb"].mime == "text/plain"
    assert by_path["data.pdb"].size == 27_000
    assert by_path["data.pdb"].mtime == MTIME
    assert {fi.path: fi.mtime for fi in done}["data.pdb"] == MTIME  # UTC, from the extra field
    assert by_path["bin.dat"].mime == "application/octet-stream"
    assert by_path["a"].kind == "dir"
    assert by_path["a"].mime == "inode/directory"
    assert by_path["passwd-link"].kind == "symlink"
    assert by_path["passwd-link"].size == len("/etc/passwd")
    assert by_path["run.sh"].kind == "file"


def test_mime() -> None:
    assert pack._mime("x.PDB") == "text/plain"
    assert pack._mime("a/b.log") == "text/plain"
    assert pack._mime("x.png") == "image/png"
    assert pack._mime("x.json") == "application/json"
    assert pack._mime("x.tar.gz") == "application/gzip"
    assert pack._mime("noext") == "application/octet-stream"


def test_open_in_zip(work: Path, tmp_path: Path) -> None:
    zpath = tmp_path / "r.zip"
    pack.pack_zip(work, zpath)
    fds = open_fds()
    f, info = pack.open_in_zip(zpath, "a/b/deep.txt")
    with f:
        assert f.read() == b"deep\n"
    assert (info.path, info.size, info.kind, info.mime) == ("a/b/deep.txt", 5, "file", "text/plain")
    assert open_fds() == fds
    f, info = pack.open_in_zip(zpath, "./a//b/deep.txt")
    f.close()
    with pytest.raises(KeyError):
        pack.open_in_zip(zpath, "nope")
    for bad in ["../x", "/etc/passwd", "a/../../x", "", "a\0b"]:
        with pytest.raises(ValueError):
            pack.open_in_zip(zpath, bad)
    with pytest.raises(ValueError, match="symlink"):
        pack.open_in_zip(zpath, "passwd-link")
    with pytest.raises(ValueError, match="dir"):
        pack.open_in_zip(zpath, "a/")
    assert open_fds() == fds


def test_safe_child(work: Path, tmp_path: Path) -> None:
    real = Path(os.path.realpath(work))
    assert pack.safe_child(work, "a/b/deep.txt") == real / "a" / "b" / "deep.txt"
    assert pack.safe_child(work, "./a//b/deep.txt") == real / "a" / "b" / "deep.txt"
    assert pack.safe_child(work, "rel-link") == real / "a" / "b" / "deep.txt"  # stays inside
    assert pack.safe_child(work, "not-yet") == real / "not-yet"
    refusals = {
        "../secret": "'..'",
        "a/../../secret": "'..'",
        "/etc/passwd": "absolute",
        "": "empty",
        ".": "empty",
        "a\0b": "NUL",
        "secret-link": "outside",
        "passwd-link": "outside",
        "etc-dir-link/passwd": "outside",
    }
    for rel, message in refusals.items():
        with pytest.raises(ValueError, match=message):
            pack.safe_child(work, rel)


def test_open_child(work: Path) -> None:
    f, info = pack.open_child(work, "a/b/deep.txt")
    with f:
        assert f.read() == b"deep\n"
    assert (info.path, info.size, info.kind) == ("a/b/deep.txt", 5, "file")
    f, info = pack.open_child(work, "rel-link")  # a link inside root is fine
    with f:
        assert f.read() == b"deep\n"
    assert info.path == "a/b/deep.txt"
    with pytest.raises(ValueError):
        pack.open_child(work, "passwd-link")
    with pytest.raises(IsADirectoryError):
        pack.open_child(work, "a")
    with pytest.raises(FileNotFoundError):
        pack.open_child(work, "missing")
    with pytest.raises(ValueError):
        pack.open_child(work, "fifo")


# ---------------------------------------------------------------------------
# memory and throughput

_MEMORY_PROBE = r"""
import json, os, resource, sys, time, tracemalloc
from pathlib import Path
from jobd import pack

src, out = Path(sys.argv[1]), Path(sys.argv[2])
size = sum(p.stat().st_size for p in src.iterdir())


def peak_rss_kib():
    # VmHWM belongs to this process image; ru_maxrss would carry the parent's peak
    # across fork+exec (pytest's own RSS would hide any growth below it).
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    scale = 1 if sys.platform.startswith("linux") else 1024  # ru_maxrss unit: KiB/bytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // scale


rss0 = peak_rss_kib()
report = {}

t = time.perf_counter()
zip_size = pack.pack_zip(src, out / "result.zip", level=1)
report["pack_zip_s"] = time.perf_counter() - t

t = time.perf_counter()
n = sum(len(c) for c in pack.iter_base64(src / "big.bin"))
report["base64_s"] = time.perf_counter() - t
assert n == pack.base64_size(size)
report["base64_mib_s"] = size / (1 << 20) / report["base64_s"]
assert sum(len(c) for c in pack.iter_base64(out / "result.zip")) == pack.base64_size(zip_size)

t = time.perf_counter()
report["iter_zip_bytes"] = sum(len(c) for c in pack.iter_zip(src))
report["iter_zip_s"] = time.perf_counter() - t

t = time.perf_counter()
report["tar_gz_bytes"] = sum(len(c) for c in pack.iter_tar_gz(out / "result.zip"))
report["tar_gz_s"] = time.perf_counter() - t

report["rss_growth_mib"] = (peak_rss_kib() - rss0) / 1024

tracemalloc.start()
for c in pack.iter_base64(out / "result.zip"):
    pass
for c in pack.iter_zip(src, level=1):
    pass
report["tracemalloc_peak_mib"] = tracemalloc.get_traced_memory()[1] / (1 << 20)
report["size"] = size
print(json.dumps(report))
"""


def test_memory_stays_flat(tmp_path: Path) -> None:
    """200 MiB through every streaming path in a fresh process: peak RSS must not
    follow the payload. The file is 'sparse-ish' (a 1 MiB block of 128 KiB random and
    896 KiB zeros, repeated) so deflate has real work without taking too long (random
    data deflates at only ~40 MiB/s)."""
    src = tmp_path / "work"
    src.mkdir()
    block = os.urandom(128 << 10) + bytes(896 << 10)
    with open(src / "big.bin", "wb") as f:
        for _ in range(200):
            f.write(block)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(src), str(out)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    elapsed = time.perf_counter() - t
    r = report
    print(
        f"\n200 MiB: pack_zip {r['pack_zip_s']:.2f}s, iter_base64 {r['base64_mib_s']:.0f} MiB/s,"
        f" iter_zip {r['iter_zip_s']:.2f}s, tar.gz {r['tar_gz_s']:.2f}s,"
        f" RSS growth {r['rss_growth_mib']:.1f} MiB,"
        f" tracemalloc peak {r['tracemalloc_peak_mib']:.1f} MiB, total {elapsed:.1f}s"
    )
    assert report["size"] == 200 << 20
    assert report["iter_zip_bytes"] > 200 << 20
    assert report["rss_growth_mib"] < 32, report
    assert report["tracemalloc_peak_mib"] < 16, report
    assert report["base64_mib_s"] > 200, report


def test_is_small_stops_at_the_first_excess(tmp_path: Path) -> None:
    assert pack.is_small(tmp_path / "missing")  # nothing there: nothing to pack
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "f").write_bytes(b"x" * 100)
    assert pack.is_small(tmp_path)
    assert not pack.is_small(tmp_path, max_bytes=99)
    assert not pack.is_small(tmp_path, max_entries=2)  # d, e, f
    (tmp_path / "link").symlink_to("/dev/zero")  # counted, never followed
    assert pack.is_small(tmp_path, max_entries=4)
