"""A job's `artifacts/` directory: the files it declares as its products.

Listed with name, MIME type, size and SHA-256 once when the job ends (while the working
directory still exists), so listing them later costs a record read, not a hash of the files.
They stay in the result zip like every other file of the working directory.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

DIRECTORY = "artifacts"
_CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def collect(work: Path) -> list[dict[str, Any]]:
    """Regular files under work/artifacts (symlinks are not followed), sorted by name."""
    root = work / DIRECTORY
    if not root.is_dir() or root.is_symlink():
        return []
    from jobd import pack  # on first use: keeps an idle daemon's memory down

    found = []
    for info in pack.list_dir(root):
        if info.kind != "file":
            continue
        path = root / info.path
        if not stat.S_ISREG(os.lstat(path).st_mode):
            continue
        found.append({"name": info.path, "path": f"{DIRECTORY}/{info.path}", "size": info.size,
                      "mime": info.mime, "sha256": sha256_of(path)})
    return sorted(found, key=lambda item: item["name"])


def prune_if_empty(work: Path) -> None:
    """Every job gets an artifacts/ directory; one it left empty does not clutter its result."""
    root = work / DIRECTORY
    if root.is_dir() and not root.is_symlink() and not any(root.iterdir()):
        root.rmdir()
