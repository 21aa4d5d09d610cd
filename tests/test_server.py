"""server.py's log handler, connection.py's date header and keep-alive timeout with the fast
path, in process; the daemon's prompt stop on a signal without the server tick is covered by
test_classic's SIGTERM test."""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import threading
import time
from email.utils import parsedate_to_datetime
from pathlib import Path
from types import SimpleNamespace

import uvicorn

from jobd.app import create_app
from jobd.config import Config
from jobd.connection import DateHeader, connection_class
from jobd.fastpath import FastPath
from jobd.server import DaemonServer, LineHandler, UTCFormatter
from tests.conftest import free_port


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


def test_keep_alive_counts_from_the_last_fast_answer(tmp_path: Path) -> None:
    """uvicorn's keep-alive timeout (1 s here) still closes an idle connection, counted from
    the last answer the fast path gave, not from the first."""
    config = Config.load(overrides={"datapath": tmp_path / "data", "db_path": tmp_path / "db",
                                    "allow_root": True, "access_log": False})
    app = create_app(config)
    fast = FastPath.of(app, config)
    assert fast is not None
    port = free_port()
    server = DaemonServer(uvicorn.Config(
        app, host="127.0.0.1", port=port, loop="asyncio", http=connection_class(30.0, fast),
        lifespan="on", log_config=None, timeout_keep_alive=1), app.state)
    request = b"GET /api/get/nope HTTP/1.1\r\nHost: jobd\r\n\r\n"

    async def client() -> tuple[list[bytes], float, bytes]:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "the server did not start"
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        lines = []
        for _ in range(4):  # 1.8 s of use: beyond the timeout, never idle that long
            writer.write(request)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(65536), 5)
            lines.append(answer.split(b"\r\n", 1)[0])
            await asyncio.sleep(0.6)
        idle_from = time.monotonic() - 0.6
        rest = await asyncio.wait_for(reader.read(65536), 10)
        idle = time.monotonic() - idle_from
        writer.close()
        server.should_exit = True  # and wake the server loop, as handle_exit does
        assert server._wake is not None
        server._wake.set()
        return lines, idle, rest

    async def main() -> tuple[list[bytes], float, bytes]:
        _, result = await asyncio.gather(server.serve(), client())
        return result

    try:
        lines, idle, rest = asyncio.run(main())
    finally:
        gc.unfreeze()  # the server froze what the test process held at its start-up
    assert lines == [b"HTTP/1.1 404 Not Found"] * 4
    assert rest == b"" and 0.9 <= idle < 3.0
    assert app.state.metrics.fast == {"/api/get/{id}": 4}


def test_the_daemon_imports_uvicorn_without_its_command_line() -> None:
    """`jobd` with no arguments skips uvicorn's package `__init__` (its CLI, multiprocessing,
    the reloaders): the server and its lifespan still work with what is left."""
    import subprocess
    import sys

    program = (
        "import sys\n"
        "from jobd.__main__ import uvicorn_without_its_command_line as skip\n"
        "skip()\n"
        "import jobd.server, uvicorn.lifespan.on, uvicorn.lifespan.off\n"
        "import uvicorn\n"
        "assert uvicorn.Config is jobd.server.UvicornConfig.__mro__[1]\n"
        "print(sorted(m for m in ('uvicorn.main', 'multiprocessing', 'uvicorn.supervisors')"
        " if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
