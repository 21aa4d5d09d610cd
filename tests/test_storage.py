"""JournalStorage + JournalTable: TinyDB semantics, replay, compaction, crash artifacts."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tinydb import Query, TinyDB
from tinydb.storages import MemoryStorage
from tinydb.table import Document

from jobd import storage as storage_mod
from jobd.storage import JournalDB, JournalStorage, StoreError

Q = Query()


def open_db(path: Path, **options: Any) -> JournalDB:
    options.setdefault("fsync", False)
    return JournalDB(str(path), storage=JournalStorage, **options)


def state(table: Any) -> list[tuple[str, dict]]:
    """Documents in table order, ids as strings (stock TinyDB uses ints)."""
    return [(str(d.doc_id), dict(d)) for d in table.all()]


def file_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- the same operations on stock TinyDB (MemoryStorage) and on the journal -----------------

values = st.integers(0, 3)
flat_docs = st.dictionaries(st.sampled_from("abc"), values, max_size=3)
docs = st.builds(lambda d, n: {**d, **({"n": n} if n is not None else {})},
                 flat_docs, st.none() | st.dictionaries(st.sampled_from("xy"), values, max_size=2))
picks = st.lists(st.integers(0, 50), min_size=1, max_size=3, unique=True)
ops = st.one_of(
    st.tuples(st.just("insert"), docs),
    st.tuples(st.just("insert_doc"), docs, st.integers(1, 12)),
    st.tuples(st.just("insert_multiple"), st.lists(docs, max_size=3)),
    st.tuples(st.just("update_all"), flat_docs),
    st.tuples(st.just("update_cond"), flat_docs, values),
    st.tuples(st.just("update_ids"), flat_docs, picks),
    st.tuples(st.just("update_nested"), st.sampled_from("xy"), values, values),
    st.tuples(st.just("remove_cond"), values),
    st.tuples(st.just("remove_ids"), picks),
    st.tuples(st.just("upsert_cond"), docs, values),
    st.tuples(st.just("upsert_doc"), docs, st.integers(1, 12)),
    st.tuples(st.just("truncate")),
    st.tuples(st.just("read"), values, st.integers(1, 12)),
)


def existing(table: Any, chosen: list[int]) -> list[int]:
    """Ids picked among those present, so both databases get the same (valid) ids."""
    ids = sorted(int(d.doc_id) for d in table.all())
    return sorted({ids[i % len(ids)] for i in chosen}) if ids else []


def nested_setter(key: str, value: int, when: int) -> Callable[[dict], None]:
    def update(doc: dict) -> None:  # an in-place change of a nested value
        if doc.get("a") == when:
            if isinstance(doc.get("n"), dict):
                doc["n"][key] = value
            else:
                doc["n"] = {key: value}
    return update


def run(table: Any, op: tuple) -> Any:
    """Apply one operation; the result normalised (ids as str) for comparison."""
    kind, *args = op
    try:
        if kind == "insert":
            result: Any = str(table.insert(args[0]))
        elif kind == "insert_doc":
            result = str(table.insert(Document(args[0], doc_id=args[1])))
        elif kind == "insert_multiple":
            result = [str(i) for i in table.insert_multiple(args[0])]
        elif kind == "update_all":
            result = table.update(args[0])
        elif kind == "update_cond":
            result = table.update(args[0], Q.a == args[1])
        elif kind == "update_ids":
            result = table.update(args[0], doc_ids=existing(table, args[1]))
        elif kind == "update_nested":
            result = table.update(nested_setter(args[0], args[1], args[2]))
        elif kind == "remove_cond":
            result = table.remove(Q.b == args[0])
        elif kind == "remove_ids":
            result = table.remove(doc_ids=existing(table, args[0]))
        elif kind == "upsert_cond":
            result = table.upsert(args[0], Q.c == args[1])
        elif kind == "upsert_doc":
            result = table.upsert(Document(args[0], doc_id=args[1]))
        elif kind == "truncate":
            result = table.truncate()
        else:
            value, doc_id = args
            got = table.get(doc_id=doc_id)
            first = table.get(Q.a == value)
            result = {
                "get": None if got is None else (str(got.doc_id), dict(got)),
                "get_cond": None if first is None else (str(first.doc_id), dict(first)),
                "search": [(str(d.doc_id), dict(d)) for d in table.search(Q.a == value)],
                "count": table.count(Q.b == value),
                "len": len(table),
                "contains": table.contains(doc_id=doc_id),
            }
    except (KeyError, ValueError) as exc:
        return type(exc).__name__
    if isinstance(result, list):
        result = [str(i) if isinstance(i, (int, str)) else i for i in result]
    return result


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(ops, max_size=25))
def test_behaves_like_stock_tinydb(tmp_path: Path, sequence: list[tuple]) -> None:
    path = tmp_path / "db" / "jobs.json"
    if path.parent.exists():
        shutil.rmtree(path.parent)
    stock = TinyDB(storage=MemoryStorage).table("t")
    db = open_db(path, compact_min_lines=7, compact_ratio=1)
    ours = db.table("t")
    for op in sequence:
        assert run(ours, op) == run(stock, op), op
        assert state(ours) == state(stock), op
    db.close()
    reopened = open_db(path)
    assert state(reopened.table("t")) == state(stock)
    reopened.close()


def test_public_api(tmp_path: Path) -> None:
    """The TinyDB calls jobd relies on, with string ids."""
    db = open_db(tmp_path / "jobs.json")
    t = db.table("jobs")
    assert t.insert(Document({"id": "a", "s": "Q"}, doc_id="a")) == "a"
    assert t.insert_multiple([Document({"id": "b", "s": "Q"}, doc_id="b"),
                              {"id": "c"}]) == ["b", "1"]  # integer-like ids for plain dicts
    assert t.get(doc_id="a") == {"id": "a", "s": "Q"} and t.get(doc_id="a").doc_id == "a"
    assert [d.doc_id for d in t.search(Q.s == "Q")] == ["a", "b"]
    assert t.update({"s": "R"}, doc_ids=["a"]) == ["a"]
    assert t.update({"x": 1}, Q.s == "R") == ["a"]
    assert t.count(Q.x == 1) == 1 and len(t) == 3
    assert t.upsert(Document({"s": "S"}, doc_id="b")) == ["b"]
    assert t.upsert(Document({"id": "d"}, doc_id="d")) == ["d"]
    assert t.remove(doc_ids=["1"]) == ["1"]
    assert t.remove(Q.id == "d") == ["d"]
    with pytest.raises(ValueError, match="already exists"):
        t.insert(Document({}, doc_id="a"))
    assert t.insert({"id": "e"}) == "1"  # like stock TinyDB: the largest integer id + 1
    db.close()
    db = open_db(tmp_path / "jobs.json")
    assert state(db.table("jobs")) == [("a", {"id": "a", "s": "R", "x": 1}),
                                       ("b", {"id": "b", "s": "S"}), ("1", {"id": "e"})]
    db.table("jobs").truncate()
    db.close()
    assert open_db(tmp_path / "jobs.json").table("jobs").all() == []


def test_documents_are_kept_as_their_journal_text(tmp_path: Path) -> None:
    """In memory a document is the text its journal line holds (a third of the memory of
    dicts); every read decodes a fresh copy, so changing one changes nothing stored."""
    path = tmp_path / "jobs.json"
    db = open_db(path)
    t = db.table("jobs")
    t.insert(Document({"id": "a", "n": [1, 2], "o": {"k": "é"}}, doc_id="a"))
    t.update({"s": "R"}, doc_ids=["a"])
    storage = db.storage
    assert isinstance(storage, JournalStorage)
    text = storage.documents("jobs")["a"]
    assert text == json.dumps(file_lines(path)[-1]["doc"], separators=(",", ":"))
    read = storage.read()["jobs"]["a"]
    read["n"].append(3)
    got = t.get(doc_id="a")
    assert got is not None
    got["o"]["k"] = "changed"
    assert t.get(doc_id="a") == {"id": "a", "n": [1, 2], "o": {"k": "é"}, "s": "R"}
    storage.compact()
    assert storage.documents("jobs")["a"] == text
    db.close()
    assert JournalStorage(path).documents("jobs") == {"a": text}


def test_a_snapshot_edited_by_hand_loads(tmp_path: Path) -> None:
    """A snapshot line another tool wrote (spaces, other key order, raw UTF-8) is read as
    it is; NaN is refused as jobd never writes it."""
    path = tmp_path / "jobs.json"
    path.write_text('{ "tables" : { "jobs" : { "a" : { "id" : "a", "n" : [ 1 , 2.5 ] ,'
                    ' "s" : "é\\u00e9" } } } , "jobd_journal" : 1 }\n', encoding="utf-8")
    storage = JournalStorage(path, fsync=False)
    assert storage.read() == {"jobs": {"a": {"id": "a", "n": [1, 2.5], "s": "éé"}}}
    storage.close()
    path.write_text('{"jobd_journal":1,"tables":{"jobs":{"a":{"x":NaN}}}}\n')
    with pytest.raises(StoreError, match=r"damaged at line 1.*NaN"):
        JournalStorage(path)


def test_one_write_appends_constant_bytes(tmp_path: Path) -> None:
    """The cost of a write does not depend on how many documents there are."""
    appended = []
    for n in (1, 5000):
        path = tmp_path / f"{n}.json"
        db = open_db(path)
        db.storage.write({"jobs": {str(i): {"id": str(i), "status": "QUEUED"} for i in range(n)}})
        before = path.stat().st_size
        db.table("jobs").update({"status": "RUNNING"}, doc_ids=["0"])
        appended.append(path.stat().st_size - before)
        assert file_lines(path)[-1] == {"t": "jobs", "id": "0",
                                        "doc": {"id": "0", "status": "RUNNING"}}
        db.close()
    assert appended[0] == appended[1] < 100


def test_unchanged_documents_are_not_written(tmp_path: Path) -> None:
    path = tmp_path / "jobs.json"
    db = open_db(path)
    t = db.table("jobs")
    t.insert_multiple([Document({"a": i, "n": {"x": 0}}, doc_id=str(i)) for i in range(10)])
    size = path.stat().st_size
    t.update({"a": 3}, Q.a == 3)  # matches, but changes nothing
    assert path.stat().st_size == size
    t.update(lambda d: d["n"].update(x=1), Q.a == 4)  # in-place change of a nested dict
    assert file_lines(path)[-1] == {"t": "jobs", "id": "4", "doc": {"a": 4, "n": {"x": 1}}}
    assert db.storage.lines == 11
    db.close()


def test_replay_and_format(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "jobs.json"  # parent directories are created
    db = open_db(path)
    t = db.table("jobs")
    t.insert(Document({"id": "a", "labels": {"k": "é"}}, doc_id="a"))
    t.insert(Document({"id": "b"}, doc_id="b"))
    t.remove(doc_ids=["b"])
    db.close()
    assert file_lines(path) == [
        {"jobd_journal": 1, "tables": {}},
        {"t": "jobs", "id": "a", "doc": {"id": "a", "labels": {"k": "é"}}},
        {"t": "jobs", "id": "b", "doc": {"id": "b"}},
        {"t": "jobs", "id": "b", "del": True},
    ]
    storage = JournalStorage(path, fsync=False)
    assert storage.read() == {"jobs": {"a": {"id": "a", "labels": {"k": "é"}}}}
    assert storage.lines == 3
    storage.close()


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed")
def test_documented_jq_reduce_gives_the_state(tmp_path: Path) -> None:
    path = tmp_path / "jobs.json"
    db = open_db(path)
    t = db.table("jobs")
    t.insert_multiple([Document({"i": i}, doc_id=f"j{i}") for i in range(5)])
    t.update({"done": True}, doc_ids=["j1"])
    t.remove(doc_ids=["j2"])
    expected = db.storage.read()
    db.close()
    program = ('reduce inputs as $l ({}; if $l.jobd_journal then $l.tables '
               'elif $l.del then delpaths([[$l.t, $l.id]]) '
               'else setpath([$l.t, $l.id]; $l.doc) end)')
    assert program.replace(" ", "") in storage_mod.__doc__.replace(" ", "").replace("\n", "")
    out = subprocess.run(["jq", "-c", "-n", program, str(path)], capture_output=True,
                         check=True, text=True).stdout
    assert json.loads(out) == expected


def test_append_applies_and_journals(tmp_path: Path) -> None:
    path = tmp_path / "jobs.json"
    storage = JournalStorage(path, fsync=False)
    storage.append("jobs", {"a": {"x": 1}, "b": {"x": 2}})
    storage.append("jobs", {"a": None})
    assert storage.read() == {"jobs": {"b": {"x": 2}}}
    with pytest.raises(TypeError):
        storage.append("jobs", {"c": [1]})  # type: ignore[dict-item]
    storage.close()
    assert JournalStorage(path).read() == {"jobs": {"b": {"x": 2}}}


def test_stock_table_class_works_through_snapshots(tmp_path: Path) -> None:
    """write() keeps JournalStorage a valid TinyDB storage for stock tables."""
    path = tmp_path / "jobs.json"
    db = TinyDB(str(path), storage=JournalStorage, fsync=False)
    db.insert({"a": 1})
    db.table("other").insert({"b": 2})
    db.update({"a": 2})
    db.drop_table("other")
    db.close()
    assert len(file_lines(path)) == 1
    db = TinyDB(str(path), storage=JournalStorage)
    assert db.all() == [{"a": 2}] and db.tables() == {"_default"}
    db.close()


def test_empty_new_table_is_recorded(tmp_path: Path) -> None:
    """Like stock TinyDB, a write to a new table creates it even if nothing matched."""
    db = open_db(tmp_path / "jobs.json")
    db.table("jobs").remove(Q.a == 1)
    assert db.tables() == {"jobs"}
    db.close()
    assert open_db(tmp_path / "jobs.json").tables() == {"jobs"}


# -- durability --------------------------------------------------------------------------------

def test_fsync_only_when_promised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = open_db(tmp_path / "jobs.json", fsync=True)
    t = db.table("jobs")
    t.insert(Document({"s": 1}, doc_id="a"))
    calls = []
    monkeypatch.setattr(storage_mod.os, "fsync", lambda fd: calls.append(fd))
    t.update({"s": 2}, doc_ids=["a"])
    assert len(calls) == 1
    with t.durability(False):
        t.update({"s": 3}, doc_ids=["a"])
    assert len(calls) == 1
    t.update({"s": 4}, doc_ids=["a"])
    assert len(calls) == 2
    db.close()
    assert len(calls) == 2  # everything was synced already
    db = open_db(tmp_path / "jobs.json", fsync=True)
    with db.table("jobs").durability(False):
        db.table("jobs").update({"s": 5}, doc_ids=["a"])
    assert len(calls) == 2
    db.close()
    assert len(calls) == 3  # a clean close syncs what non-durable writes left
    calls.clear()
    db = open_db(tmp_path / "other.json", fsync=False)
    db.table("jobs").insert(Document({}, doc_id="a"))
    db.storage.compact()
    assert calls == []
    db.close()


# -- failures leave memory and file in step -----------------------------------------------------

def test_failed_update_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "jobs.json"
    db = open_db(path)
    t = db.table("jobs")
    t.insert_multiple([Document({"s": 0, "n": {"k": 0}}, doc_id=i) for i in "ab"])
    size = path.stat().st_size
    with pytest.raises(KeyError):
        t.update({"s": 1}, doc_ids=["a", "missing"])
    with pytest.raises(KeyError):
        t.remove(doc_ids=["b", "missing"])
    with pytest.raises(TypeError):
        t.update({"s": object()}, doc_ids=["a"])
    with pytest.raises(ValueError):
        t.update(lambda d: d["n"].update(k=float("nan")), doc_ids=["b"])
    with pytest.raises(TypeError):
        t.insert(Document({"bad": {1, 2}}, doc_id="c"))
    expected = [("a", {"s": 0, "n": {"k": 0}}), ("b", {"s": 0, "n": {"k": 0}})]
    assert state(t) == expected and path.stat().st_size == size
    db.close()
    assert state(open_db(path).table("jobs")) == expected


def test_write_error_is_undone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk-full error half way through a line: the file is cut back, memory restored."""
    path = tmp_path / "jobs.json"
    db = open_db(path)
    t = db.table("jobs")
    t.insert(Document({"s": 0}, doc_id="a"))
    size = path.stat().st_size
    real_write = os.write

    def short_then_full(fd: int, data: bytes) -> int:
        if len(data) > 5:
            return real_write(fd, bytes(data[:5]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage_mod.os, "write", short_then_full)
    with pytest.raises(OSError, match="No space"):
        t.update({"s": 1}, doc_ids=["a"])
    monkeypatch.setattr(storage_mod.os, "write", real_write)
    assert t.get(doc_id="a") == {"s": 0} and path.stat().st_size == size
    t.update({"s": 2}, doc_ids=["a"])  # the storage is still usable
    db.close()
    assert open_db(path).table("jobs").get(doc_id="a") == {"s": 2}


def test_fsync_error_stops_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = open_db(tmp_path / "jobs.json", fsync=True)
    t = db.table("jobs")
    t.insert(Document({"s": 0}, doc_id="a"))

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(storage_mod.os, "fsync", failing)
    with pytest.raises(OSError):
        t.update({"s": 1}, doc_ids=["a"])
    monkeypatch.undo()
    assert t.get(doc_id="a") == {"s": 0}
    with pytest.raises(StoreError, match="restart"):
        t.update({"s": 2}, doc_ids=["a"])
    db.close()


def test_closed_storage_refuses_writes(tmp_path: Path) -> None:
    db = open_db(tmp_path / "jobs.json")
    db.close()
    with pytest.raises(StoreError, match="closed"):
        db.table("jobs").insert(Document({}, doc_id="a"))


# -- compaction ---------------------------------------------------------------------------------

def test_compaction_keeps_the_file_proportional(tmp_path: Path) -> None:
    path = tmp_path / "jobs.json"
    db = open_db(path, compact_min_lines=10, compact_ratio=2)
    t = db.table("jobs")
    t.insert_multiple([Document({"n": 0}, doc_id=str(i)) for i in range(3)])
    for n in range(1, 100):
        t.update({"n": n}, doc_ids=[str(n % 3)])
        assert db.storage.lines <= 10
        assert len(path.read_text().splitlines()) == db.storage.lines + 1
    expected = state(t)
    db.close()
    assert not (tmp_path / "jobs.json.tmp").exists()
    assert state(open_db(path).table("jobs")) == expected


def test_compaction_at_open(tmp_path: Path) -> None:
    path = tmp_path / "jobs.json"
    db = open_db(path)
    for n in range(30):
        db.table("jobs").upsert(Document({"n": n}, doc_id="a"))
    db.close()
    assert len(file_lines(path)) == 31
    storage = JournalStorage(path, fsync=False, compact_min_lines=5)
    assert storage.lines == 0
    assert file_lines(path) == [{"jobd_journal": 1, "tables": {"jobs": {"a": {"n": 29}}}}]
    storage.close()


def test_failed_compaction_is_postponed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "jobs.json"
    storage = JournalStorage(path, fsync=False, compact_min_lines=4)
    real_replace = os.replace

    def full(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage_mod.os, "replace", full)
    for n in range(6):
        storage.append("jobs", {"a": {"n": n}})  # the appends themselves succeed
    assert "compaction" in caplog.text and storage.lines == 6
    assert not (tmp_path / "jobs.json.tmp").exists()
    monkeypatch.setattr(storage_mod.os, "replace", real_replace)
    for n in range(7):
        storage.append("jobs", {"a": {"n": n}})
    assert storage.lines < 6
    storage.close()


# -- crash artifacts and damage -----------------------------------------------------------------

def make_journal(path: Path) -> bytes:
    db = open_db(path)
    t = db.table("jobs")
    t.insert(Document({"id": "a"}, doc_id="a"))
    t.insert(Document({"id": "b"}, doc_id="b"))
    db.close()
    return path.read_bytes()


@pytest.mark.parametrize("tail", [
    b'{"t":"jobs","id":"c","doc":{"i',            # cut short by a crash
    b'{"t":"jobs","id":"c","doc":{}}',            # complete, but the newline never came
    b"\0\0\0\0\0\0\0\0",                          # size grew, data never written
    b"{garbage\n",                                # the last line is not JSON
])
def test_torn_tail_is_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                              tail: bytes) -> None:
    path = tmp_path / "jobs.json"
    good = make_journal(path)
    with path.open("ab") as f:
        f.write(tail)
    with caplog.at_level(logging.WARNING, logger="jobd.store"):
        db = open_db(path)
    assert "torn last line 4" in caplog.text and str(path) in caplog.text
    assert sorted(db.table("jobs").documents()) == ["a", "b"]
    assert path.read_bytes() == good
    db.table("jobs").insert(Document({"id": "c"}, doc_id="c"))  # appends after the good line
    db.close()
    assert sorted(open_db(path).table("jobs").documents()) == ["a", "b", "c"]


@pytest.mark.parametrize(("content", "line", "reason"), [
    (b'{"t":"jobs","id":"c","doc":{"i\n{"t":"jobs","id":"d","del":true}\n', 4, "not JSON"),
    (b"{garbage\n\n", 4, "not JSON"),
    (b'{"t":"jobs","id":"c"}\n', 4, "exactly one of"),
    (b'{"t":"jobs","id":"c","doc":[1]}\n{"t":"jobs","id":"d","del":true}\n', 4, "not an object"),
    (b'[1, 2]\n', 4, "not a JSON object"),
])
def test_damage_refuses_to_start(tmp_path: Path, content: bytes, line: int, reason: str) -> None:
    path = tmp_path / "jobs.json"
    make_journal(path)
    with path.open("ab") as f:
        f.write(content)
    damaged = path.read_bytes()
    with pytest.raises(StoreError) as info:
        open_db(path)
    message = str(info.value)
    assert f"database file {path} is damaged at line {line}" in message
    assert message.startswith("refusing to start") and reason in message
    assert path.read_bytes() == damaged


@pytest.mark.parametrize(("content", "reason"), [
    (b'{"_default": {"1": {"a": 1}}}', "incomplete line"),  # a stock TinyDB file
    (b'{"_default": {"1": {"a": 1}}}\n', "not a jobd journal snapshot"),
    (b'{"jobd_journal": 2, "tables": {}}\n', "journal format 2"),
    (b'{"jobd_journal": 1, "tables": {"jobs": {"a": 1}}}\n', "is not an object"),
    (b"\n\n", "no snapshot line"),
])
def test_foreign_or_bad_snapshot_refuses_to_start(tmp_path: Path, content: bytes,
                                                   reason: str) -> None:
    path = tmp_path / "jobs.json"
    path.write_bytes(content)
    with pytest.raises(StoreError, match="damaged at line 1") as info:
        JournalStorage(path)
    assert reason in str(info.value)
    assert path.read_bytes() == content


def test_empty_file_is_an_empty_database(tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "jobs.json"
    path.touch()
    storage = JournalStorage(path, fsync=False)
    assert storage.read() == {} and "empty" in caplog.text
    storage.close()
    assert file_lines(path) == [{"jobd_journal": 1, "tables": {}}]


def test_stale_snapshot_temp_file_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "jobs.json"
    make_journal(path)
    (tmp_path / "jobs.json.tmp").write_bytes(b'{"jobd_journal":1,"tab')
    db = open_db(path)
    assert not (tmp_path / "jobs.json.tmp").exists()
    assert sorted(db.table("jobs").documents()) == ["a", "b"]
    db.close()


# -- group commit -------------------------------------------------------------------------------

def test_group_commit_shares_one_fsync_off_the_loop(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Writers that commit together share fsyncs, which run in a worker thread."""
    db = open_db(tmp_path / "jobs.json", fsync=True)
    t = db.table("jobs")
    calls: list[str] = []
    real = os.fsync

    def slow_fsync(fd: int) -> None:
        calls.append(threading.current_thread().name)
        time.sleep(0.05)  # while this runs, more writers arrive
        real(fd)

    monkeypatch.setattr(storage_mod.os, "fsync", slow_fsync)

    async def writer(n: int) -> None:
        with t.durability(False):
            t.insert(Document({"n": n}, doc_id=str(n)))
        await db.storage.commit()

    async def main() -> None:
        await asyncio.gather(*(writer(n) for n in range(20)))
        await db.storage.commit()  # nothing new: no fsync

    asyncio.run(main())
    assert 1 <= len(calls) <= 2, calls
    assert threading.main_thread().name not in calls
    monkeypatch.undo()
    db.close()
    assert len(open_db(tmp_path / "jobs.json").table("jobs")) == 20


def test_compaction_goes_on_while_rounds_are_in_flight(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Under unbroken load some round is always syncing: compaction must not wait for a
    quiet moment, and the journal it replaces stays open until those rounds end."""
    path = tmp_path / "jobs.json"
    db = open_db(path, fsync=True, compact_min_lines=20, compact_ratio=1)
    storage = db.storage
    assert isinstance(storage, JournalStorage)
    t = db.table("jobs")
    real = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.01)
        real(fd)  # EBADF here would mean the fd was closed under the round

    monkeypatch.setattr(storage_mod.os, "fsync", slow_fsync)
    snapshots: list[int] = []  # rounds in flight at each compaction
    retired: list[int] = []  # replaced journals still open then
    snapshot = storage._snapshot

    def counting_snapshot(data: Any) -> None:
        snapshots.append(sum(storage._users.values()))
        retired.append(len(storage._retired))
        snapshot(data)

    monkeypatch.setattr(storage, "_snapshot", counting_snapshot)

    async def main() -> None:
        commits = []
        for n in range(200):  # a write every 2 ms, each round's fsync takes 10
            with t.durability(False):
                t.upsert(Document({"w": n % 4, "n": n // 4}, doc_id=str(n % 4)))
            commits.append(asyncio.ensure_future(storage.commit()))
            await asyncio.sleep(0.002)
        await asyncio.gather(*commits)

    asyncio.run(main())
    assert snapshots and max(snapshots) > 0  # compacted with rounds in flight
    assert max(retired) <= 3  # each replaced journal closed once its own rounds ended
    assert not storage._retired and not storage._users
    assert storage.lines <= 40
    monkeypatch.undo()
    expected = state(t)
    db.close()
    assert state(open_db(path).table("jobs")) == expected == [
        (str(w), {"w": w, "n": 49}) for w in range(4)]


def test_group_commit_failure_is_reported_and_stops_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = open_db(tmp_path / "jobs.json", fsync=True)
    t = db.table("jobs")

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(storage_mod.os, "fsync", failing)
    with t.durability(False):
        t.insert(Document({"s": 0}, doc_id="a"))
    with pytest.raises(StoreError, match="fsync failed"):
        asyncio.run(db.storage.commit())
    monkeypatch.undo()
    with pytest.raises(StoreError, match="restart"):
        t.update({"s": 2}, doc_ids=["a"])
    db.close()


def test_commit_without_fsync_returns_at_once(tmp_path: Path) -> None:
    db = open_db(tmp_path / "jobs.json", fsync=False)
    with db.table("jobs").durability(False):
        db.table("jobs").insert(Document({}, doc_id="a"))
    asyncio.run(db.storage.commit())
    db.close()


def test_commit_syncs_files_in_the_same_round(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Files join the round; a file's failure reaches only its committer; a gone file is
    nothing to sync."""
    db = open_db(tmp_path / "jobs.json", fsync=True)
    t = db.table("jobs")
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_bytes(b"x")
    bad.write_bytes(b"y")
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        synced.append(os.path.basename(name))
        if name == str(bad):
            raise OSError(errno.EIO, "I/O error")
        real(fd)

    monkeypatch.setattr(storage_mod.os, "fsync", fsync)

    async def main() -> list[BaseException | None]:
        with t.durability(False):
            t.insert(Document({"n": 1}, doc_id="1"))
        return await asyncio.gather(db.storage.commit([good]), db.storage.commit([bad]),
                                    db.storage.commit([tmp_path / "gone"]),
                                    return_exceptions=True)

    results = asyncio.run(main())
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], OSError) and results[1].errno == errno.EIO
    assert sorted(synced) == ["bad", "good", "jobs.json"]  # one round: files and journal
    monkeypatch.undo()
    t.update({"n": 2}, doc_ids=["1"])  # the journal is fine
    db.close()


def test_a_round_after_a_failed_fsync_fails_too(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel reports a writeback error to one fsync: a round that overlapped a failed one
    must not report success for lines that may have been in the dropped pages."""
    db = open_db(tmp_path / "jobs.json", fsync=True)
    t = db.table("jobs")
    calls = []

    def sync_all(files: list[str], journal: int | None) -> dict[str, OSError]:
        calls.append(journal)
        if len(calls) == 1:
            raise OSError(errno.EIO, "I/O error")
        time.sleep(0.1)  # still running when the first round fails
        return {}

    monkeypatch.setattr(storage_mod, "_sync_all", sync_all)

    async def main() -> list[BaseException | None]:
        async def one(n: int) -> None:
            with t.durability(False):
                t.insert(Document({"n": n}, doc_id=str(n)))
            await db.storage.commit()

        first = asyncio.ensure_future(one(1))
        await asyncio.sleep(0)  # the first round starts
        await asyncio.sleep(0)
        return await asyncio.gather(first, one(2), return_exceptions=True)

    results = asyncio.run(main())
    assert len(calls) == 2
    assert all(isinstance(r, StoreError) for r in results), results
    db.close()
