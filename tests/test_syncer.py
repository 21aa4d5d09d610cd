"""The fsync helper process (jobd/syncer.py): its answers, its fallbacks, its lifetime."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import sys
from pathlib import Path
from typing import Callable

import pytest

from jobd import syncer as syncer_module
from jobd.storage import JournalStorage, _sync_all
from jobd.syncer import MAX_MESSAGE, Syncer, parse_answer
from tests.conftest import Daemon, alive, wait_until

THREADS = syncer_module.concurrent.futures.ThreadPoolExecutor(max_workers=2)


def test_an_answer_gives_the_files_errors_by_name() -> None:
    assert parse_answer(b"=\0\0", ["a", "b"], None) == {}
    errors = parse_answer(b"=\0\0%d\0" % errno.EIO, ["a", "b"], 7)
    assert list(errors) == ["b"] and errors["b"].errno == errno.EIO
    assert parse_answer(b"=", [], None) == {}


def test_the_journals_error_is_raised() -> None:
    with pytest.raises(OSError) as caught:
        parse_answer(b"=\0\0%d" % errno.ENOSPC, ["a"], 5)
    assert caught.value.errno == errno.ENOSPC


@pytest.mark.parametrize("answer", [b"", b"x\0", b"=\0", b"=\0\0\0", b"=\0abc"])
def test_an_answer_that_does_not_fit_the_round_is_refused(answer: bytes) -> None:
    with pytest.raises(ValueError):
        parse_answer(answer, ["a", "b"], None)


def _helpers() -> list[int]:
    """Our children that run the helper program."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and b"recv_fds" in cmdline:
            found.append(int(entry))
    return found


def test_rounds_run_in_the_helper_and_report_each_files_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"x" * 4096)
    journal = os.open(tmp_path / "journal", os.O_WRONLY | os.O_CREAT, 0o600)
    not_a_dir = str(data / "below")  # ENOTDIR: a real error, reported for this name only

    async def main() -> None:
        syncer = Syncer(_sync_all, THREADS)
        try:
            errors = await syncer.sync([str(data), str(tmp_path), str(tmp_path / "gone"),
                                        not_a_dir], journal)
            assert list(errors) == [not_a_dir] and errors[not_a_dir].errno == errno.ENOTDIR
            assert syncer.started == 1 and syncer.pid in _helpers()
            assert await syncer.sync([], None) == {}  # an empty round still gets its answer
            many = await asyncio.gather(*(syncer.sync([str(data)], journal) for _ in range(50)))
            assert many == [{}] * 50 and syncer.started == 1  # in order, one helper
        finally:
            syncer.close()
        assert _helpers() == []  # it exits at the end of its socket and is waited for

    try:
        asyncio.run(main())
    finally:
        os.close(journal)


def test_a_round_too_large_for_one_message_runs_in_a_thread(tmp_path: Path) -> None:
    names = [str(tmp_path / ("n" * 200 + str(k))) for k in range(MAX_MESSAGE // 200 + 1)]

    async def main() -> None:
        syncer = Syncer(_sync_all, THREADS)
        try:
            assert await syncer.sync(names, None) == {}  # all gone: no error
            assert syncer.started == 0
        finally:
            syncer.close()

    asyncio.run(main())


def test_without_an_interpreter_to_run_it_rounds_use_threads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", "")

    async def main() -> None:
        syncer = Syncer(_sync_all, THREADS)
        assert await syncer.sync([str(tmp_path)], None) == {}
        assert syncer.started == 0 and syncer.pid is None
        syncer.close()

    asyncio.run(main())


def test_a_helper_that_dies_is_replaced_and_no_round_is_lost(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"x")

    async def main() -> None:
        syncer = Syncer(_sync_all, THREADS)
        try:
            assert await syncer.sync([str(data)], None) == {}
            first = syncer.pid
            assert first is not None
            os.kill(first, signal.SIGSTOP)  # it holds the next rounds unanswered...
            pending = [syncer.sync([str(data)], None) for _ in range(5)]
            await asyncio.sleep(0.05)
            assert not any(p.done() for p in pending)
            os.kill(first, signal.SIGKILL)  # ...and dies: they are synced in threads
            assert await asyncio.wait_for(asyncio.gather(*pending), 10) == [{}] * 5
            assert syncer.pid is None
            assert await syncer.sync([str(data)], None) == {}
            assert syncer.started == 2 and syncer.pid not in (None, first)
        finally:
            syncer.close()

    asyncio.run(main())


def test_the_helper_stops_when_idle_and_starts_again_with_the_next_round(
        tmp_path: Path) -> None:
    async def main() -> None:
        syncer = Syncer(_sync_all, THREADS, idle_seconds=0.3)
        try:
            assert await syncer.sync([str(tmp_path)], None) == {}
            pid = syncer.pid
            assert pid is not None
            for _ in range(300):
                if syncer.pid is None:
                    break
                await asyncio.sleep(0.02)
            assert syncer.pid is None
            assert pid not in _helpers()
            assert await syncer.sync([str(tmp_path)], None) == {}
            assert syncer.started == 2
        finally:
            syncer.close()

    asyncio.run(main())


def test_a_store_with_a_syncer_commits_through_it(tmp_path: Path) -> None:
    async def main() -> None:
        storage = JournalStorage(tmp_path / "db.json")
        storage.use_syncer()
        try:
            table = {"jobs": {str(k): {"n": k} for k in range(20)}}
            storage.write(table)
            await storage.commit([str(tmp_path)])
            assert storage.syncer is not None and storage.syncer.started == 1
        finally:
            storage.close()
        assert JournalStorage(tmp_path / "db.json").read()["jobs"]["19"] == {"n": 19}

    asyncio.run(main())


def test_the_daemons_helper_is_its_child_and_outlives_no_daemon(
        daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory()
    assert daemon.upload("one", {"run.sh": "#!/bin/sh\necho hi\n"}).status_code == 201
    daemon.wait_done("one")
    assert daemon.proc is not None

    def helpers() -> list[int]:
        found = []
        for child in Path(f"/proc/{daemon.proc.pid}/task/{daemon.proc.pid}/children") \
                .read_text().split():
            if b"recv_fds" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(int(child))
        return found

    helper = wait_until(lambda: helpers() or None, 10, 0.02, "the fsync helper")[0]
    os.kill(helper, signal.SIGKILL)  # a helper killed under it: jobs go on, none lost
    for k in range(5):
        assert daemon.upload(f"after-{k}", {"run.sh": "#!/bin/sh\necho hi\n"}).status_code == 201
    for k in range(5):
        assert daemon.wait_done(f"after-{k}").json()["Status"] == "SUCCESS"
    helper = wait_until(lambda: helpers() or None, 10, 0.02, "a new fsync helper")[0]
    daemon.stop(signal.SIGKILL)  # the daemon dies: its helper sees the socket end
    wait_until(lambda: not alive(helper), 10, 0.02, "the helper to exit")
