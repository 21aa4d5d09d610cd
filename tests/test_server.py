"""server.py's log handler and connection.py's date header, in process; the daemon's prompt
stop on a signal without the server tick is covered by test_classic's SIGTERM test."""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from email.utils import parsedate_to_datetime
from types import SimpleNamespace

from jobd.connection import DateHeader
from jobd.server import LineHandler, UTCFormatter


def _logger(stream: io.StringIO) -> tuple[logging.Logger, LineHandler]:
    handler = LineHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(f"test-line-handler-{id(stream)}")
    logger.propagate = False
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    return logger, handler


def test_lines_logged_on_the_loop_are_written_together_in_order() -> None:
    stream = io.StringIO()
    logger, handler = _logger(stream)
    logger.info("before the loop")
    assert stream.getvalue() == "before the loop\n"  # not attached: at once

    async def main() -> list[str]:
        handler.attach(asyncio.get_running_loop())
        seen = []
        logger.info("one")
        logger.info("two")
        seen.append(stream.getvalue())  # still waiting for the end of this iteration
        other = threading.Thread(target=logger.info, args=("from a thread",))
        other.start()
        other.join()
        seen.append(stream.getvalue())  # the thread's line pushed the waiting ones out first
        logger.info("three")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        seen.append(stream.getvalue())
        logger.info("four")
        handler.attach(None)  # detaching writes what waits
        seen.append(stream.getvalue())
        return seen

    seen = asyncio.run(main())
    assert seen[0] == "before the loop\n"
    assert seen[1] == "before the loop\none\ntwo\nfrom a thread\n"
    assert seen[2] == seen[1] + "three\n"
    assert seen[3] == seen[2] + "four\n"


def test_flush_writes_what_waits() -> None:
    stream = io.StringIO()
    logger, handler = _logger(stream)

    async def main() -> str:
        handler.attach(asyncio.get_running_loop())
        logger.info("pending")
        handler.flush()  # what logging.shutdown calls at exit
        return stream.getvalue()

    assert asyncio.run(main()) == "pending\n"
    handler.attach(None)


def test_utc_formatter_keeps_milliseconds_per_line() -> None:
    formatter = UTCFormatter("%(asctime)s %(message)s")
    record = logging.LogRecord("x", logging.INFO, "", 0, "m", None, None)
    record.created, record.msecs = 1_700_000_000.25, 250.0
    first = formatter.format(record)
    record.created, record.msecs = 1_700_000_000.75, 750.0
    assert (first, formatter.format(record)) == ("2023-11-14T22:13:20.250Z m",
                                                 "2023-11-14T22:13:20.750Z m")
    record.created, record.msecs = 1_700_000_001.0, 0.0
    assert formatter.format(record) == "2023-11-14T22:13:21.000Z m"


def test_date_header_is_current_and_computed_once_a_second() -> None:
    config = SimpleNamespace(date_header=True, encoded_headers=[(b"server", b"x")])
    dates = DateHeader()
    first = dates.current(config)
    assert first[1] == (b"server", b"x") and first[0][0] == b"date"
    assert abs(parsedate_to_datetime(first[0][1].decode()).timestamp() - time.time()) < 2
    assert dates.current(config) is first or int(time.time()) != dates.second
    assert DateHeader().current(SimpleNamespace(date_header=False, encoded_headers=[])) == []
