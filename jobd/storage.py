"""A TinyDB storage that appends changed documents to a journal, so a write costs O(1).

TinyDB's JSONStorage rewrites the whole file on every write and ``Table._update_table``
copies the whole table twice per write: both grow with the database. Here the file is a
journal and the table hands the storage only the documents a write changed.

File format (``jobs.json``): JSON lines, UTF-8, every line one JSON object ending in ``\\n``.

Line 1, the snapshot (written whole, atomically: temp file, fsync, rename, fsync dir)::

    {"jobd_journal": 1, "tables": {"jobs": {"<doc id>": {...document...}, ...}}}

Every later line is one change, in the order the changes happened::

    {"t": "jobs", "id": "<doc id>", "doc": {...}}   document set (inserted or replaced whole)
    {"t": "jobs", "id": "<doc id>", "del": true}    document removed

The state is the snapshot with the changes applied in order (a change to a table the snapshot
lacks creates it). With jq::

    head -n1 jobs.json | jq '.tables.jobs | length'          # documents in the snapshot
    jq -c 'select(.id == "my-job")' jobs.json                 # the history of one document
    jq -n 'reduce inputs as $l ({};
             if $l.jobd_journal then $l.tables
             elif $l.del then delpaths([[$l.t, $l.id]])
             else setpath([$l.t, $l.id]; $l.doc) end)' jobs.json   # the current state

Group commit: a write with ``durable=False`` only appends (one ``write``); ``await
storage.commit()`` then returns once everything appended before it is on disk. The commits of
one event-loop iteration share one round, run off the loop so it goes on: in a worker thread,
or in the daemon in a helper process (``use_syncer``, jobd/syncer.py: in CPython each hand-over
to a thread costs the GIL's futex ping-pong, which on a busy daemon cost more than the fsyncs).
Thread rounds overlap; the helper takes its rounds one after another. Jobs stored together
cost one journal fsync and one hand-over.
``commit(files)`` fsyncs those files in the same round, side by side with the journal (a job's
input, for instance): a caller that needs a file on disk before a record names it commits the
file first, then writes the record.

In memory every document is kept as its JSON text (the text the journal holds), a third of
the memory of the same document as Python dicts (about 0.7 against 2 KB for a job record):
at 100,000 records that is the difference between about 100 and 260 MiB. ``read()`` gives
TinyDB views that decode a document when it is read, and a write decodes only the documents
it touches.

Compaction rewrites the snapshot once the change lines exceed
``max(compact_min_lines, compact_ratio * live documents)`` (10,000 and 2 by default), so the
file stays proportional to the live data and the rewrite is amortised O(1) per write.

Crash handling at open: a last line without its ``\\n`` or that is not JSON is what a crash
during an append leaves; it is dropped (the file is truncated to the last good line) with a
warning. Any other bad line is damage: ``StoreError`` names the file, line and reason, and
nothing starts. Documents must be JSON objects with string keys; NaN and infinities are
refused so the file stays valid JSON for jq and other readers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import json
import logging
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, NoReturn

from tinydb import Storage, TinyDB
from tinydb.table import Table

if TYPE_CHECKING:
    from jobd.syncer import Syncer

__all__ = ["FORMAT_VERSION", "JournalDB", "JournalStorage", "JournalTable", "StoreError", "dumps"]

log = logging.getLogger("jobd.store")

FORMAT_VERSION = 1
_ABSENT = object()
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_APPEND_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT


class StoreError(Exception):
    """The database cannot be used as it is: raised instead of starting empty or guessing."""


def dumps(value: Any) -> str:
    """One serialisation for the file, the documents in memory and change detection, so all
    agree (compact separators, ASCII, no NaN)."""
    return _ENCODER.encode(value)


def _write_all(fd: int, data: bytes) -> None:
    """os.write may write less than asked; a journal line must go out whole."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(path: str) -> None:
    """A rename is only durable once the directory entry is on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot fsync a directory
        log.debug("fsync of directory %s failed: %s", path, exc)
    finally:
        os.close(fd)


# fsync waits for the disk (a cache flush per call on most filesystems), and concurrent calls
# share the filesystem journal's commit: a round syncs its files side by side.
_FSYNC_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync")
# The rounds have threads of their own: in the event loop's default pool they would queue
# behind long work (packing a large result), and every 201 with them.
_ROUND_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="commit")


def _fsync_path(path: str) -> OSError | None:
    """fsync a file or directory by name; its error, or None (also when it is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None  # deleted meanwhile: nothing of it to keep
    except OSError as exc:
        return exc
    try:
        os.fsync(fd)
    except OSError as exc:  # a directory that cannot be synced is no error; anything else is
        if exc.errno not in (errno.EINVAL, errno.EROFS) or not stat.S_ISDIR(os.fstat(fd).st_mode):
            return exc
    finally:
        os.close(fd)
    return None


def _sync_all(files: list[str], journal: int | None) -> dict[str, OSError]:
    """A group commit round, in a worker thread: every file and the journal side by side.
    A file's failure belongs to its committer (returned); the journal's is the whole
    store's (raised)."""
    unique = list(dict.fromkeys(files))
    synced = _FSYNC_POOL.map(_fsync_path, unique) if len(unique) > 1 else map(_fsync_path, unique)
    if journal is not None:
        os.fsync(journal)
    return {path: exc for path, exc in zip(unique, synced) if exc is not None}


class Uncertain(OSError):
    """A commit round that ended without knowing whether its fsyncs failed (the fsync helper,
    jobd/syncer.py, died during it), and that cannot be learnt again: the kernel reports a
    writeback error to one fsync only. Its files count as failed (`errors`: EIO each); for
    the journal the store writes and syncs its whole state anew (a snapshot)."""

    def __init__(self, files: list[str]) -> None:
        super().__init__(errno.EIO, "the fsync helper ended during the round")
        self.errors: dict[str, OSError] = {
            name: OSError(errno.EIO, f"{self.strerror}: {name}") for name in files}


def _check_tables(tables: Any) -> str | None:
    """Why ``tables`` is not ``{name: {doc id: document}}`` with str keys, or None if it is."""
    if not isinstance(tables, dict):
        return "tables is not an object"
    for name, table in tables.items():
        if not isinstance(name, str) or not isinstance(table, dict):
            return f"table {name!r} is not an object"
        for doc_id, doc in table.items():
            if not isinstance(doc_id, str) or not isinstance(doc, dict):
                return f"document {doc_id!r} of table {name!r} is not an object with a str id"
    return None


def _as_text(tables: Mapping[str, Mapping[str, dict]]) -> dict[str, dict[str, str]]:
    """``{name: {doc id: document}}`` with each document as its text (TypeError or
    ValueError for one that cannot be stored)."""
    problem = _check_tables(tables)
    if problem:
        raise TypeError(f"cannot store {problem}")
    return {name: {str(doc_id): dumps(doc) for doc_id, doc in table.items()}
            for name, table in tables.items()}


def _check_change(obj: Any) -> str | None:
    """Why ``obj`` is not a change line, or None if it is."""
    if not isinstance(obj, dict):
        return "not a JSON object"
    if not isinstance(obj.get("t"), str) or not isinstance(obj.get("id"), str):
        return 'change without str "t" and "id"'
    if ("doc" in obj) == (obj.get("del") is True):
        return 'change needs exactly one of "doc" or "del": true'
    if "doc" in obj and not isinstance(obj["doc"], dict):
        return '"doc" is not an object'
    return None


class _NotSnapshot(Exception):
    """Line 1 is JSON, but not a jobd journal snapshot (a file jobd did not write)."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)  # refuses NaN and infinities
_SPACE = re.compile(r"[ \t\n\r]*")


class _Cursor:
    """A position in a JSON text, for walking the snapshot's outer objects by hand."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def peek(self) -> str:
        """The next non-space character ("" at the end), not consumed."""
        self.pos = _SPACE.match(self.text, self.pos).end()  # type: ignore[union-attr]
        return self.text[self.pos:self.pos + 1]

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise ValueError(f"expected {char!r} at character {self.pos}")
        self.pos += 1

    def value(self) -> Any:
        return self.value_and_text()[0]

    def value_and_text(self) -> tuple[Any, str]:
        """The value here and the text it was parsed from."""
        self.peek()
        start = self.pos
        value, self.pos = _DECODER.raw_decode(self.text, start)
        return value, self.text[start:self.pos]

    def members(self) -> Iterator[str]:
        """The keys of the object here; after each, the caller consumes its value."""
        self.expect("{")
        if self.peek() == "}":
            self.pos += 1
            return
        while True:
            key = self.value()
            if not isinstance(key, str):
                raise ValueError(f"object key is not a string at character {self.pos}")
            self.expect(":")
            yield key
            if self.peek() == "}":
                self.pos += 1
                return
            self.expect(",")


def _snapshot_tables(line: str) -> dict[str, dict[str, str]]:
    """The tables of snapshot line ``line``, each document as its text (``dumps``).

    Parsed one document at a time: all of them as dicts at once would take three times the
    memory for a moment, and the freed remains would stay scattered over the heap (seen:
    300 MiB resident at 100,000 records instead of 120). ValueError when the line is not
    JSON, _NotSnapshot when it is JSON of something else.
    """
    cursor = _Cursor(line)
    if cursor.peek() != "{":
        json.loads(line)  # ValueError if not JSON at all
        raise _NotSnapshot("first line is not a jobd journal snapshot")
    version: Any = _ABSENT
    tables: dict[str, dict[str, str]] | None = None
    for key in cursor.members():
        if key != "tables":
            value = cursor.value()
            if key == "jobd_journal":
                version = value
            continue
        if cursor.peek() != "{":
            cursor.value()
            raise _NotSnapshot("tables is not an object")
        tables = {}
        for name in cursor.members():
            if cursor.peek() != "{":
                cursor.value()
                raise _NotSnapshot(f"table {name!r} is not an object")
            table = tables[name] = {}
            for doc_id in cursor.members():
                doc, text = cursor.value_and_text()
                if not isinstance(doc, dict):
                    raise _NotSnapshot(f"document {doc_id!r} of table {name!r} is not an "
                                       "object with a str id")
                table[doc_id] = text  # jobd wrote it with dumps; edited by hand, still JSON
    if cursor.peek():
        raise ValueError(f"extra data at character {cursor.pos}")
    if version is _ABSENT:
        raise _NotSnapshot("first line is not a jobd journal snapshot")
    if version != FORMAT_VERSION:
        raise _NotSnapshot(f"journal format {version!r}, this jobd reads format "
                           f"{FORMAT_VERSION}")
    if tables is None:
        raise _NotSnapshot("tables is not an object")
    return tables


class JournalStorage(Storage):
    """Whole state in memory (each document as its JSON text), changes appended to a
    JSON-lines journal (format above).

    ``read()`` returns views that decode each document when it is read: changing what they
    give changes nothing; changes go through ``write``/``append`` or ``JournalTable``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: bool = True,
        compact_min_lines: int = 10_000,
        compact_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self._fsync = fsync
        self._compact_min_lines = compact_min_lines
        self._compact_ratio = compact_ratio
        self._compact_after = 0  # raised after a failed compaction, so it is not retried per write
        self._fd: int | None = None
        self._closed = False
        self._unsynced = False  # non-durable appends not yet covered by an fsync
        self._synced = 0  # bytes of the file known to be on disk
        self._next_round: asyncio.Future[dict[str, OSError]] | None = None  # still gathering
        self._pending: list[str] = []  # files for the next round to fsync
        self._users: dict[int, int] = {}  # journal fd -> rounds in flight that fsync it
        self._retired: set[int] = set()  # fds of replaced journals that rounds still use
        self._generation = 0  # snapshots so far: a round's fd is current while it is unchanged
        self._broken: str | None = None
        self._syncer: Syncer | None = None  # rounds in a helper process (use_syncer)
        self._syncer_options: dict[str, Any] | None = None
        self._data: dict[str, dict[str, str]] = {}  # table -> doc id -> the document's JSON
        self.lines = 0  # change lines after the snapshot
        self.size = 0  # bytes in the file
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        self._dir = directory
        tmp = self.path + ".tmp"
        if os.path.exists(tmp):  # a snapshot interrupted before its rename: the file is intact
            log.info("removing %s left by an interrupted compaction", tmp)
            os.unlink(tmp)
        if self._replay():
            self._fd = os.open(self.path, _APPEND_FLAGS, 0o666)
            self._maybe_compact()
        else:
            self._snapshot({})

    # -- TinyDB's Storage interface ------------------------------------------------------------

    def read(self) -> MutableMapping[str, Mapping[str, dict]]:
        """The live state, O(1): TinyDB reads on every query. Views that decode each document
        as it is read (a fresh dict each time: changing it changes nothing stored)."""
        return _StateView(self._data)

    def write(self, data: Mapping[str, Mapping[str, dict]]) -> None:
        """Replace the whole state with a snapshot: TinyDB's generic, O(n) write."""
        # read(), maybe with tables dropped or put whole, is mostly text already
        self._snapshot(data.tables() if isinstance(data, _StateView) else _as_text(data))

    def documents(self, table: str) -> dict[str, str]:
        """The live ``{doc id: JSON text}`` of ``table``, O(1); read-only by contract."""
        return self._data.get(table, {})

    async def stop_syncer(self) -> None:
        """Let the fsync helper answer its rounds, then stop it and wait for its exit."""
        if self._syncer is not None:
            await self._syncer.stop()

    def use_syncer(self, watch: Callable[[int], asyncio.Future[int]] | None = None,
                   idle_seconds: float = 30.0) -> None:
        """Run the commit rounds in a helper process from now on, threads only as its
        fallback (see jobd/syncer.py: on a busy daemon a thread costs the event loop more
        than the fsyncs it does). `watch` collects the helper's exit (the daemon's reaper)."""
        self._syncer_options = {"watch": watch, "idle_seconds": idle_seconds}

    @property
    def syncer(self) -> Syncer | None:
        """The helper's driver once a round has used it, else None."""
        return self._syncer

    def _round_syncer(self) -> Syncer | None:
        """The helper's driver for a round, made with the first (an idle daemon imports
        none of it); None without `use_syncer`."""
        if self._syncer is None and self._syncer_options is not None:
            from jobd.syncer import Syncer

            self._syncer = Syncer(_sync_all, _ROUND_POOL, **self._syncer_options)
        return self._syncer

    def close(self) -> None:
        """Sync what non-durable appends left in the page cache: a clean stop loses nothing."""
        try:
            if self._syncer is not None:  # normally stopped already (stop_syncer)
                self._syncer.close()
        finally:
            self._closed = True
            self._close_files()

    def _close_files(self) -> None:
        """Close the journal, fsynced first if appends are not yet on disk."""
        for old in list(self._retired):  # rounds still using them fail as closed
            self._close_journal(old)
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self._unsynced and self._fsync and self._broken is None:
                os.fsync(fd)
        finally:
            os.close(fd)

    # -- journal -------------------------------------------------------------------------------

    def append(self, table: str, changes: Mapping[str, dict | None], *,
               durable: bool = True) -> None:
        """Apply ``changes`` (doc id -> document, None = removed) and journal only them.

        ``durable=False`` skips the fsync for updates a crash may lose (the next durable
        write or snapshot covers them).
        """
        entries = []
        for doc_id, doc in changes.items():
            if doc is not None and not isinstance(doc, dict):
                raise TypeError(f"document {doc_id!r} is not a dict")
            entries.append((str(doc_id), None if doc is None else dumps(doc)))
        self._journal(table, entries, durable)
        live = self._data.setdefault(table, {})
        for doc_id, text in entries:
            if text is None:
                live.pop(doc_id, None)
            else:
                live[doc_id] = text
        self._maybe_compact()

    async def commit(self, files: Iterable[str | os.PathLike[str]] = ()) -> None:
        """Until every change appended so far is on disk (group commit, see above).

        `files` (files or directories) are fsynced in the same round, beside the journal, so
        many jobs' files cost one hand-over to a worker thread too. Raises StoreError when
        the journal's fsync fails: the changes may be lost, and writes are refused from then
        on (the kernel may have dropped the pages it reported). OSError when one of `files`
        could not be synced (a file that is gone meanwhile has nothing left to sync).
        """
        if not self._fsync:
            return
        mine = [os.fspath(f) for f in files]
        if not mine and self._synced >= self.size:
            return
        self._check_writable()
        if self._next_round is None:  # every commit of this loop iteration joins it
            loop = asyncio.get_running_loop()
            self._next_round = loop.create_future()
            loop.call_soon(self._start_round)
        round_ = self._next_round
        self._pending.extend(mine)
        errors = await asyncio.shield(round_)
        for path in mine:
            if path in errors:
                raise errors[path]

    def _start_round(self) -> None:
        """Sync the pending files and the journal as it ends now, in a worker thread."""
        done, self._next_round = self._next_round, None
        assert done is not None
        files, self._pending = self._pending, []
        end, fd = self.size, self._fd
        journal = fd if fd is not None and end > self._synced else None
        if journal is not None:
            self._users[journal] = self._users.get(journal, 0) + 1
        generation = self._generation
        syncer = self._round_syncer()
        if syncer is not None:
            work = syncer.sync(files, journal)
        else:
            work = asyncio.get_running_loop().run_in_executor(_ROUND_POOL, _sync_all, files,
                                                              journal)

        def finished(work: asyncio.Future[dict[str, OSError]]) -> None:
            if journal is not None:
                self._users[journal] -= 1
                if not self._users[journal]:
                    del self._users[journal]
                    if journal in self._retired:
                        self._close_journal(journal)
            exc = None if work.cancelled() else work.exception()
            if isinstance(exc, Uncertain) and not self._closed:
                exc = self._after_uncertain(generation)
                if exc is None:  # the state is on disk; the round's files are not known to be
                    done.set_result(Uncertain(files).errors)
                    return
            if work.cancelled() or (exc is not None and self._closed):
                failure = StoreError(f"{self.path} was closed during a commit")
            elif exc is not None or self._broken is not None:
                # Another round's failed fsync may have dropped this round's pages too: the
                # kernel reports a writeback error to one fsync only.
                if exc is not None and self._broken is None:
                    self._broken = f"fsync failed: {exc}"
                    log.error("%s: %s", self.path, self._broken)
                failure = StoreError(f"{self.path}: {self._broken}")
            else:
                if generation == self._generation:  # no snapshot since (it syncs it all)
                    self._synced = max(self._synced, end)
                    self._unsynced = self._synced < self.size
                done.set_result(work.result())
                return
            failure.__cause__ = exc
            done.set_exception(failure)

        work.add_done_callback(finished)

    def _after_uncertain(self, generation: int) -> OSError | None:
        """A round the fsync helper ended in: its journal fsync may have failed unseen, so
        the whole state is written and synced anew (a snapshot), unless one was since. The
        snapshot's error, if any (the store is then broken: the caller says so)."""
        if self._broken is not None:
            return OSError(errno.EIO, self._broken)
        if generation != self._generation:  # a snapshot since has it all, on disk
            return None
        try:
            self._snapshot(self._data)
        except (OSError, ValueError, TypeError) as exc:
            return exc if isinstance(exc, OSError) else OSError(errno.EIO, str(exc))
        log.warning("%s: the fsync helper ended during a commit; the state was rewritten and "
                    "synced instead", self.path)
        return None

    def compact(self) -> None:
        """Rewrite the snapshot now (normally automatic)."""
        self._snapshot(self._data)

    def _journal(self, table: str, entries: list[tuple[str, str | None]], durable: bool) -> None:
        """Append serialised changes; on failure cut the file back so no half line remains."""
        self._check_writable()
        if not entries:
            return
        head = '{"t":' + dumps(table) + ',"id":'
        text = "".join(
            head + dumps(doc_id) + (',"del":true}\n' if doc is None else ',"doc":' + doc + "}\n")
            for doc_id, doc in entries
        )
        data = text.encode("utf-8")
        start = self.size
        step = "write"
        try:
            _write_all(self._fd, data)
            if durable and self._fsync:
                step = "fsync"
                os.fsync(self._fd)
        except BaseException as exc:
            self._undo_append(start, step, exc)
            raise
        self.size = start + len(data)
        self.lines += len(entries)
        if durable and self._fsync:
            self._synced = self.size
        self._unsynced = self._synced < self.size

    def _undo_append(self, start: int, step: str, exc: BaseException) -> None:
        """Truncate a failed append away; if even that fails, refuse further writes."""
        if step == "fsync":  # the kernel may have dropped pages it reported: trust nothing more
            self._broken = f"fsync failed: {exc}"
        try:
            os.ftruncate(self._fd, start)
        except OSError as err:
            self._broken = f"could not truncate after a failed {step}: {err}"
        if self._broken:
            log.error("%s: %s", self.path, self._broken)

    def _check_writable(self) -> None:
        if self._broken is not None:
            raise StoreError(f"{self.path}: writes disabled after an earlier failure"
                             f" ({self._broken}); restart jobd to reload the database")
        if self._closed:
            raise StoreError(f"{self.path} is closed")

    def _threshold(self) -> float:
        live = sum(len(table) for table in self._data.values())
        return max(self._compact_min_lines, self._compact_ratio * live, self._compact_after)

    def _maybe_compact(self) -> None:
        """Snapshot when the journal outgrows the live data; a failure only postpones it."""
        if self.lines <= self._threshold() or self._broken is not None:
            return
        try:
            self._snapshot(self._data)
        except (OSError, ValueError, TypeError) as exc:
            self._compact_after = 2 * self.lines
            log.warning("compaction of %s failed, retrying after %d lines: %s",
                        self.path, self._compact_after, exc)
        else:
            self._compact_after = 0

    def _snapshot(self, data: dict[str, dict[str, str]]) -> None:
        """Write ``data`` (documents as JSON text) as a fresh one-line file and swap it in
        atomically."""
        self._check_writable()
        tables = ",".join(
            dumps(name) + ":{" + ",".join(dumps(i) + ":" + doc for i, doc in table.items()) + "}"
            for name, table in data.items())
        text = f'{{"jobd_journal":{FORMAT_VERSION},"tables":{{{tables}}}}}\n'
        payload = text.encode("utf-8")
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            try:
                _write_all(fd, payload)
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        try:
            if self._fsync:
                _fsync_dir(self._dir)
            old, self._fd = self._fd, os.open(self.path, _APPEND_FLAGS, 0o666)
        except OSError as exc:  # the new file is in place but we cannot append to it
            self._broken = f"could not reopen after a snapshot: {exc}"
            raise
        if old is not None:
            self._retire(old)
        self._data = data
        self._generation += 1
        self.lines = 0
        self.size = self._synced = len(payload)
        self._unsynced = False

    def _retire(self, fd: int) -> None:
        """A replaced journal's fd: closed now, or once the rounds that fsync it have ended
        (closed under them, its number could go to another file meanwhile). Their changes
        are in the snapshot, which is on disk already."""
        if self._users.get(fd):
            self._retired.add(fd)
        else:
            self._close_journal(fd)

    def _close_journal(self, fd: int) -> None:
        self._retired.discard(fd)
        try:
            os.close(fd)
        except OSError as exc:  # its data is in the snapshot: nothing is lost
            log.warning("%s: closing a replaced journal failed: %s", self.path, exc)

    def _replay(self) -> bool:
        """Load snapshot + changes; False if there is no file yet. Drops a torn last line."""
        if not os.path.exists(self.path):
            return False
        data: dict[str, dict[str, str]] | None = None
        lines = offset = lineno = 0
        bad: tuple[int, int, str] | None = None  # (line, byte offset, reason) of a bad line
        with open(self.path, "rb") as f:
            for raw in f:
                if bad is not None:  # a bad line with more after it: damage, not a torn tail
                    self._damaged(*bad)
                lineno += 1
                start, offset = offset, offset + len(raw)
                if not raw.endswith(b"\n"):
                    bad = (lineno, start, "incomplete line (no newline)")
                    continue
                if not raw.strip():
                    continue
                try:
                    if data is None:
                        data = _snapshot_tables(raw.decode("utf-8"))
                        continue
                    obj = json.loads(raw)
                except _NotSnapshot as exc:
                    self._damaged(lineno, 0, str(exc))
                except ValueError as exc:
                    bad = (lineno, start, f"not JSON ({exc})")
                    continue
                problem = _check_change(obj)
                if problem:
                    self._damaged(lineno, start, problem)
                table = data.setdefault(obj["t"], {})
                if "doc" in obj:
                    table[obj["id"]] = self._text(obj["doc"], lineno, start)
                else:
                    table.pop(obj["id"], None)
                lines += 1
        if data is None:  # a snapshot is written whole, so a bad first line is damage
            if bad is not None or offset:
                self._damaged(*(bad or (1, 0, "no snapshot line")))
            log.warning("%s is empty: starting with an empty database", self.path)
            return False
        if bad is not None:
            self._drop_tail(*bad, end=offset)
        self._data = data
        self.lines = lines
        self.size = self._synced = os.path.getsize(self.path)
        return True

    def _text(self, doc: dict, lineno: int, offset: int) -> str:
        """A document read from the file, as the text it is kept as."""
        try:
            return dumps(doc)
        except ValueError as exc:  # NaN or an infinity: not written by jobd
            self._damaged(lineno, offset, f"document is not valid JSON for jobd ({exc})")

    def _damaged(self, lineno: int, offset: int, reason: str) -> NoReturn:
        hint = "restore it from a backup"
        if offset:
            hint += (f", or truncate it to {offset} bytes to keep the lines before line {lineno}"
                     " (the changes after it are lost)")
        raise StoreError(f"refusing to start: database file {self.path} is damaged at line"
                         f" {lineno}: {reason}; {hint}")

    def _drop_tail(self, lineno: int, start: int, reason: str, *, end: int) -> None:
        """A crash during an append leaves a partial last line: cut it off and go on."""
        log.warning(
            "%s: dropping torn last line %d (%d bytes, %s), left by a crash during a write",
            self.path, lineno, end - start, reason,
        )
        with open(self.path, "r+b") as f:
            f.truncate(start)
            if self._fsync:
                os.fsync(f.fileno())


class _Tracked(MutableMapping):
    """The live table (documents as JSON text), seen as dicts by one TinyDB write.

    TinyDB's updaters mutate the table they get (set, pop, clear, and in-place updates of
    documents fetched with ``[]``): a fetched document is decoded once and kept here until
    ``changes`` encodes it again, so only what actually changed is journaled, and
    ``rollback`` can undo a write that failed half way.
    """

    def __init__(self, live: dict[str, str]) -> None:
        self._live = live
        self._orig: dict[str, Any] = {}  # id -> JSON text before this write, or _ABSENT
        self._docs: dict[str, dict] = {}  # id -> the document as this write sees it

    def _remember(self, doc_id: str) -> None:
        if doc_id not in self._orig:
            self._orig[doc_id] = self._live.get(doc_id, _ABSENT)

    def __getitem__(self, key: Any) -> dict:
        doc_id = str(key)
        doc = self._docs.get(doc_id)
        if doc is None:
            text = self._live[doc_id]
            self._remember(doc_id)
            doc = self._docs[doc_id] = json.loads(text)
        return doc

    def __setitem__(self, key: Any, value: dict) -> None:
        if not isinstance(value, dict):
            raise TypeError(f"document {key!r} is not a dict")
        doc_id = str(key)
        self._remember(doc_id)
        self._live[doc_id] = dumps(value)  # present (and valid JSON) from now on
        self._docs[doc_id] = value  # encoded again by `changes`: it may still change

    def __delitem__(self, key: Any) -> None:
        doc_id = str(key)
        if doc_id not in self._live:
            raise KeyError(key)
        self._remember(doc_id)
        del self._live[doc_id]
        self._docs.pop(doc_id, None)

    def pop(self, key: Any, *default: Any) -> Any:
        doc_id = str(key)
        if doc_id not in self._live:
            if default:
                return default[0]
            raise KeyError(key)
        doc = self[doc_id]
        del self[doc_id]
        return doc

    def clear(self) -> None:
        for doc_id in self._live:
            self._remember(doc_id)
        self._live.clear()
        self._docs.clear()

    def __contains__(self, key: object) -> bool:
        return str(key) in self._live

    def __iter__(self) -> Iterator[str]:
        return iter(self._live)

    def __len__(self) -> int:
        return len(self._live)

    def changes(self) -> list[tuple[str, str | None]]:
        """(id, JSON text or None for removed) of the documents that differ from before;
        the live table holds the new texts from now on."""
        out = []
        for doc_id, orig in self._orig.items():
            if doc_id not in self._live:
                if orig is not _ABSENT:
                    out.append((doc_id, None))
                continue
            text = dumps(self._docs[doc_id]) if doc_id in self._docs else self._live[doc_id]
            self._live[doc_id] = text
            if text != orig:
                out.append((doc_id, text))
        return out

    def rollback(self) -> None:
        """Put every touched document back as it was."""
        for doc_id, orig in self._orig.items():
            if orig is _ABSENT:
                self._live.pop(doc_id, None)
            else:
                self._live[doc_id] = orig


class _TableView(Mapping):
    """A table of JSON texts seen as ``{doc id: dict}``, each decoded when read."""

    def __init__(self, raw: dict[str, str]) -> None:
        self.raw = raw

    def __getitem__(self, key: str) -> dict:
        return json.loads(self.raw[key])

    def __contains__(self, key: object) -> bool:
        return key in self.raw

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)


class _StateView(MutableMapping):
    """What ``JournalStorage.read()`` gives TinyDB: its tables as `_TableView`s. TinyDB's
    generic writes change this (drop a table, put one whole) and hand it to ``write``."""

    def __init__(self, raw: dict[str, dict[str, str]]) -> None:
        self.raw = raw
        self._changed: dict[str, Mapping[str, dict] | None] = {}  # name -> table, None: dropped

    def __getitem__(self, name: str) -> Mapping[str, dict]:
        if name in self._changed:
            table = self._changed[name]
            if table is None:
                raise KeyError(name)
            return table
        return _TableView(self.raw[name])

    def __setitem__(self, name: str, table: Mapping[str, dict]) -> None:
        self._changed[name] = table

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        self._changed[name] = None

    def __iter__(self) -> Iterator[str]:
        yield from (name for name in self.raw if name not in self._changed)
        yield from (name for name, table in self._changed.items() if table is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def tables(self) -> dict[str, dict[str, str]]:
        """The state with the changes made here, documents as JSON text (TypeError or
        ValueError for a document that cannot be stored)."""
        out = {name: table for name, table in self.raw.items() if name not in self._changed}
        for name, table in self._changed.items():
            if table is None:
                continue
            out[name] = table.raw if isinstance(table, _TableView) else \
                _as_text({name: table})[name]
        return out


class JournalTable(Table):
    """A TinyDB table whose writes touch only the changed documents (with JournalStorage).

    Document ids are strings (jobd uses the job id). Reads decode the stored text, so each
    result is a copy of its own; do not write while iterating the table itself (use
    ``all()``). ``documents()`` needs JournalStorage. A write is all-or-nothing in
    memory: if it fails, the documents it touched are restored. Writes touching several
    documents append one line each, in one ``write``: a crash may keep only a prefix. With
    any other storage the stock (whole-table) write path is used.
    """

    document_id_class = str

    def __init__(self, storage: Storage, name: str, *args: Any, **kwargs: Any) -> None:
        self._durable = True
        super().__init__(storage, name, *args, **kwargs)

    @contextmanager
    def durability(self, durable: bool) -> Iterator[None]:
        """Writes inside skip the fsync when ``durable`` is False (TinyDB's API has no flag)."""
        previous, self._durable = self._durable, durable
        try:
            yield
        finally:
            self._durable = previous

    def documents(self) -> dict[str, str]:
        """The live ``{doc id: JSON text}`` dict, O(1); read-only by contract (decode a
        document with ``json.loads`` to read it)."""
        if not isinstance(self._storage, JournalStorage):
            raise TypeError("documents() needs JournalStorage, which keeps documents as text")
        return self._storage.documents(self.name)

    def _read_table(self) -> Mapping[str, dict]:
        return (self._storage.read() or {}).get(self.name, {})

    def _get_next_id(self) -> str:
        """Next free integer id, as a string, for inserts without a ``Document`` id."""
        if self._next_id is None:
            numbers = [int(k) for k in self._read_table() if k.isascii() and k.isdigit()]
            self._next_id = max(numbers, default=0) + 1
        next_id = self._next_id
        self._next_id = next_id + 1
        return str(next_id)

    def _update_table(self, updater: Callable[[dict], None]) -> None:
        """Run ``updater`` on the live table in place and journal only what it changed."""
        storage = self._storage
        if not isinstance(storage, JournalStorage):
            super()._update_table(updater)
            return
        data = storage._data
        created = self.name not in data
        live = data.setdefault(self.name, {})
        tracked = _Tracked(live)
        try:
            updater(tracked)
            entries = tracked.changes()
            if entries:
                storage._journal(self.name, entries, self._durable)
            elif created:  # an empty new table: only a snapshot can record it
                storage._snapshot(data)
        except BaseException:
            tracked.rollback()
            if created:
                data.pop(self.name, None)
            raise
        finally:
            self.clear_cache()
        storage._maybe_compact()


class JournalDB(TinyDB):
    """TinyDB with JournalStorage and JournalTable, the pair that makes writes O(1)."""

    table_class = JournalTable
    default_storage_class = JournalStorage
