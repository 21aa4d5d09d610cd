"""The disk guard: uploads stop before they fill the disk that holds DATAPATH.

`statvfs` is cheap but not free, and an upload burst asks many times a second, so the answer is
cached for a second; the cache is dropped when jobd frees space itself (retention sweep).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from jobd.resources import human_size

CACHE_SECONDS = 1.0


class DiskGuard:
    """Is there room for an upload under DATAPATH, keeping `floor` free?"""

    def __init__(self, path: Path, floor_bytes: int, floor_percent: float) -> None:
        self.path = path
        self.floor_bytes = floor_bytes
        self.floor_percent = floor_percent
        self._cached: tuple[float, int, int] | None = None

    @property
    def enabled(self) -> bool:
        return self.floor_bytes > 0 or self.floor_percent > 0

    def usage(self) -> tuple[int, int]:
        """(bytes free for jobd, filesystem size), at most a second old."""
        now = time.monotonic()
        if self._cached is None or now - self._cached[0] > CACHE_SECONDS:
            info = os.statvfs(self.path)
            self._cached = (now, info.f_bavail * info.f_frsize, info.f_blocks * info.f_frsize)
        return self._cached[1], self._cached[2]

    def forget(self) -> None:
        self._cached = None

    def floor(self, total: int) -> int:
        return max(self.floor_bytes, int(total * self.floor_percent / 100))

    def problem(self, incoming: int = 0) -> str | None:
        """Why an upload of about `incoming` bytes cannot be taken now, or None."""
        if not self.enabled:
            return None
        free, total = self.usage()
        floor = self.floor(total)
        if free - incoming >= floor:
            return None
        needs = f" for an upload of {human_size(incoming)}" if incoming else ""
        return (f"not enough disk space{needs}: {human_size(free)} free under DATAPATH and "
                f"jobd keeps {human_size(floor)} free (JOBD_MIN_FREE); try again later")
