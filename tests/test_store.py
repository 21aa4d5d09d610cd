"""JobStore: records, indexes, paging, the lock, persistence across reopen."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jobd import storage as storage_mod
from jobd.store import JobExists, JobStore, StoreError, StoreLocked

ROOT = Path(__file__).resolve().parent.parent
STATUSES = ["QUEUED", "PREPARED", "RUNNING", "SUCCESS", "FAILED", "CANCELLED"]


def record(job_id: str, status: str = "QUEUED", **fields: Any) -> dict:
    """A realistic job record (the store only requires id and status)."""
    base = {
        "id": job_id, "status": status, "message": "job queued", "created": 1700000000.0,
        "started": None, "finished": None, "updated": 1700000000.0, "exit_code": None,
        "signal": None, "attempt": 0, "priority": 0, "labels": {"team": "a"},
        "executor": "local", "protocol": "native",
        "options": {"entry": "run.sh", "args": ["-v"], "timeout": 3600},
        "input_size": 1234, "output_size": 0,
    }
    base.update(fields)
    return base


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    with JobStore(tmp_path / "db", fsync=False) as opened:
        yield opened


def reopen(store: JobStore) -> JobStore:
    store.close()
    return JobStore(store.path, fsync=False)


# -- records ------------------------------------------------------------------------------------

def test_add_get_update_delete(store: JobStore) -> None:
    added = store.add(record("a"))
    assert added["seq"] == 1 and added == {**record("a"), "seq": 1}
    assert store.get("a") == added and store.get("missing") is None
    updated = store.update("a", {"status": "RUNNING", "labels": {"team": "b"}})
    assert updated["status"] == "RUNNING" and updated["labels"] == {"team": "b"}
    assert updated["updated"] > 1700000000.0
    assert store.update("a", {"message": "m", "updated": 5.0})["updated"] == 5.0
    store.delete("a")
    assert store.get("a") is None and len(store) == 0
    with pytest.raises(KeyError):
        store.update("a", {"status": "FAILED"})
    with pytest.raises(KeyError):
        store.delete("a")


def test_records_handed_out_are_copies(store: JobStore) -> None:
    mine = record("a")
    added = store.add(mine)
    mine["labels"]["team"] = "changed"
    added["options"]["args"].append("x")
    store.get("a")["labels"]["team"] = "changed"  # type: ignore[index]
    changes = {"labels": {"team": "b"}}
    store.update("a", changes)
    changes["labels"]["team"] = "changed"
    next(iter(store))["options"]["timeout"] = 0
    store.page()[0][0]["labels"]["team"] = "changed"
    got = store.get("a")
    assert got is not None
    assert got["labels"] == {"team": "b"} and got["options"] == record("a")["options"]
    assert "seq" not in mine


def test_add_refuses_duplicates_and_bad_records(store: JobStore) -> None:
    store.add(record("a"))
    with pytest.raises(JobExists) as info:
        store.add(record("a", "FAILED"))
    assert isinstance(info.value, KeyError)
    assert store.get("a")["status"] == "QUEUED"  # type: ignore[index]
    for bad in ({"status": "QUEUED"}, {"id": "b"}, {"id": 1, "status": "QUEUED"}):
        with pytest.raises(ValueError):
            store.add(bad)
    with pytest.raises(ValueError):
        store.update("a", {"id": "other"})
    with pytest.raises(ValueError):
        store.update("a", {"seq": 99})
    with pytest.raises(ValueError):
        store.update("a", {"status": None})
    assert store.counts() == {"QUEUED": 1} and len(store) == 1


def test_durability(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """add fsyncs before it returns; update(durable=False) does not."""
    with JobStore(tmp_path / "db") as store:
        calls: list[int] = []
        monkeypatch.setattr(storage_mod.os, "fsync", calls.append)
        store.add(record("a"))
        assert len(calls) == 1
        store.update("a", {"status": "RUNNING"}, durable=False)
        assert len(calls) == 1
        store.update("a", {"status": "SUCCESS"})
        store.delete("a")
        assert len(calls) == 3


def test_seq_is_monotonic_across_reopen(store: JobStore) -> None:
    for i in range(5):
        store.add(record(f"j{i}"))
    store.delete("j1")
    store = reopen(store)
    assert store.add(record("new"))["seq"] == 6
    store.delete("new")
    store.delete("j4")
    store = reopen(store)
    assert store.add(record("newer"))["seq"] == 5  # max seq + 1: a deleted newest seq is reused
    assert [r["id"] for r in store] == ["j0", "j2", "j3", "newer"]
    store.close()


def test_indexes_survive_reopen(store: JobStore) -> None:
    for i in range(30):
        store.add(record(f"j{i}"))
    for i in range(0, 30, 3):
        store.update(f"j{i}", {"status": "RUNNING"}, durable=False)
    for i in range(0, 30, 6):
        store.update(f"j{i}", {"status": "SUCCESS"})
    store.delete("j1")
    before = (store.counts(), {s: store.ids_with_status(s) for s in STATUSES}, list(store))
    store = reopen(store)
    after = (store.counts(), {s: store.ids_with_status(s) for s in STATUSES}, list(store))
    assert after == before
    assert store.counts() == {"QUEUED": 19, "RUNNING": 5, "SUCCESS": 5}
    assert store.ids_with_status("SUCCESS") == ["j0", "j6", "j12", "j18", "j24"]
    assert store.ids_with_status("CANCELLED") == []
    store.close()


def test_missing_or_duplicate_seq_is_renumbered(tmp_path: Path) -> None:
    db = tmp_path / "db"
    db.mkdir()
    tables = {"jobs": {"a": record("a", seq=3), "b": record("b"), "c": record("c", seq=3)}}
    (db / "jobs.json").write_text(json.dumps({"jobd_journal": 1, "tables": tables}) + "\n")
    with JobStore(db, fsync=False) as store:
        assert [(r["id"], r["seq"]) for r in store] == [("a", 3), ("b", 4), ("c", 5)]
        assert store.add(record("d"))["seq"] == 6
    with JobStore(db, fsync=False) as store:
        assert [(r["id"], r["seq"]) for r in store] == [("a", 3), ("b", 4), ("c", 5), ("d", 6)]


def test_inconsistent_record_refuses_to_start(tmp_path: Path) -> None:
    db = tmp_path / "db"
    db.mkdir()
    tables = {"jobs": {"a": record("not-a", seq=1)}}
    (db / "jobs.json").write_text(json.dumps({"jobd_journal": 1, "tables": tables}) + "\n")
    with pytest.raises(StoreError, match=r"jobs.json holds a record 'a' whose id is 'not-a'"):
        JobStore(db)


def test_damaged_database_is_reported_and_the_lock_released(tmp_path: Path) -> None:
    db = tmp_path / "db"
    with JobStore(db, fsync=False) as store:
        store.add(record("a"))
        store.add(record("b"))
    path = db / "jobs.json"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b"{oops\n" + lines[2])
    with pytest.raises(StoreError, match=f"database file {path} is damaged at line 2"):
        JobStore(db)
    path.write_bytes(lines[0] + lines[2])  # the operator repairs it
    with JobStore(db) as store:  # the failed open did not keep the lock
        assert [r["id"] for r in store] == ["b"]


# -- the lock -----------------------------------------------------------------------------------

def test_lock_in_the_same_process(tmp_path: Path) -> None:
    first = JobStore(tmp_path / "db", fsync=False)
    with pytest.raises(StoreLocked, match=f"pid {os.getpid()}.* the lock {tmp_path}/db/lock"):
        JobStore(tmp_path / "db", fsync=False)
    first.close()
    JobStore(tmp_path / "db", fsync=False).close()


def test_lock_held_by_another_process(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from jobd.store import JobStore\n"
         "s = JobStore(sys.argv[1]); print('ready', flush=True); sys.stdin.read(); s.close()",
         str(tmp_path / "db")],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        with pytest.raises(StoreLocked) as info:
            JobStore(tmp_path / "db")
        assert f"pid {holder.pid}" in str(info.value)
        assert str(tmp_path / "db" / "lock") in str(info.value)
    finally:
        holder.communicate("", timeout=30)
    assert holder.returncode == 0
    JobStore(tmp_path / "db").close()  # released when the holder exits


# -- paging ---------------------------------------------------------------------------------------

def expected_page(model: dict[str, dict], statuses: Any, labels: Any) -> list[str]:
    """Brute force: every match, newest first."""
    if isinstance(statuses, str):
        statuses = [statuses]
    found = []
    for rec in sorted(model.values(), key=lambda r: -r["seq"]):
        if statuses is not None and rec["status"] not in statuses:
            continue
        have = rec.get("labels") or {}
        if labels and not all(k in have and (v is None or have[k] == v)
                              for k, v in labels.items()):
            continue
        found.append(rec["id"])
    return found


def walk(store: JobStore, limit: int, **filters: Any) -> list[str]:
    """All pages, following cursors."""
    ids: list[str] = []
    cursor = None
    while True:
        items, cursor = store.page(cursor=cursor, limit=limit, **filters)
        assert len(items) <= limit
        ids += [r["id"] for r in items]
        if cursor is None:
            return ids
        assert len(items) == limit


FILTERS = [
    {},
    {"statuses": ["QUEUED"]},
    {"statuses": "FAILED"},
    {"statuses": ["SUCCESS", "FAILED", "CANCELLED"]},
    {"statuses": []},
    {"statuses": ["NOPE"]},
    {"labels": {"team": "b"}},
    {"labels": {"gpu": None}},
    {"labels": {"team": "a", "gpu": "yes"}, "statuses": ["QUEUED", "RUNNING"]},
    {"labels": {"missing": None}},
]


def test_paging_matches_brute_force(store: JobStore) -> None:
    for i in range(120):
        labels = {"team": "ab"[i % 2]}
        if i % 7 == 0:
            labels["gpu"] = "yes" if i % 14 else "no"
        store.add(record(f"j{i:03}", STATUSES[i % 5], labels=labels))
    store.add(record("nolabels", labels=None))
    for i in range(0, 120, 11):
        store.delete(f"j{i:03}")
    model = {r["id"]: r for r in store}
    for filters in FILTERS:
        for limit in (1, 7, 50, 500):
            assert walk(store, limit, **filters) == expected_page(
                model, filters.get("statuses"), filters.get("labels")), (filters, limit)


def test_text_prefilters_change_no_answer(store: JobStore) -> None:
    """Records are filtered on their stored text before they are decoded: the answers are
    those of the decoded records alone, also when the needle appears elsewhere."""
    for i in range(60):
        labels = {"team": "ab"[i % 2], "owner": "alice" if i % 3 else "bob"}
        if i % 5 == 0:
            labels['quo"te'] = "é\u2028"
        store.add({**record(f"j{i:02}", STATUSES[i % 5], labels=labels),
                   "owner": "alice" if i % 4 == 0 else "bob"})

    def alice(rec: dict) -> bool:
        return rec.get("owner") == "alice"

    for labels in (None, {"owner": "alice"}, {'quo"te': "é\u2028"}, {'quo"te': None},
                   {"team": "b", "owner": None}):
        plain = walk(store, 4, labels=labels, where=alice)
        fast = walk(store, 4, labels=labels, where=alice,
                    where_text=lambda text: '"owner":"alice"' in text)
        assert fast == plain, labels
        model = {r["id"]: r for r in store if alice(r)}
        assert plain == expected_page(model, None, labels)


def test_update_returns_what_get_gives(store: JobStore) -> None:
    store.add(record("a"))
    updated = store.update("a", {"args": ("x", 1), "labels": {"k": "v"}})
    assert updated == store.get("a") and updated["args"] == ["x", 1]
    with pytest.raises(ValueError):
        store.update("a", {"bad": float("nan")})
    assert store.get("a") == updated


def test_cursor_survives_changes(store: JobStore) -> None:
    for i in range(10):
        store.add(record(f"j{i}"))
    first, cursor = store.page(limit=3)
    assert [r["id"] for r in first] == ["j9", "j8", "j7"] and cursor == "8"
    store.delete("j7")  # the cursor's own record
    store.add(record("j10"))  # newer records do not shift older pages
    store.update("j6", {"status": "RUNNING"})
    second, cursor = store.page(limit=3, cursor=cursor)
    assert [r["id"] for r in second] == ["j6", "j5", "j4"]
    last, cursor = store.page(limit=10, cursor=cursor)
    assert [r["id"] for r in last] == ["j3", "j2", "j1", "j0"] and cursor is None


def test_page_rejects_bad_arguments(store: JobStore) -> None:
    assert store.page() == ([], None)
    with pytest.raises(ValueError, match="cursor"):
        store.page(cursor="abc")
    with pytest.raises(ValueError, match="limit"):
        store.page(limit=0)


# -- indexes against a plain dict model, through random operations and reopens ------------------

class StoreModel(RuleBasedStateMachine):
    """The store agrees with a dict of records after any sequence of operations."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="jobd-store-"))
        self.store = JobStore(self.dir, fsync=False)
        self.model: dict[str, dict] = {}
        self.next_seq = 1
        self.counter = 0

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir)

    @rule(status=st.sampled_from(STATUSES), team=st.sampled_from("ab"))
    def add(self, status: str, team: str) -> None:
        job_id = f"j{self.counter}"
        self.counter += 1
        added = self.store.add(record(job_id, status, labels={"team": team}))
        assert added["seq"] == self.next_seq
        self.next_seq += 1
        self.model[job_id] = added

    @precondition(lambda self: self.model)
    @rule(data=st.data(), status=st.sampled_from(STATUSES), durable=st.booleans())
    def update(self, data: st.DataObject, status: str, durable: bool) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.model)))
        self.model[job_id] = self.store.update(job_id, {"status": status}, durable=durable)
        assert self.model[job_id]["status"] == status

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def relabel(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.model)))
        team = data.draw(st.sampled_from("abc"))
        self.model[job_id] = self.store.update(job_id, {"labels": {"team": team}})

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.model)))
        self.store.delete(job_id)
        del self.model[job_id]

    @rule()
    def reopen(self) -> None:
        self.store = reopen(self.store)
        self.next_seq = max((r["seq"] for r in self.model.values()), default=0) + 1

    @invariant()
    def agrees(self) -> None:
        assert len(self.store) == len(self.model)
        assert list(self.store) == sorted(self.model.values(), key=lambda r: r["seq"])
        counts: dict[str, int] = {}
        for rec in self.model.values():
            counts[rec["status"]] = counts.get(rec["status"], 0) + 1
        assert self.store.counts() == counts
        for status in STATUSES:
            assert self.store.ids_with_status(status) == [
                r["id"] for r in sorted(self.model.values(), key=lambda r: r["seq"])
                if r["status"] == status]
        for filters in ({}, {"statuses": ["RUNNING", "FAILED"]}, {"labels": {"team": "b"}}):
            assert walk(self.store, 3, **filters) == expected_page(
                self.model, filters.get("statuses"), filters.get("labels"))
        waiting = [float(r.get("queued") or r["created"]) for r in self.model.values()
                   if r["status"] == "QUEUED"]
        assert self.store.oldest_queued() == (min(waiting) if waiting else None)


TestStoreModel = StoreModel.TestCase
TestStoreModel.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_stored_bytes_follow_every_write(tmp_path: Path) -> None:
    with JobStore(tmp_path) as store:
        store.add({"id": "a", "status": "QUEUED", "input_size": 100, "output_size": None})
        store.add({"id": "b", "status": "QUEUED", "input_size": 10})
        assert store.stored_bytes() == 110
        store.update("a", {"status": "SUCCESS", "output_size": 1000})
        assert store.stored_bytes() == 1110
        store.update("a", {"status": "QUEUED", "output_size": None})  # restart
        assert store.stored_bytes() == 110
        store.delete("b")
        assert store.stored_bytes() == 100
    with JobStore(tmp_path) as store:  # rebuilt at open
        assert store.stored_bytes() == 100


def test_oldest_queued_prefers_the_queued_time(tmp_path: Path) -> None:
    with JobStore(tmp_path) as store:
        assert store.oldest_queued() is None
        store.add({"id": "a", "status": "QUEUED", "created": 100.0, "queued": 500.0})
        store.add({"id": "b", "status": "QUEUED", "created": 300.0})
        store.add({"id": "c", "status": "RUNNING", "created": 1.0})
        assert store.oldest_queued() == 300.0
        store.update("b", {"status": "RUNNING"})
        assert store.oldest_queued() == 500.0
