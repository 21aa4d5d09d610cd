"""JobStore: job records in TinyDB plus the in-memory indexes that keep hot paths O(1).

Layout under ``DB_PATH``: ``jobs.json`` (the journal of ``storage.py``, table ``jobs``, the job
id as document id) and ``lock`` (flock held while open, with the holder's pid inside).

Indexes, rebuilt at open, kept in step by every write:
- ``status -> sorted list of seq``: ``ids_with_status`` and ``counts`` cost what they return,
  and ``page`` merges these lists newest first, so a page costs about ``limit`` steps
  (plus the records a label filter skips) whatever the number of jobs;
- ``seq -> id``, in creation order (seqs only grow).

Every record handed out is a deep copy: callers may mutate it freely.
"""

from __future__ import annotations

import asyncio
import bisect
import fcntl
import heapq
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from tinydb.table import Document

from .storage import JournalDB, JournalStorage, JournalTable, StoreError, dumps

if TYPE_CHECKING:
    from .syncer import Syncer

__all__ = ["JobExists", "JobStore", "StoreError", "StoreLocked"]

log = logging.getLogger("jobd.store")

DB_FILE = "jobs.json"
LOCK_FILE = "lock"
TABLE = "jobs"


class StoreLocked(StoreError):
    """Another daemon holds the database lock: two writers would corrupt the journal."""


class JobExists(KeyError):
    """A job with this id is already stored."""


QUEUED = "QUEUED"  # the status whose oldest record `oldest_queued` tracks


def _queued_since(doc: dict) -> float | None:
    """When a QUEUED record began to wait: its ``queued`` time, else ``created``; None for
    other records."""
    if doc.get("status") != QUEUED:
        return None
    when = doc.get("queued") or doc.get("created")
    if isinstance(when, (int, float)) and not isinstance(when, bool):
        return float(when)
    return None


def _stored_size(doc: dict) -> int:
    """Bytes a record accounts for on disk (input.zip plus result.zip)."""
    total = 0
    for key in ("input_size", "output_size"):
        value = doc.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            total += value
    return total


def _has_labels(record: dict, wanted: dict[str, str | None]) -> bool:
    labels = record.get("labels")
    if not isinstance(labels, dict):
        labels = {}
    return all(k in labels and (v is None or labels[k] == v) for k, v in wanted.items())


def _lock(path: Path) -> int:
    """Take the daemon's exclusive flock; the fd holds it until closed."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise StoreLocked(
            f"database {path.parent} is in use: another jobd (pid {holder}) holds the lock"
            f" {path}; stop it, or give this one another DB_PATH"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class JobStore:
    """Job records by id, durable on ``add``, with status and creation-order indexes."""

    def __init__(self, db_dir: Path, *, fsync: bool = True) -> None:
        self.path = Path(db_dir)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = _lock(self.path / LOCK_FILE)
        self._db: JournalDB | None = None
        try:
            self._db = JournalDB(str(self.path / DB_FILE), storage=JournalStorage, fsync=fsync)
            self._table: JournalTable = self._db.table(TABLE)  # type: ignore[assignment]
            self._storage: JournalStorage = self._db.storage  # type: ignore[assignment]
            self._build_indexes()
        except BaseException:
            self.close()
            raise

    def use_syncer(self, watch: Callable[[int], asyncio.Future[int]] | None = None) -> None:
        """Commit rounds in a helper process (JournalStorage.use_syncer)."""
        self._storage.use_syncer(watch)

    @property
    def syncer(self) -> Syncer | None:
        """The fsync helper's driver once a round has used it (jobd/syncer.py), else None."""
        return self._storage.syncer

    async def stop_syncer(self) -> None:
        """Stop the fsync helper, waiting for its exit (JournalStorage.stop_syncer)."""
        await self._storage.stop_syncer()

    def close(self) -> None:
        """Close the database, then release the lock (so no other daemon writes meanwhile)."""
        try:
            if self._db is not None:
                db, self._db = self._db, None
                db.close()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- indexes ---------------------------------------------------------------------------

    def _docs(self) -> dict[str, str]:
        """The live documents as JSON text (see storage.py): decoding one gives a copy."""
        return self._table.documents()

    def _doc(self, job_id: str) -> dict | None:
        """A fresh copy of the record, or None."""
        text = self._docs().get(job_id)
        return None if text is None else json.loads(text)

    def _build_indexes(self) -> None:
        """Index every record; refuse inconsistent ones, give missing or duplicate seqs new ones."""
        ordered: list[tuple[int, str]] = []
        renumber: list[str] = []
        facts: dict[str, tuple[str, int, float | None]] = {}  # id -> status, bytes, waiting
        for job_id, text in self._docs().items():
            doc = json.loads(text)
            facts[job_id] = (doc.get("status"), _stored_size(doc), _queued_since(doc))
            if doc.get("id") != job_id or not isinstance(doc.get("status"), str):
                raise StoreError(
                    f"refusing to start: database file {self.path / DB_FILE} holds a record"
                    f" {job_id!r} whose id is {doc.get('id')!r} and status"
                    f" {doc.get('status')!r}: fix or remove it (format: see jobd/storage.py)"
                )
            seq = doc.get("seq")
            if isinstance(seq, int) and not isinstance(seq, bool):
                ordered.append((seq, job_id))
            else:
                renumber.append(job_id)
        ordered.sort()
        self._id_of: dict[int, str] = {}
        for seq, job_id in ordered:
            if seq in self._id_of:
                renumber.append(job_id)
            else:
                self._id_of[seq] = job_id
        self._next_seq = (ordered[-1][0] + 1) if ordered else 1
        if renumber:
            log.warning("giving %d record(s) without a unique seq a new one: %s",
                        len(renumber), ", ".join(renumber[:10]))
            for job_id in renumber:
                self._table.update({"seq": self._next_seq}, doc_ids=[job_id])
                self._id_of[self._next_seq] = job_id
                self._next_seq += 1
        self._by_status: dict[str, list[int]] = {}
        self._waiting: dict[int, float] = {}  # seq -> since when, of QUEUED records
        self._bytes = 0
        for seq, job_id in self._id_of.items():
            status, size, since = facts[job_id]
            self._by_status.setdefault(status, []).append(seq)
            self._bytes += size
            if since is not None:
                self._waiting[seq] = since

    def _index(self, status: str, seq: int) -> None:
        bisect.insort(self._by_status.setdefault(status, []), seq)

    def _note_waiting(self, seq: int, doc: dict) -> None:
        since = _queued_since(doc)
        if since is None:
            self._waiting.pop(seq, None)
        else:
            self._waiting[seq] = since

    def _unindex(self, status: str, seq: int) -> None:
        seqs = self._by_status[status]
        del seqs[bisect.bisect_left(seqs, seq)]
        if not seqs:
            del self._by_status[status]

    # -- records ---------------------------------------------------------------------------

    def add(self, record: dict, *, durable: bool = True) -> dict:
        """Store a new record with the next seq; on disk (fsync) when this returns, or with
        ``durable=False`` once ``await commit()`` returns."""
        job_id, status = record.get("id"), record.get("status")
        if not isinstance(job_id, str) or not isinstance(status, str):
            raise ValueError("a job record needs a str 'id' and a str 'status'")
        if job_id in self._docs():
            raise JobExists(job_id)
        doc = json.loads(dumps(record))  # what get() will give (a tuple becomes a list...)
        doc["seq"] = seq = self._next_seq
        with self._table.durability(durable):
            self._table.insert(Document(doc, doc_id=job_id))
        self._next_seq += 1
        self._id_of[seq] = job_id
        self._index(status, seq)
        self._note_waiting(seq, doc)
        self._bytes += _stored_size(doc)
        return doc  # the table keeps only its text: this dict is the caller's

    def get(self, job_id: str) -> dict | None:
        """A copy of the record, or None."""
        return self._doc(job_id)

    def update(self, job_id: str, changes: dict, *, durable: bool = True) -> dict:
        """Shallow-merge ``changes``, stamping ``updated``; ``durable=False`` skips the fsync.

        Raises KeyError for an unknown id, ValueError for a change of id or seq or a non-str
        status (the indexes depend on them).
        """
        doc = self._doc(job_id)
        if doc is None:
            raise KeyError(job_id)
        old_status, seq = doc["status"], doc["seq"]
        new_status = changes.get("status", old_status)
        if changes.get("id", job_id) != job_id or changes.get("seq", seq) != seq:
            raise ValueError(f"job {job_id}: id and seq cannot change")
        if not isinstance(new_status, str):
            raise ValueError(f"job {job_id}: status must be a str, not {new_status!r}")
        fields = json.loads(dumps(changes))  # as stored, so the merge below is what get() gives
        fields.setdefault("updated", time.time())
        size_before = _stored_size(doc)
        with self._table.durability(durable):
            self._table.update(fields, doc_ids=[job_id])
        doc.update(fields)  # what the table now holds (TinyDB's update is this merge)
        self._bytes += _stored_size(doc) - size_before
        if new_status != old_status:
            self._unindex(old_status, seq)
            self._index(new_status, seq)
        self._note_waiting(seq, doc)
        return doc

    async def commit(self, files: Iterable[Path] = ()) -> None:
        """Until every write so far, and `files`, are on disk; concurrent callers share one
        round in a worker thread (group commit, see storage.py). StoreError if the journal's
        fsync fails, OSError if one of `files` could not be synced."""
        await self._storage.commit(files)

    def delete(self, job_id: str) -> None:
        """Remove the record (durably); KeyError if there is none."""
        doc = self._doc(job_id)
        if doc is None:
            raise KeyError(job_id)
        status, seq = doc["status"], doc["seq"]
        size = _stored_size(doc)
        self._table.remove(doc_ids=[job_id])
        self._bytes -= size
        del self._id_of[seq]
        self._unindex(status, seq)
        self._waiting.pop(seq, None)

    # -- queries ---------------------------------------------------------------------------

    def ids_with_status(self, status: str) -> list[str]:
        """Ids with this status, oldest first: O(number with that status)."""
        return [self._id_of[seq] for seq in self._by_status.get(status, ())]

    def stored_bytes(self) -> int:
        """Sum of ``input_size`` and ``output_size`` over every record: O(1)."""
        return self._bytes

    def oldest_queued(self) -> float | None:
        """The earliest ``queued`` time (else ``created``) among QUEUED records: O(queued),
        from an index (no record decoded)."""
        return min(self._waiting.values(), default=None)

    def counts(self) -> dict[str, int]:
        """Number of records by status (statuses with none are absent)."""
        return {status: len(seqs) for status, seqs in self._by_status.items()}

    def page(
        self,
        *,
        statuses: Iterable[str] | None = None,
        labels: dict[str, str | None] | None = None,
        cursor: str | None = None,
        limit: int = 50,
        where: Callable[[dict], bool] | None = None,
        where_text: Callable[[str], bool] | None = None,
    ) -> tuple[list[dict], str | None]:
        """Newest first, filtered; returns (records, cursor of the next page or None).

        ``statuses``: keep these (None: all; empty: none). ``labels``: each key must be
        present and, unless its value is None, equal. ``where``: keep records it accepts
        (what the caller may see: ``auth.visible_to(client)``); ``where_text``, if given,
        must hold for the JSON text (``storage.dumps``) of every record ``where`` accepts: it
        rejects others before they are decoded (``auth.visible_text``). ``cursor``: from a
        previous call; it stays valid when records are added or deleted. ValueError for a
        bad cursor or limit.

        Records are kept as text: a record that a substring test on its text rules out is
        never decoded, so a filter that matches few of many records stays cheap.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        try:
            before = None if cursor is None else int(cursor)
        except ValueError:
            raise ValueError(f"invalid cursor {cursor!r}") from None
        if statuses is None:
            names: Iterable[str] = list(self._by_status)
        else:
            names = {statuses} if isinstance(statuses, str) else set(statuses)
        newest_first = []
        for name in names:
            seqs = self._by_status.get(name)
            if seqs:
                end = len(seqs) if before is None else bisect.bisect_left(seqs, before)
                newest_first.append(map(seqs.__getitem__, range(end - 1, -1, -1)))
        docs = self._docs()
        needles = [dumps(key) + ":" + ("" if value is None else dumps(value))
                   for key, value in (labels or {}).items()]  # in the text of any match
        found: list[dict] = []
        for seq in heapq.merge(*newest_first, reverse=True):
            text = docs[self._id_of[seq]]
            if not all(needle in text for needle in needles):
                continue
            if where_text is not None and not where_text(text):
                continue
            doc = json.loads(text)
            if labels and not _has_labels(doc, labels):
                continue
            if where is not None and not where(doc):
                continue
            if len(found) == limit:  # one more match exists: there is a next page
                return found, str(found[-1]["seq"])
            found.append(doc)
        return found, None

    def __len__(self) -> int:
        return len(self._id_of)

    def __iter__(self) -> Iterator[dict]:
        """Copies of every record in creation order (a snapshot of the ids taken first)."""
        for job_id in list(self._id_of.values()):
            doc = self._doc(job_id)
            if doc is not None:
                yield doc
