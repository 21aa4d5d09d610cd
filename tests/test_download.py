"""HTTP Range parsing (single ranges)."""

from __future__ import annotations

import pytest

from jobd.download import Unsatisfiable, parse_range


@pytest.mark.parametrize(("header", "size", "expected"), [
    (None, 10, None), ("", 10, None),
    ("bytes=0-0", 10, (0, 0)), ("bytes=2-5", 10, (2, 5)), ("bytes=2-", 10, (2, 9)),
    ("bytes=5-100", 10, (5, 9)), ("bytes=-3", 10, (7, 9)), ("bytes=-30", 10, (0, 9)),
    (" bytes = 1 - 2 ", 10, (1, 2)),
    ("bytes=0-1,4-5", 10, None),  # several ranges: the whole file
    ("bytes=5-2", 10, None), ("items=0-1", 10, None), ("bytes=a-b", 10, None),
    ("bytes=-", 10, None),
])
def test_ranges(header: str | None, size: int, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(("header", "size"), [("bytes=10-", 10), ("bytes=10-20", 10),
                                              ("bytes=-0", 10), ("bytes=0-", 0),
                                              ("bytes=-5", 0)])
def test_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(Unsatisfiable):
        parse_range(header, size)
