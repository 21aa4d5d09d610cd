"""Percentiles, medians of repeated runs, and how figures are printed."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sample."""
    ordered = sorted(xs)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def ms(seconds: float) -> str:
    if seconds >= 10:
        return f"{seconds:.1f} s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 0.01:
        return f"{seconds * 1e3:.1f} ms"
    if seconds >= 0.001:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} µs"


def mib(n_bytes: float) -> str:
    return f"{n_bytes / (1 << 20):.1f} MiB"


def ratio(a: float, b: float) -> str:
    """a / b as `1.23x`, or `n/a` without a reference."""
    if not b:
        return "n/a"
    return f"{a / b:.2f}x"
