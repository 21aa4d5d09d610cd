"""A one-line transfer meter for uploads and downloads, drawn on stderr.

Only on a terminal: when stderr is piped or redirected nothing at all is written, so scripts
and log files see no carriage returns. (click's progressbar prints its label once even then,
and needs a known length, which a streamed download does not have.)
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
_BAR = 24


def human_size(n: float) -> str:
    for unit in _UNITS:
        if n < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """Call with the bytes just moved; `close()` draws the last state and ends the line."""

    def __init__(self, label: str, total: int | None = None, stream: TextIO | None = None,
                 *, enabled: bool | None = None, interval: float = 0.1) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _is_tty(self.stream) if enabled is None else enabled
        self.label = label
        self.total = total
        self.done = 0
        self.interval = interval
        self.started = time.monotonic()
        self._drawn = 0.0
        self._width = 0

    def __call__(self, n: int) -> None:
        self.done += n
        if self.enabled:
            now = time.monotonic()
            if now - self._drawn >= self.interval:
                self._drawn = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-6)
        rate = f"{human_size(self.done / elapsed)}/s"
        if self.total:
            fraction = min(1.0, self.done / self.total)
            filled = int(fraction * _BAR)
            bar = "#" * filled + "." * (_BAR - filled)
            text = (f"{self.label} [{bar}] {fraction * 100:3.0f}% "
                    f"{human_size(self.done)} / {human_size(self.total)} {rate}")
        else:
            text = f"{self.label} {human_size(self.done)} {rate}"
        pad = max(0, self._width - len(text))
        self._width = len(text)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real stream
        return False
