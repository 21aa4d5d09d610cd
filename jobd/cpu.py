"""CPU usage of the machine in percent, from the deltas of `/proc/stat`.

The job-orchestrator asks `GET /load` to pick an execution host. Usage is a rate, so it needs
two readings: each call compares `/proc/stat` with the reading of the previous call (if that is
at least `MIN_INTERVAL` old; a more recent one gives the previous answer again). Only the first
call, with nothing to compare to, waits `MIN_INTERVAL` between two readings, asynchronously.
A reading is one small file read: cheap enough to do on the event loop.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

PROC_STAT = Path("/proc/stat")
MIN_INTERVAL = 0.2


def read_times(path: Path = PROC_STAT) -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs, or None where /proc/stat is unavailable."""
    try:
        with open(path, "rb") as f:
            line = f.readline()
    except OSError:
        return None
    fields = line.split()
    if not fields or fields[0] != b"cpu" or len(fields) < 5:
        return None
    # user nice system idle iowait irq softirq steal (guest time is already in user)
    values = [int(v) for v in fields[1:9]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values)
    return total - idle, total


def usage(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """Percent busy between two readings, 0 to 100; None when no time passed."""
    busy = after[0] - before[0]
    total = after[1] - before[1]
    if total <= 0:
        return None
    return round(min(100.0, max(0.0, 100.0 * busy / total)), 1)


class CpuLoad:
    """The current CPU usage, measured between successive calls."""

    def __init__(self, path: Path = PROC_STAT) -> None:
        self._path = path
        self._last: tuple[float, tuple[int, int]] | None = None
        self._value = 0.0

    async def percent(self) -> float:
        now = time.monotonic()
        if self._last is None:
            first = read_times(self._path)
            if first is None:
                return _from_loadavg()
            self._last = (now, first)
            await asyncio.sleep(MIN_INTERVAL)
            now = time.monotonic()
        assert self._last is not None
        then, before = self._last
        if now - then < MIN_INTERVAL:
            return self._value
        after = read_times(self._path)
        if after is None:
            return _from_loadavg()
        measured = usage(before, after)
        self._last = (now, after)
        if measured is not None:
            self._value = measured
        return self._value


def _from_loadavg() -> float:
    """Without /proc/stat: the one-minute load average per CPU, as a percentage."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return 0.0
    return round(min(100.0, 100.0 * load / (os.cpu_count() or 1)), 1)
