"""SSE framing of job logs: pure helpers."""

from __future__ import annotations

import json

from jobd import logs


def test_event_holds_whole_lines_and_its_offset() -> None:
    assert logs.event(b"one\ntwo\n", 8) == b"id: 8\ndata: one\ndata: two\n\n"
    assert logs.event(b"a\r\nb\rc", 6) == b"id: 6\ndata: a\ndata: b\ndata: c\n\n"
    assert logs.event(b"\n", 1) == b"id: 1\ndata: \n\n"
    assert logs.event(b"caf\xc3\xa9 \xff\n", 8) == "id: 8\ndata: café \ufffd\n\n".encode()


def test_cut_sends_whole_lines_only() -> None:
    assert logs._cut(b"one\ntwo", final=False) == 4
    assert logs._cut(b"partial", final=False) == 0
    assert logs._cut(b"partial", final=True) == 7
    assert logs._cut(b"progress 10%\rprogress 20%\r", final=False) == 13  # last \r may be \r\n
    assert logs._cut(b"x" * logs.MAX_PENDING, final=False) == logs.MAX_PENDING


def test_end_event() -> None:
    record = {"status": "FAILED", "message": "m", "exit_code": None, "signal": 9}
    text = logs.end_event(record, 12).decode()
    assert text.startswith("event: end\nid: 12\ndata: ") and text.endswith("\n\n")
    assert json.loads(text.split("data: ", 1)[1]) == {"status": "FAILED", "message": "m",
                                                      "exit_code": None, "signal": "SIGKILL"}
    gone = logs.end_event(None, 0).decode()
    assert json.loads(gone.split("data: ", 1)[1]) == {"status": None, "message": "job deleted"}


def test_read_and_sizes(tmp_path) -> None:
    path = tmp_path / "log"
    assert logs.size_of(path) == 0 and logs.read(path, 0) == b""
    path.write_bytes(b"0123456789")
    assert logs.read(path, 3, 4) == b"3456"
    assert b"".join(logs.read_range(path, 2, 10)) == b"23456789"
