"""The fsync helper process (jobd/syncer.py): its answers, its fallbacks, its lifetime."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Callable

import pytest

from jobd import syncer as syncer_module
from jobd.storage import JournalStorage, Uncertain, _sync_all
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


def helpers_of(pid: int) -> list[int]:
    """The children of `pid` that run the helper program."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                if b"recv_fds" in Path(f"/proc/{child}/cmdline").read_bytes():
                    found.append(int(child))
            except OSError:
                continue  # it ended meanwhile
    return found


def with_syncer(check: Callable[[Syncer], Awaitable[None]], **options: Any) -> None:
    """Run `check` with a new Syncer in a new event loop; its helper is stopped after."""
    async def main() -> None:
        syncer = Syncer(_sync_all, THREADS, **options)
        try:
            await check(syncer)
        finally:
            syncer.close()

    asyncio.run(main())


async def until(predicate: Callable[[], Any], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_rounds_run_in_the_helper_and_report_each_files_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"x" * 4096)
    journal = os.open(tmp_path / "journal", os.O_WRONLY | os.O_CREAT, 0o600)
    not_a_dir = str(data / "below")  # ENOTDIR: a real error, reported for this name only

    async def check(syncer: Syncer) -> None:
        errors = await syncer.sync([str(data), str(tmp_path), str(tmp_path / "gone"),
                                    not_a_dir], journal)
        assert list(errors) == [not_a_dir] and errors[not_a_dir].errno == errno.ENOTDIR
        assert syncer.started == 1 and syncer.pid in helpers_of(os.getpid())
        assert await syncer.sync([], None) == {}  # an empty round still gets its answer
        many = await asyncio.gather(*(syncer.sync([str(data)], journal) for _ in range(50)))
        assert many == [{}] * 50 and syncer.started == 1  # in order, one helper

    try:
        with_syncer(check)
    finally:
        os.close(journal)
    assert helpers_of(os.getpid()) == []  # it exits at the end of its socket and is waited for


def test_a_round_too_large_for_one_message_runs_in_a_thread(tmp_path: Path) -> None:
    names = [str(tmp_path / ("n" * 200 + str(k))) for k in range(MAX_MESSAGE // 200 + 1)]

    async def check(syncer: Syncer) -> None:
        assert await syncer.sync(names, None) == {}  # all gone: no error
        assert syncer.started == 0

    with_syncer(check)


def test_without_an_interpreter_to_run_it_rounds_use_threads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", "")

    async def check(syncer: Syncer) -> None:
        assert await syncer.sync([str(tmp_path)], None) == {}
        assert syncer.started == 0 and syncer.pid is None

    with_syncer(check)


def test_a_helper_that_dies_fails_its_round_as_uncertain_and_the_rest_run_in_threads(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"x")

    async def check(syncer: Syncer) -> None:
        assert await syncer.sync([str(data)], None) == {}
        first = syncer.pid
        assert first is not None
        os.kill(first, signal.SIGSTOP)  # it holds the next rounds unanswered...
        pending = [syncer.sync([str(data)], None) for _ in range(5)]
        await asyncio.sleep(0.05)
        assert not any(p.done() for p in pending)
        os.kill(first, signal.SIGKILL)  # ...and dies
        done = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 10)
        # The round it was on may have had a failed fsync it alone saw: not trusted.
        assert isinstance(done[0], Uncertain) and list(done[0].errors) == [str(data)]
        assert done[1:] == [{}] * 4  # never begun: synced in threads
        assert syncer.pid is None and syncer.deaths == 1
        assert await syncer.sync([str(data)], None) == {}
        assert syncer.started == 2 and syncer.pid not in (None, first)

    with_syncer(check)


def test_after_three_deaths_rounds_use_threads_for_good(tmp_path: Path) -> None:
    async def check(syncer: Syncer) -> None:
        for _ in range(Syncer.DEATHS_TOLERATED):
            assert await syncer.sync([str(tmp_path)], None) == {}
            assert syncer.pid is not None
            os.kill(syncer.pid, signal.SIGKILL)
            await until(lambda: not syncer.running)
        assert syncer.deaths == Syncer.DEATHS_TOLERATED
        assert await syncer.sync([str(tmp_path)], None) == {}
        assert syncer.started == Syncer.DEATHS_TOLERATED and not syncer.running

    with_syncer(check)


def test_the_helper_ignores_the_signals_sent_to_the_whole_group(tmp_path: Path) -> None:
    async def check(syncer: Syncer) -> None:
        assert await syncer.sync([str(tmp_path)], None) == {}
        pid = syncer.pid
        assert pid is not None
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            os.kill(pid, number)  # Ctrl-C, a service manager's stop: jobd decides
        await asyncio.sleep(0.1)
        assert await syncer.sync([str(tmp_path)], None) == {}
        assert syncer.pid == pid and syncer.deaths == 0

    with_syncer(check)


def test_relative_names_are_those_of_jobds_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default DATAPATH is relative: the helper (which runs in /) must sync jobd's files."""
    monkeypatch.chdir(tmp_path)
    Path("plain").write_text("x")

    async def check(syncer: Syncer) -> None:
        errors = await syncer.sync(["plain/below", "plain"], None)
        assert list(errors) == ["plain/below"]  # found from here: ENOTDIR, not "gone"
        assert errors["plain/below"].errno == errno.ENOTDIR
        assert syncer.started == 1

    with_syncer(check)


def test_only_a_directory_may_refuse_its_fsync_and_the_journal_never(tmp_path: Path) -> None:
    reading, writing = os.pipe()  # fsync of a pipe: EINVAL, as a journal on a broken mount

    def check(use_helper: bool) -> Callable[[Syncer], Awaitable[None]]:
        async def check(syncer: Syncer) -> None:
            if not use_helper:
                syncer._unavailable = True
            errors = await syncer.sync(["/proc/self/stat", "/proc"], None)
            assert list(errors) == ["/proc/self/stat"]  # a file: EINVAL counts
            assert errors["/proc/self/stat"].errno == errno.EINVAL
            with pytest.raises(OSError) as caught:
                await syncer.sync([], writing)
            assert caught.value.errno == errno.EINVAL
            assert syncer.started == (1 if use_helper else 0)
        return check

    try:
        with_syncer(check(True))
        with_syncer(check(False))  # the thread path says the same
    finally:
        os.close(reading)
        os.close(writing)


def test_a_store_whose_helper_dies_in_a_round_rewrites_its_state(tmp_path: Path) -> None:
    kept = tmp_path / "kept"
    kept.write_text("x")

    async def main() -> None:
        storage = JournalStorage(tmp_path / "db.json")
        storage.use_syncer()
        try:
            storage.append("jobs", {"1": {"n": 1}}, durable=False)
            await storage.commit()
            syncer = storage.syncer
            assert syncer is not None and syncer.pid is not None
            os.kill(syncer.pid, signal.SIGSTOP)
            storage.append("jobs", {"2": {"n": 2}}, durable=False)
            assert storage.lines > 0
            with_file = asyncio.ensure_future(storage.commit([str(kept)]))
            journal_only = asyncio.ensure_future(storage.commit())
            await asyncio.sleep(0.05)
            os.kill(syncer.pid, signal.SIGKILL)
            with pytest.raises(OSError) as caught:
                await asyncio.wait_for(with_file, 10)
            assert caught.value.errno == errno.EIO  # the file: not known to be on disk
            await asyncio.wait_for(journal_only, 10)  # the state: rewritten and synced
            assert storage.lines == 0  # a snapshot, not the journal's fsync
        finally:
            storage.close()
        assert JournalStorage(tmp_path / "db.json").read()["jobs"]["2"] == {"n": 2}

    asyncio.run(main())


def test_after_a_stop_rounds_run_in_threads(tmp_path: Path) -> None:
    async def check(syncer: Syncer) -> None:
        assert await syncer.sync([str(tmp_path)], None) == {}
        helper = syncer.pid
        assert helper is not None
        await syncer.stop()
        assert syncer.pid is None and helper not in helpers_of(os.getpid())
        assert await syncer.sync([str(tmp_path)], None) == {}
        assert syncer.started == 1 and not syncer.running

    with_syncer(check)


def test_the_helper_stops_when_idle_and_starts_again_with_the_next_round(
        tmp_path: Path) -> None:
    async def check(syncer: Syncer) -> None:
        assert await syncer.sync([str(tmp_path)], None) == {}
        pid = syncer.pid
        assert pid is not None
        await until(lambda: syncer.pid is None)
        assert pid not in helpers_of(os.getpid())
        assert await syncer.sync([str(tmp_path)], None) == {}
        assert syncer.started == 2

    with_syncer(check, idle_seconds=0.3)


def test_a_store_with_a_syncer_commits_through_it(tmp_path: Path) -> None:
    async def main() -> None:
        storage = JournalStorage(tmp_path / "db.json")
        storage.use_syncer()
        try:
            table = {"jobs": {str(k): {"n": k} for k in range(20)}}
            storage.append("jobs", table["jobs"], durable=False)
            await storage.commit([str(tmp_path)])
            assert storage.syncer is not None and storage.syncer.started == 1
        finally:
            storage.close()
        assert JournalStorage(tmp_path / "db.json").read()["jobs"]["19"] == {"n": 19}

    asyncio.run(main())


def daemon_with_helper(daemon_factory: Callable[..., Daemon]) -> tuple[Daemon, int]:
    """A daemon that has run a job, and so has its fsync helper (pid)."""
    daemon = daemon_factory()
    assert daemon.upload("one", {"run.sh": "#!/bin/sh\necho hi\n"}).status_code == 201
    daemon.wait_done("one")
    assert daemon.proc is not None
    pid = daemon.proc.pid
    return daemon, wait_until(lambda: helpers_of(pid) or None, 10, 0.02, "the fsync helper")[0]


def test_the_daemons_helper_is_its_child_and_outlives_no_daemon(
        daemon_factory: Callable[..., Daemon]) -> None:
    daemon, helper = daemon_with_helper(daemon_factory)
    assert daemon.proc is not None
    pid = daemon.proc.pid
    os.kill(helper, signal.SIGKILL)  # a helper killed under it: jobs go on, none lost
    for k in range(5):
        assert daemon.upload(f"after-{k}", {"run.sh": "#!/bin/sh\necho hi\n"}).status_code == 201
    for k in range(5):
        assert daemon.wait_done(f"after-{k}").json()["Status"] == "SUCCESS"
    helper = wait_until(lambda: helpers_of(pid) or None, 10, 0.02, "a new fsync helper")[0]
    daemon.stop(signal.SIGKILL)  # the daemon dies: its helper sees the socket end
    wait_until(lambda: not alive(helper), 10, 0.02, "the helper to exit")


def test_a_daemon_that_stops_stops_its_helper_first(
        daemon_factory: Callable[..., Daemon]) -> None:
    daemon, helper = daemon_with_helper(daemon_factory)
    assert daemon.stop(signal.SIGTERM) == 0
    assert not Path(f"/proc/{helper}").exists()  # exited and reaped before jobd ended
    assert "did not exit" not in daemon.log()
