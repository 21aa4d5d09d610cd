"""The streaming multipart/form-data reader: framing, caps, file names, input.zip building."""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
import tracemalloc
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from jobd import archive, multipart
from jobd.multipart import (
    BodyTooLarge,
    MultipartError,
    MultipartParser,
    UnsafeFilename,
    boundary_of,
    build_input_zip,
    parse_params,
    read_form,
    safe_filename,
)
from tests.conftest import make_zip

B = "b0undary"
CT = f"multipart/form-data; boundary={B}"


def part(name: str, content: bytes, filename: str | None = None,
         extra: str = "") -> bytes:
    disposition = f'form-data; name="{name}"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    head = f"--{B}\r\nContent-Disposition: {disposition}\r\n{extra}\r\n".encode()
    return head + content + b"\r\n"


def body(*parts: bytes, close: bool = True) -> bytes:
    return b"".join(parts) + (f"--{B}--\r\n".encode() if close else b"")


def read(data: bytes, directory: Path, chunk: int | None = None, **caps: int) -> multipart.Form:
    chunks = [data] if chunk is None else [data[i:i + chunk] for i in range(0, len(data), chunk)]
    return read_form(chunks, CT, directory, **caps)


# -- headers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ('form-data; name="file"; filename="run.sh"',
     ("form-data", {"name": "file", "filename": "run.sh"})),
    ("Form-Data;name=x;filename=y.txt", ("form-data", {"name": "x", "filename": "y.txt"})),
    ('form-data; name="a;b"; filename="c\\"d"', ("form-data", {"name": "a;b", "filename": 'c"d'})),
    ('form-data; filename="C:\\dir\\x.pdb"', ("form-data", {"filename": "C:\\dir\\x.pdb"})),
    ("form-data; filename=\"x\"; filename*=UTF-8''na%C3%AFve.txt",
     ("form-data", {"filename": "naïve.txt"})),
    ("multipart/form-data; boundary=\"a b\"", ("multipart/form-data", {"boundary": "a b"})),
])
def test_parse_params(value: str, expected: tuple[str, dict[str, str]]) -> None:
    assert parse_params(value) == expected


@pytest.mark.parametrize("value", ['form-data; name="open', "form-data; =x",
                                   'form-data; name="a"b', "form-data; filename*=nope"])
def test_parse_params_refuses(value: str) -> None:
    with pytest.raises(MultipartError):
        parse_params(value)


@pytest.mark.parametrize(("content_type", "message"), [
    (None, "no Content-Type"),
    ("application/json", "expected multipart/form-data"),
    ("multipart/form-data", "no boundary"),
    ("multipart/form-data; boundary=", "no boundary"),
    ("multipart/form-data; boundary=" + "x" * 300, "unusable"),
    ("multipart/form-data; boundary=é", "not ASCII"),
])
def test_boundary_of_refuses(content_type: str | None, message: str) -> None:
    with pytest.raises(MultipartError, match=message):
        boundary_of(content_type)


def test_boundary_of() -> None:
    assert boundary_of('multipart/form-data; charset=utf-8; boundary="--x y"') == b"--x y"


# -- file names -------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    ("run.sh", "run.sh"),
    ("a/../../x", "x"),
    ("../../../etc/passwd", "passwd"),
    ("/abs/path/input.pdb", "input.pdb"),
    ("C:\\Users\\me\\input.pdb", "input.pdb"),
    ("..\\..\\x", "x"),
    (".hidden", ".hidden"),
    ("naïve ünïcode.txt", "naïve ünïcode.txt"),
    ("a" * 255, "a" * 255),
])
def test_safe_filename(raw: str, expected: str) -> None:
    assert safe_filename(raw) == expected


@pytest.mark.parametrize(("raw", "why"), [
    ("", "empty"), ("dir/", "directory"), ("..", "directory"), (".", "directory"),
    ("a/..", "directory"), ("x\x00y", "NUL"), ("x\ny", "control"), ("x\x7f", "control"),
    ("\x85x", "control"), ("é" * 128, "longer than 255 bytes"), ("x\ud800", "not valid"),
])
def test_safe_filename_refuses(raw: str, why: str) -> None:
    with pytest.raises(UnsafeFilename, match=why):
        safe_filename(raw)


@given(st.text(max_size=300))
@settings(max_examples=500, deadline=None)
def test_safe_filename_property(raw: str) -> None:
    """Whatever the client sends, a saved name is one plain component inside the directory."""
    try:
        name = safe_filename(raw)
    except UnsafeFilename:
        return
    assert name not in ("", ".", "..")
    assert "/" not in name and "\\" not in name and "\x00" not in name
    assert all(ord(c) >= 32 and not 127 <= ord(c) < 160 for c in name)
    assert len(name.encode("utf-8")) <= 255
    assert raw.replace("\\", "/").endswith(name)  # a suffix of what was sent, not invented
    assert safe_filename(name) == name  # stable
    root = Path("/srv/form")
    assert (root / name).parent == root


# -- framing ----------------------------------------------------------------------------------


def test_fields_and_files(tmp_path: Path) -> None:
    data = body(part("file", b"#!/bin/sh\necho hi\n", "run.sh", "Content-Type: text/x-sh\r\n"),
                part("file", b"\x00\x01\r\n\xff", "data.bin"),
                part("priority", b"5"), part("note", "ünïcode".encode()))
    form = read(data, tmp_path)
    assert form.fields == {"priority": "5", "note": "ünïcode"}
    assert [(f.name, f.size, f.field) for f in form.files] == [
        ("run.sh", 18, "file"), ("data.bin", 5, "file")]
    assert form.files[0].content_type == "text/x-sh"
    assert (tmp_path / "data.bin").read_bytes() == b"\x00\x01\r\n\xff"
    assert form.size == len(data)
    assert sorted(os.listdir(tmp_path)) == ["data.bin", "run.sh"]


def test_preamble_padding_epilogue_and_folded_headers(tmp_path: Path) -> None:
    data = (b"this is a preamble\r\n"
            + f"--{B}  \t\r\nContent-Disposition: form-data;\r\n name=\"f\";"
              f"\r\n\tfilename=\"x\"\r\n\r\nabc\r\n--{B}--".encode()
            + b"\r\nand an epilogue with --" + B.encode() + b" in it")
    form = read(data, tmp_path)
    assert [(f.name, f.size) for f in form.files] == [("x", 3)]
    assert (tmp_path / "x").read_bytes() == b"abc"


def test_empty_form_and_empty_file(tmp_path: Path) -> None:
    assert read(body(), tmp_path).files == []
    form = read(body(part("file", b"", "empty.txt")), tmp_path)
    assert [(f.name, f.size) for f in form.files] == [("empty.txt", 0)]


def test_content_that_looks_like_a_boundary(tmp_path: Path) -> None:
    tricky = f"--{B}\r\n\n--{B}x\r\n--{B[:-1]}\r\n--".encode()  # never CRLF--boundary
    assert f"\r\n--{B}".encode() not in tricky
    data = body(part("file", tricky, "t.bin"), part("f", b"\r\n--" + B[:3].encode()))
    form = read(data, tmp_path, chunk=1)
    assert (tmp_path / "t.bin").read_bytes() == tricky
    assert form.fields == {"f": "\r\n--" + B[:3]}


@pytest.mark.parametrize(("data", "message"), [
    (b"", "no multipart boundary"),
    (b"no boundary here at all", "no multipart boundary"),
    (body(part("file", b"abc", "x"))[:-12], "ends inside a part"),
    (body(part("file", b"abc", "x"), close=False), "before the closing boundary"),
    (f"--{B}\r\nContent-Disposition: form-data; name=\"x\"".encode(), "without its closing"),
    (f"--{B}x\r\n".encode() + body(), "followed by unexpected bytes"),
    (f"--{B}\r\nno colon here\r\n\r\nx\r\n".encode() + body(), "malformed part header"),
    (f"--{B}\r\nX-Other: 1\r\n\r\nx\r\n".encode() + body(), "no Content-Disposition"),
    (f"--{B}\r\nContent-Disposition: attachment; name=x\r\n\r\nx\r\n".encode() + body(),
     "not form-data"),
    (f"--{B}\r\nContent-Disposition: form-data\r\n\r\nx\r\n".encode() + body(), "has no name"),
    (body(part("a", b"1"), part("a", b"2")), "given twice"),
    (body(part("a", b"\xff\xfe")), "not valid UTF-8"),
    (f"--{B}\r\nContent-Disposition: form-data; name=x\r\nX-Big: {'y' * 20000}\r\n\r\n".encode()
     + body(), "headers are larger"),
    (f"--{B}\r\nContent-Disposition: form-data; name=x{'y' * 20000}".encode(),
     "headers are larger"),
])
def test_malformed_bodies(tmp_path: Path, data: bytes, message: str) -> None:
    for chunk in (None, 7):
        with pytest.raises(MultipartError, match=message):
            read(data, tmp_path / str(chunk), chunk=chunk)


@pytest.mark.parametrize(("data", "message"), [
    (body(part("file", b"1", "../x"), part("file", b"2", "dir/x")), "two files are named 'x'"),
    (body(part("file", b"1", "..")), "names a directory"),
    (body(part("file", b"1", "")), "is empty"),
    (body(part("file", b"1", "a%00b".replace("%00", "\x00"))), "NUL"),
])
def test_unsafe_file_names(tmp_path: Path, data: bytes, message: str) -> None:
    with pytest.raises(UnsafeFilename, match=message):
        read(data, tmp_path)


def test_unsafe_name_is_reported_after_the_whole_body(tmp_path: Path) -> None:
    """Later parts are read and dropped; a malformed rest of the body takes precedence."""
    good = part("file", b"1", "ok.txt")
    refused = part("file", b"2", "..")
    later = part("file", b"3" * 5000, "later.bin")
    with pytest.raises(UnsafeFilename, match="names a directory"):
        read(body(good, refused, later, part("f", b"v")), tmp_path / "a", chunk=100)
    assert sorted(os.listdir(tmp_path / "a")) == ["ok.txt"]
    with pytest.raises(MultipartError, match="closing boundary") as caught:
        read(body(good, refused, later, close=False), tmp_path / "b")
    assert not isinstance(caught.value, UnsafeFilename)


def test_caps(tmp_path: Path) -> None:
    three = body(part("a", b"1"), part("b", b"2"), part("file", b"3", "c"))
    assert len(read(three, tmp_path / "ok", max_parts=3).files) == 1
    with pytest.raises(MultipartError, match="more than 2 parts"):
        read(three, tmp_path / "parts", max_parts=2)
    with pytest.raises(MultipartError, match="'a' is larger than 4 bytes"):
        read(body(part("a", b"12345")), tmp_path / "field", max_field_size=4)
    assert read(body(part("file", b"12345" * 100, "f")), tmp_path / "file",
                max_field_size=4).files[0].size == 500  # files are not fields
    with pytest.raises(BodyTooLarge, match="larger than 100 bytes"):
        read(body(part("file", b"x" * 200, "f")), tmp_path / "body", chunk=10, max_body=100)


def test_files_stream_to_disk_not_memory(tmp_path: Path) -> None:
    """64 MiB through the reader in 64 KiB chunks: memory stays at a few chunks."""
    size, chunk = 64 << 20, 64 << 10
    block = bytes(range(256)) * (chunk // 256)

    def chunks() -> Iterator[bytes]:
        yield f"--{B}\r\nContent-Disposition: form-data; name=file; filename=big\r\n\r\n".encode()
        for _ in range(size // chunk):
            yield block
        yield f"\r\n--{B}--\r\n".encode()

    tracemalloc.start()
    try:
        form = read_form(chunks(), CT, tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert form.files[0].size == size == (tmp_path / "big").stat().st_size
    assert peak < 4 << 20, f"peak {peak} bytes"


# -- chunk-boundary independence --------------------------------------------------------------

_contents = st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from([b"\r\n", b"--", B.encode(), B[:3].encode(), b"\r", b"\n", b"x",
                              b"-", b" "]), max_size=40).map(b"".join),
)
_forms = st.lists(
    st.tuples(st.booleans(), _contents).filter(lambda p: f"\r\n--{B}".encode() not in p[1]),
    max_size=6)


@given(_forms, st.lists(st.integers(min_value=0, max_value=2000), max_size=12), st.data())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_chunk_boundaries_do_not_matter(parts: list[tuple[bool, bytes]], cuts: list[int],
                                        data: st.DataObject) -> None:
    """However the body is cut into chunks, the same fields and files come out."""
    pieces = []
    for i, (is_file, content) in enumerate(parts):
        if not is_file:
            content = content.decode("latin-1").encode("utf-8")
        pieces.append(part(f"p{i}", content, f"f{i}.bin" if is_file else None))
    whole = data.draw(st.sampled_from([b"", b"preamble\r\n"])) + body(*pieces) + \
        data.draw(st.sampled_from([b"", b"epilogue"]))
    points = sorted({min(c, len(whole)) for c in cuts})
    chunks = [whole[a:b] for a, b in zip([0, *points], [*points, len(whole)])]
    with tempfile.TemporaryDirectory() as one, tempfile.TemporaryDirectory() as many:
        expected = read_form([whole], CT, Path(one))
        got = read_form(chunks, CT, Path(many))
        assert got.fields == expected.fields
        assert [(f.name, f.size) for f in got.files] == [(f.name, f.size) for f in expected.files]
        for i, (is_file, content) in enumerate(parts):
            if is_file:
                assert (Path(many) / f"f{i}.bin").read_bytes() == content
            else:
                assert got.fields[f"p{i}"] == content.decode("latin-1")


@given(st.binary(max_size=400), st.lists(st.integers(min_value=0, max_value=400), max_size=8))
@settings(max_examples=300, deadline=None)
def test_parser_never_crashes_and_is_chunk_independent(noise: bytes, cuts: list[int]) -> None:
    """Arbitrary bytes: either the same events whatever the chunking, or MultipartError."""
    def run(chunks: list[bytes]) -> tuple[list[object], str | None]:
        parser = MultipartParser(B.encode())
        events: list[object] = []
        try:
            for c in chunks:
                events.extend(parser.feed(c))
            parser.close()
        except MultipartError as exc:
            return _joined(events), type(exc).__name__
        return _joined(events), None

    whole = f"--{B}\r\n".encode() + noise
    points = sorted({min(c, len(whole)) for c in cuts})
    chunks = [whole[a:b] for a, b in zip([0, *points], [*points, len(whole)])]
    one_events, one_error = run([whole])
    many_events, many_error = run(chunks)
    assert one_error == many_error
    if one_error is None:
        assert one_events == many_events


def _joined(events: list[tuple[str, object]]) -> list[object]:
    """Events with consecutive data pieces joined (pieces depend on chunking, content not)."""
    out: list[object] = []
    for kind, value in events:
        if kind == "data" and out and isinstance(out[-1], bytearray):
            out[-1] += value  # type: ignore[operator]
        elif kind == "data":
            out.append(bytearray(value))  # type: ignore[arg-type]
        else:
            out.append((kind, value))
    return out


# -- receive_form in a Starlette app ----------------------------------------------------------


def _app(dest: Path, max_body: int) -> Starlette:
    async def upload(request: Request) -> Response:
        try:
            form = await multipart.receive_form(request, dest, max_body=max_body)
        except MultipartError as exc:
            return JSONResponse({"error": type(exc).__name__, "message": str(exc)}, exc.status)
        return JSONResponse({"fields": form.fields, "size": form.size,
                             "files": [[f.name, f.size, f.field] for f in form.files]})
    return Starlette(routes=[Route("/", upload, methods=["POST"])])


def test_receive_form_with_httpx_multipart(tmp_path: Path) -> None:
    with TestClient(_app(tmp_path / "form", 1 << 20)) as client:
        response = client.post("/", data={"priority": "3"}, files=[
            ("file", ("run.sh", b"echo hi\n", "text/x-sh")),
            ("file", ("a/../../x", b"payload", "application/octet-stream")),
        ])
    assert response.status_code == 200, response.text
    assert response.json()["fields"] == {"priority": "3"}
    assert response.json()["files"] == [["run.sh", 8, "file"], ["x", 7, "file"]]
    assert (tmp_path / "form" / "x").read_bytes() == b"payload"


def test_receive_form_refuses_a_large_body_early(tmp_path: Path) -> None:
    with TestClient(_app(tmp_path / "form", 100)) as client:
        response = client.post("/", files=[("file", ("big", b"x" * 1000))])
        assert response.status_code == 413
        assert response.json()["error"] == "BodyTooLarge"

        def stream() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield f"--{B}\r\nContent-Disposition: form-data; name=f; filename=x\r\n\r\n".encode()
            yield b"y" * 200
        response = client.post("/", content=stream(), headers={"Content-Type": CT})
        assert response.status_code == 413


# -- input.zip --------------------------------------------------------------------------------

LIMITS = archive.Limits()


def _form(tmp_path: Path, files: dict[str, bytes]) -> multipart.Form:
    data = body(*(part("file", content, name) for name, content in files.items()))
    return read(data, tmp_path / "form")


def _names(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist() if not i.is_dir()}


def _tar(files: dict[str, bytes], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tf:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def test_files_are_zipped_together(tmp_path: Path) -> None:
    form = _form(tmp_path, {"run.sh": b"echo\n", "input.pdb": b"ATOM\n"})
    dest = tmp_path / "input.zip"
    assert build_input_zip(form, dest, limits=LIMITS) == "files"
    assert _names(dest) == {"input.pdb": b"ATOM\n", "run.sh": b"echo\n"}


def test_one_zip_part_is_used_as_it_is(tmp_path: Path) -> None:
    payload = make_zip({"run.sh": "echo\n", "sub/in.txt": "x"})
    form = _form(tmp_path, {"job.zip": payload})
    dest = tmp_path / "input.zip"
    assert build_input_zip(form, dest, limits=LIMITS) == "zip"
    assert dest.read_bytes() == payload


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_one_tar_part_is_unpacked_and_zipped(tmp_path: Path, mode: str) -> None:
    form = _form(tmp_path, {"job.tar": _tar({"run.sh": b"echo\n", "sub/in.txt": b"x"}, mode)})
    dest = tmp_path / "input.zip"
    assert build_input_zip(form, dest, limits=LIMITS) == ("tar" if mode == "w" else "tar.gz")
    assert _names(dest) == {"run.sh": b"echo\n", "sub/in.txt": b"x"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".unpack")] == []


@pytest.mark.parametrize(("files", "message"), [
    ({}, "run.sh does not exist"),
    ({"input.pdb": b"ATOM\n"}, "run.sh does not exist"),
    ({"a.txt": b"1", "b.txt": b"2"}, "run.sh does not exist"),
    ({"job.zip": make_zip({"input.pdb": "x"})}, "run.sh does not exist"),
    ({"job.zip": make_zip({"run.sh": "x", "../evil": "x"})}, "escapes"),
    ({"job.tar": _tar({"run.sh": b"x", "../evil": b"x"})}, "escapes"),
    ({"job.tar": _tar({"input.pdb": b"x"})}, "run.sh does not exist"),
])
def test_refused_inputs(tmp_path: Path, files: dict[str, bytes], message: str) -> None:
    form = _form(tmp_path, files)
    with pytest.raises(archive.ArchiveError, match=message):
        build_input_zip(form, tmp_path / "input.zip", limits=LIMITS)
    assert not (tmp_path / "input.zip").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".unpack")] == []


def test_limits_and_other_entry_points(tmp_path: Path) -> None:
    form = _form(tmp_path, {"main.py": b"print(1)\n", "big": b"x" * 100})
    small = archive.Limits(max_size=50)
    with pytest.raises(archive.ArchiveError, match="more than the limit of 50"):
        build_input_zip(form, tmp_path / "a.zip", limits=small, required="main.py")
    with pytest.raises(archive.ArchiveError, match="more than the limit of 1"):
        build_input_zip(form, tmp_path / "a.zip", limits=archive.Limits(max_entries=1),
                        required=None)
    assert build_input_zip(form, tmp_path / "a.zip", limits=LIMITS, required="main.py") == "files"
