"""Numeric job ids that are never handed out twice, across restarts and deletions.

The job-orchestrator protocol names payloads by unsigned integers the execution host chooses.
Deriving the next one from the jobs in the store alone would hand out an id again once its job
was deleted by retention and the daemon restarted, and an orchestrator still polling the old id
would be shown someone else's job. So the high-water mark is kept in `DB_PATH/numeric-ids`.

It is written in blocks (`BLOCK` ids at a time, atomically: temporary file, fsync, rename), so
a submit rarely costs a write; after a restart the ids left in the last block are skipped.
Every id below `next` was possibly issued; that is what lets the protocol answer `Cleaned`
rather than 404 for the id of a job that is gone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Callable

from jobd.files import fsync_dir

log = logging.getLogger("jobd.counter")

BLOCK = 1000
FILE = "numeric-ids"
LIMIT = 2**32  # the orchestrator keeps ids in a u32


class CounterError(RuntimeError):
    """The counter file is damaged or the id space is used up."""


class NumericIds:
    """Allocates 1, 2, 3 ... skipping ids that are taken; persists a high-water mark."""

    def __init__(self, db_dir: Path, existing: Iterable[str], *, fsync: bool = True) -> None:
        self.path = Path(db_dir) / FILE
        self._fsync = fsync
        stored = self._read()
        highest = max((int(i) for i in existing if i.isdigit() and i.isascii()), default=0)
        self.next = max(stored, highest + 1, 1)
        self._reserved_until = self.next  # ids below this are covered by the file

    def _read(self) -> int:
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return 1
        if not text.isdigit():
            raise CounterError(f"{self.path} should hold one number, not {text[:40]!r}:"
                               " fix it (any number above every id ever issued) or remove it")
        return int(text)

    def allocate(self, taken: Callable[[str], bool] = lambda _: False) -> int:
        """The next id for which `taken` is false (ids used by jobs of other protocols)."""
        while taken(str(self.next)):
            self.next += 1
        value = self.next
        if value >= LIMIT:
            raise CounterError(f"numeric job ids are used up (next would be {value})")
        self.next += 1
        if self.next > self._reserved_until:
            self._write(min(self.next + BLOCK, LIMIT))
        return value

    def issued(self, value: int) -> bool:
        """Whether `value` may have been handed out (by this daemon or an earlier run)."""
        return 1 <= value < self.next

    def _write(self, until: int) -> None:
        tmp = self.path.with_name(f".{FILE}.tmp")
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{until}\n")
            f.flush()
            if self._fsync:
                os.fsync(f.fileno())
        os.replace(tmp, self.path)
        if self._fsync:
            fsync_dir(self.path.parent)
        self._reserved_until = until
        log.debug("numeric ids reserved up to %d", until)
