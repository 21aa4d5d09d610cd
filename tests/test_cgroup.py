"""Per-job cgroups made, joined and removed off the event loop (cgroup.py, run.py), against
plain directories standing in for cgroupfs: what happens when making, moving or removing
fails. The real controllers are tested in test_cgroup_v2_vm.py."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import subprocess
from pathlib import Path

import pytest

from jobd import run
from jobd.cgroup import CgroupError, CgroupTree
from jobd.resources import Limits


def tree(path: Path, controllers: frozenset[str] = frozenset({"memory", "pids"})) -> CgroupTree:
    return CgroupTree(path, controllers, has_kill=True, io_device=None)


def test_plan_touches_nothing_and_says_whether_it_limits(tmp_path: Path) -> None:
    limited = tree(tmp_path).plan("a", Limits(memory=64 << 20))
    plain = tree(tmp_path).plan("b", Limits())
    assert limited.limited and not plain.limited
    assert ("memory.max", str(64 << 20)) in limited.settings
    assert list(tmp_path.iterdir()) == []


def test_make_replaces_a_stale_cgroup_and_reports_failures(tmp_path: Path) -> None:
    group = tree(tmp_path).plan("a", Limits())
    group.path.mkdir()  # left by a daemon that died
    (group.path / "stale-marker").mkdir()
    with pytest.raises(CgroupError, match="stale cgroup"):
        group.make()  # not empty: cannot be removed (a real cgroup with processes)
    os.rmdir(group.path / "stale-marker")
    group.make()
    assert group.path.is_dir()
    missing = tree(tmp_path / "gone").plan("b", Limits())
    with pytest.raises(CgroupError, match="cannot create"):
        missing.make()


def test_end_waits_for_the_killed_processes(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    group = tree(tmp_path).plan("a", Limits())
    group.make()
    busy = [3]
    real_rmdir = os.rmdir

    def rmdir(path: object) -> None:
        if busy[0]:
            busy[0] -= 1
            raise OSError(errno.EBUSY, "busy")
        real_rmdir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rmdir", rmdir)
    assert group.end() == (0, 0, True) and not group.path.exists()
    group.make()
    busy[0] = 10**6
    assert group.end(wait=0.05) == (0, 0, False)  # `remove` takes over


def test_join_skips_an_ended_job_and_survives_a_failed_make(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.new_event_loop()
    try:
        ended = loop.create_future()
        ended.set_result(0)
        running = loop.create_future()
        group = tree(tmp_path).plan("a", Limits())
        assert run._join(group, os.getpid(), ended) is False
        assert not group.path.exists()  # a job that ended first never gets one
        broken = tree(tmp_path / "gone").plan("b", Limits())
        with caplog.at_level(logging.ERROR):
            assert run._join(broken, os.getpid(), running) is False
        assert "runs without a cgroup" in caplog.text
        # made; the move fails (no cgroup.procs in a plain directory): warned, still True
        assert run._join(group, os.getpid(), running) is True and group.path.is_dir()
    finally:
        loop.close()


def test_wait_cleans_up_after_a_join_that_raised(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> run.Outcome:
        loop = asyncio.get_running_loop()
        popen = subprocess.Popen(["true"], start_new_session=True)
        popen.wait()
        exited = loop.create_future()
        exited.set_result(0)
        group = tree(tmp_path).plan("a", Limits())
        group.make()
        joining = loop.create_future()
        joining.set_exception(RuntimeError("unforeseen"))
        process = run.LocalProcess(popen, exited, group, None, joining)
        return await process.wait()

    with caplog.at_level(logging.ERROR):
        outcome = asyncio.run(scenario())
    assert outcome.exit_code == 0 and "joining its cgroup failed" in caplog.text
    assert not (tmp_path / "job-a").exists()  # removed all the same
