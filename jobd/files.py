"""Where a job's files live under DATAPATH.

    DATAPATH/<id>/input.zip    the payload as received (kept for restart and crash recovery)
    DATAPATH/<id>/work/        the working directory: what the result zip holds
    DATAPATH/<id>/result.zip   packed once when the job ends
    DATAPATH/<id>/log          stdout and stderr, outside work/ so results stay the job's own
    DATAPATH/<id>/home/        HOME of the job (caches stay out of the result)
    DATAPATH/<id>/tmp/         TMPDIR of the job
    DATAPATH/.incoming/        uploads being received, moved into place once valid
    DATAPATH/.trash/           deleted jobs on their way out
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class JobFiles:
    root: Path

    @property
    def input(self) -> Path:
        return self.root / "input.zip"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def result(self) -> Path:
        return self.root / "result.zip"

    @property
    def log(self) -> Path:
        return self.root / "log"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"


class DataDir:
    """The layout of DATAPATH. Job ids are validated before they get here."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / ".incoming"
        self.trash = root / ".trash"

    def create(self) -> None:
        for path in (self.root, self.incoming, self.trash):
            path.mkdir(parents=True, exist_ok=True)

    def job(self, job_id: str) -> JobFiles:
        return JobFiles(self.root / job_id)

    def new_incoming(self, suffix: str = ".zip") -> Path:
        return self.incoming / f"{uuid.uuid4().hex}{suffix}"

    def job_dirs(self) -> list[str]:
        """Names of the per-job directories present on disk."""
        with os.scandir(self.root) as entries:
            return [e.name for e in entries if not e.name.startswith(".") and e.is_dir()]

    def new_trash(self, job_id: str) -> Path:
        return self.trash / f"{job_id}.{uuid.uuid4().hex[:8]}"


def fsync_dir(path: Path) -> None:
    """Make a rename or create inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(*paths: Path) -> None:
    """Remove files, links or directory trees; nothing where there is none.

    An empty directory, what a job's home and tmp usually are when it ends, costs one rmdir.
    """
    for path in paths:
        try:
            os.rmdir(path)
            continue
        except FileNotFoundError:
            continue
        except NotADirectoryError:  # a file, or a link (rmdir does not follow it)
            _unlink(path)
            continue
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        shutil.rmtree(path)  # never follows links out of the tree


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return  # removed meanwhile: what was asked
