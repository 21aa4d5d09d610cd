"""Execution control against the built zipapp: slots, priority, queue cap, timeouts, limits,
users, environment, crash leftovers, disk guard. Real processes and signals."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import json
import logging
import os
import signal
import subprocess
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from jobd import job, storage
from jobd import manager as manager_mod
from jobd.cgroup import CgroupTree, JobCgroup, block_device, family_in, own_cgroup, tree_name
from jobd.config import Config
from jobd.manager import JobManager, Rejected
from jobd.reaper import Reaper
from jobd.resources import LimitError, Limits
from jobd.run import LocalExecutor
from jobd.store import JobStore
from tests.conftest import (
    Daemon,
    alive,
    make_zip,
    python39,
    read_events,
    report,
    result_files,
    wait_until,
)

IS_ROOT = os.geteuid() == 0


@contextlib.asynccontextmanager
async def running_manager(config: Config, *, slots: int | None = None
                          ) -> AsyncIterator[JobManager]:
    """A started JobManager on `config` (no HTTP), stopped and closed afterwards."""
    store = JobStore(config.db_path, fsync=config.fsync)
    reaper = Reaper(adopt_orphans=False)
    reaper.start()
    manager = JobManager(config, store, reaper)
    if slots is not None:
        manager.scheduler.slots = slots
    await manager.start()
    try:
        yield manager
    finally:
        await manager.stop()
        await reaper.stop()
        store.close()
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (user switching, cgroups)")


def start(factory: Callable[..., Daemon], where: Path, **env: str) -> Daemon:
    """A daemon with jobd's default user policy (one uid per job when root)."""
    return factory(workdir=where, JOBD_ALLOW_ROOT="false", **env)


def most_at_once(events: list[tuple[str, str, int, float, int]]) -> int:
    """The largest number of jobs between their start and end reports at any moment."""
    points = sorted((when, 0 if kind == "end" else 1) for kind, _, _, when, _ in events)
    running = peak = 0
    for _, is_start in points:
        running += 1 if is_start else -1
        peak = max(peak, running)
    return peak


def cgroups_active(daemon: Daemon) -> bool:
    return "setrlimit + cgroup v2" in daemon.log()


def controllers(daemon: Daemon) -> list[str]:
    """The cgroup controllers the daemon's start-up line names."""
    log = daemon.log()
    if "(controllers: " not in log:
        return []
    return log.split("(controllers: ", 1)[1].split(";", 1)[0].split()


# -- slots, priority, queue cap ---------------------------------------------------------------


def test_slots_hold_under_50_concurrent_uploads(daemon_factory, open_dir: Path) -> None:
    shared = open_dir / "shared"
    daemon = start(daemon_factory, open_dir / "d", JOBD_SLOTS="3")
    script = report(shared, "start") + "sleep 0.3\n" + report(shared, "end")

    def submit(n: int) -> int:
        return daemon.upload(f"s{n}", {"run.sh": script}).status_code

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(submit, range(50)))
    assert codes == [201] * 50
    for n in range(50):
        assert daemon.wait_done(f"s{n}", timeout=120).json()["Status"] == "SUCCESS"
    events = read_events(shared)
    starts = [e for e in events if e[0] == "start"]
    assert sorted(e[1] for e in starts) == sorted(f"s{n}" for n in range(50))  # each once
    assert most_at_once(events) == 3
    if IS_ROOT:  # jobs running at the same time never share a uid
        spans = {e[1]: [e[3], None, e[4]] for e in starts}
        for kind, job_id, _, when, _ in events:
            if kind == "end":
                spans[job_id][1] = when
        for a, (a0, a1, a_uid) in spans.items():
            for b, (b0, b1, b_uid) in spans.items():
                if a < b and a0 < b1 and b0 < a1:
                    assert a_uid != b_uid, (a, b)


def test_priority_then_age_decides_who_starts(daemon_factory, open_dir: Path) -> None:
    shared = open_dir / "shared"
    gate = shared / "gate"
    daemon = start(daemon_factory, open_dir / "d", JOBD_SLOTS="1")
    blocker = report(shared, "start") + f"while [ ! -e {gate} ]; do sleep 0.02; done\n"
    assert daemon.upload("blocker", {"run.sh": blocker}).status_code == 201
    wait_until(lambda: read_events(shared), what="the blocker to start")
    job = {"run.sh": report(shared, "start")}
    for job_id, priority in [("low1", None), ("high", 10), ("low2", 0), ("mid", 5),
                             ("neg", -1)]:
        extra = {} if priority is None else {"priority": priority}
        assert daemon.upload(job_id, job, **extra).status_code == 201
    gate.touch()
    for job_id in ("high", "mid", "low1", "low2", "neg"):
        assert daemon.wait_done(job_id).json()["Status"] == "SUCCESS"
    order = [e[1] for e in read_events(shared)]
    assert order == ["blocker", "high", "mid", "low1", "low2", "neg"]


@pytest.mark.parametrize(("extra", "message"), [
    ({"priority": "high"}, "priority must be an integer"),
    ({"priority": True}, "priority must be an integer"),
    ({"labels": {"a": 1}}, "labels must be an object of strings"),
    ({"timeout": -1}, "timeout: must be more than 0 seconds"),
    ({"timeout": "soon"}, "timeout: expected a duration"),
    ({"limits": {"memory": "lots"}}, "limits.memory: expected a size"),
    ({"limits": {"gpus": 1}}, "unknown limit 'gpus'"),
    ({"limits": {"memory": "2G"}}, "limits.memory '2G' is above jobd's limit 1G"),
])
def test_bad_extra_keys_get_a_classic_400(daemon_factory, tmp_path: Path,
                                          extra: dict[str, Any], message: str) -> None:
    daemon = daemon_factory(JOBD_LIMIT_MEMORY="1G")
    response = daemon.upload("x", {"run.sh": "true\n"}, **extra)
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "bad_request" and body["status"] == 400
    assert body["message"].startswith("error validating job ") and message in body["message"]
    assert daemon.client.get("/api/get/x").status_code == 404


def test_queue_cap_answers_429_with_retry_after(daemon_factory, open_dir: Path) -> None:
    shared = open_dir / "shared"
    gate = shared / "gate"
    daemon = start(daemon_factory, open_dir / "d", JOBD_SLOTS="1", JOBD_MAX_QUEUE="2")
    wait = {"run.sh": report(shared, "start") + f"while [ ! -e {gate} ]; do sleep 0.02; done\n"}
    assert daemon.upload("running", wait).status_code == 201
    wait_until(lambda: read_events(shared), what="the first job to run")
    assert daemon.upload("q1", wait).status_code == 201
    assert daemon.upload("q2", wait).status_code == 201
    refused = daemon.upload("q3", wait)
    assert refused.status_code == 429
    assert refused.json() == {"error": "too_many_requests", "status": 429,
                              "message": refused.json()["message"]}
    assert "queue is full" in refused.json()["message"]
    assert int(refused.headers["Retry-After"]) >= 1
    assert daemon.client.get("/api/get/q3").status_code == 404  # nothing stored
    gate.touch()
    for job_id in ("running", "q1", "q2"):
        assert daemon.wait_done(job_id).json()["Status"] == "SUCCESS"
    assert daemon.upload("q3", wait).status_code == 201


# -- timeouts and limits ------------------------------------------------------------------------


TREE = """trap '' TERM
sh -c 'trap "" TERM; exec sleep 300' &
echo $! >> pids
sleep 300 &
echo $! >> pids
setsid sleep 300 &
echo $! >> pids.setsid
sh -c 'sleep 300 & echo $! >> pids; wait' &
echo $! >> pids
echo started > started
wait
"""


def test_timeout_kills_the_whole_process_tree(daemon_factory, open_dir: Path) -> None:
    """The leader and one child ignore SIGTERM: SIGKILL after the grace ends them all; with a
    cgroup even the child that left the session with setsid."""
    daemon = start(daemon_factory, open_dir / "d", JOBD_KILL_GRACE="1s", DEBUG="true")
    began = time.monotonic()
    assert daemon.upload("tree", {"run.sh": TREE}, timeout=1).status_code == 201
    record = daemon.wait_done("tree", timeout=30).json()
    took = time.monotonic() - began
    assert record["Status"] == "FAILED"
    assert record["Message"] == "could not finish the job: timed out after 1s " \
                                "(signal: SIGKILL (9))"
    assert took < 20
    work = daemon.datapath / "tree" / "work"
    pids = [int(p) for p in (work / "pids").read_text().split()]
    assert len(pids) == 4
    wait_until(lambda: not any(alive(p) for p in pids), 10, what="the tree to die")
    escaped = int((work / "pids.setsid").read_text())
    if cgroups_active(daemon):
        wait_until(lambda: not alive(escaped), 10, what="the setsid child to die")
        assert not (own_cgroup() / tree_name(daemon.datapath) / "job-tree").exists()
    else:
        os.kill(escaped, signal.SIGKILL)  # without a cgroup it escapes: the known limit


def test_cancelled_by_timeout_default_from_settings(daemon_factory, tmp_path: Path) -> None:
    daemon = daemon_factory(JOBD_TIMEOUT="1s", JOBD_KILL_GRACE="5s")
    assert daemon.upload("slow", {"run.sh": "sleep 60\n"}).status_code == 201
    record = daemon.wait_done("slow", timeout=30).json()
    assert record["Message"] == "could not finish the job: timed out after 1s " \
                                "(signal: SIGTERM (15))"


def test_memory_hog_is_stopped_by_its_limit(daemon_factory, open_dir: Path) -> None:
    daemon = start(daemon_factory, open_dir / "d", JOBD_LIMIT_MEMORY="200M")
    hog = "#!/usr/bin/env python3\nblock = bytearray(1 << 30)\nprint('allocated')\n"
    fits = "#!/usr/bin/env python3\nblock = bytearray(50 << 20)\nprint('allocated')\n"
    assert daemon.upload("hog", {"run.sh": hog}).status_code == 201
    assert daemon.upload("fits", {"run.sh": fits}).status_code == 201
    # A job may lower its own limit (not raise it): 50M no longer fits in 30M.
    assert daemon.upload("lowered", {"run.sh": fits}, limits={"memory": "30M"}).status_code == 201
    record = daemon.wait_done("hog").json()
    assert record["Status"] == "FAILED"
    if "memory" in controllers(daemon):
        assert "out of memory" in record["Message"]
    else:  # setrlimit only: the allocation fails; jobd says what it can be sure of
        assert record["Message"] == ("could not finish the job: memory limit 200M was probably "
                                     "reached (the log reports a failed allocation) "
                                     "(exit status 1)")
    assert "MemoryError" in (daemon.datapath / "hog" / "log").read_text()
    assert daemon.wait_done("fits").json()["Status"] == "SUCCESS"
    lowered = daemon.wait_done("lowered").json()
    assert lowered["Status"] == "FAILED" and "memory limit 30M" in lowered["Message"]


@pytest.mark.parametrize("allow_root", ["false", "true"])
def test_rlimits_reach_the_job(daemon_factory, open_dir: Path, allow_root: str) -> None:
    """Both ways in: `prlimit` from jobd at the start gate (same uid), and setrlimit in the
    child (another uid, without CAP_SYS_RESOURCE as in Docker)."""
    daemon = daemon_factory(workdir=open_dir / "d", JOBD_ALLOW_ROOT=allow_root,
                            JOBD_LIMIT_NOFILE="256", JOBD_LIMIT_NPROC="500",
                            JOBD_LIMIT_FSIZE="1M", JOBD_LIMIT_MEMORY="1G",
                            JOBD_LIMIT_CPU_TIME="1h")
    assert daemon.upload("limits", {"run.sh": "cat /proc/self/limits > limits.txt\n"},
                         limits={"nofile": 128}).status_code == 201
    response = daemon.wait_done("limits")
    assert response.json()["Status"] == "SUCCESS", response.json()["Message"]
    rows = {line[:26].strip(): line[26:].split()[:2]
            for line in result_files(response)["limits.txt"].decode().splitlines()[1:]}
    assert rows["Max open files"] == ["128", "128"]
    assert rows["Max processes"] == ["500", "500"]
    assert rows["Max file size"] == [str(1 << 20), str(1 << 20)]
    assert rows["Max data size"] == [str(1 << 30), str(1 << 30)]
    assert rows["Max cpu time"] == ["3600", "3605"]


def test_cpu_time_and_file_size_limits_say_so(daemon_factory, open_dir: Path) -> None:
    daemon = start(daemon_factory, open_dir / "d")
    spin = "#!/usr/bin/env python3\nwhile True:\n    pass\n"
    assert daemon.upload("spin", {"run.sh": spin}, limits={"cpu_time": 1}).status_code == 201
    big = "dd if=/dev/zero of=big bs=1024 count=4096\n"
    for job_id, script in (("big", "exec " + big), ("big-child", big)):
        assert daemon.upload(job_id, {"run.sh": script}, limits={"fsize": "1M"}).status_code \
            == 201
    spin_record = daemon.wait_done("spin", timeout=60).json()
    assert spin_record["Message"] == "could not finish the job: CPU time limit 1s reached " \
                                     "(signal: SIGXCPU (24))"
    assert daemon.wait_done("big").json()["Message"] == \
        "could not finish the job: file size limit 1M reached (signal: SIGXFSZ (25))"
    # dd is a child of the job's shell, which only reports exit status 128 + 25.
    assert daemon.wait_done("big-child").json()["Message"] == \
        "could not finish the job: file size limit 1M was probably reached (a process of the " \
        "job ended by SIGXFSZ) (exit status 153)"


def test_limits_parse_and_ceilings() -> None:
    defaults = Limits(memory=1 << 30, nproc=100)
    job = defaults.for_job({"memory": "256M", "cpu_time": "2m", "cpus": 1.5, "io": "10M"})
    assert (job.memory, job.cpu_time, job.cpus, job.io, job.nproc) == \
        (256 << 20, 120.0, 1.5, 10 << 20, 100)
    with pytest.raises(LimitError, match="above jobd's limit 100"):
        defaults.for_job({"nproc": 0})  # 0 would mean "none": above any ceiling
    with pytest.raises(LimitError, match="must be an object"):
        defaults.for_job(["memory"])
    assert Limits().for_job({"memory": 5}).memory == 5  # no ceiling where none is set


def test_cgroup_settings_written_for_each_controller(tmp_path: Path) -> None:
    tree = CgroupTree(tmp_path, frozenset({"memory", "cpu", "pids", "io"}), True, "8:0")
    settings = dict(tree._settings(Limits(memory=64 << 20, cpus=1.5, nproc=50, io=1 << 20)))
    assert settings == {"memory.max": str(64 << 20), "memory.swap.max": "0",
                        "memory.oom.group": "1", "cpu.max": "150000 100000",
                        "pids.max": "50", "io.max": "8:0 rbps=1048576 wbps=1048576"}
    assert dict(CgroupTree(tmp_path, frozenset(), True, None)._settings(Limits(memory=1))) == {}


def test_oom_kill_count_makes_a_definite_message(tmp_path: Path) -> None:
    """What a cgroup's memory.events says (this host has no v2 memory controller to fill it;
    tests/test_cgroup_v2_vm.py has the real kernel fill it)."""
    # A group kill of a job of 4 processes, as Linux 6.1 counted it once: the victim twice.
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 1\noom_kill 5\n"
                                            "oom_group_kill 1\n")
    kills = JobCgroup(tmp_path, has_kill=True).oom_kills()
    assert kills == 5
    assert Limits(memory=64 << 20).reason(None, signal.SIGKILL, kills, tmp_path / "log") == \
        "out of memory: the kernel killed the job at its memory limit 64M"
    assert JobCgroup(tmp_path / "none", has_kill=True).oom_kills() == 0
    # Without a count, SIGKILL alone proves nothing: no memory claim.
    assert Limits(memory=64 << 20).reason(None, signal.SIGKILL, 0, tmp_path / "log") is None


def test_forks_refused_at_pids_max_are_named(tmp_path: Path) -> None:
    (tmp_path / "pids.events").write_text("max 2301\n")
    refused = JobCgroup(tmp_path, has_kill=True).refused_forks()
    assert refused == 2301
    assert Limits(nproc=24).reason(1, None, 0, tmp_path / "log", refused) == \
        "process limit 24 reached: the kernel refused 2301 fork(s)"
    assert Limits(nproc=24).reason(0, None, 0, tmp_path / "log", refused) is None  # it coped
    assert JobCgroup(tmp_path / "none", has_kill=True).refused_forks() == 0


def test_jobd_takes_its_own_helper_processes_into_the_leaf(tmp_path: Path) -> None:
    """family_in: jobd and its descendants among a cgroup's processes, nobody else. The real
    case (Python 3.13's forkserver and resource tracker after shiv's first unpack) is in
    tests/test_cgroup_v2_vm.py."""
    child = subprocess.Popen(["sh", "-c", "sleep 30 & echo $!; wait"], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None
        grandchild = int(child.stdout.readline())
        gone = 2 ** 22 + 1  # above pid_max: a process that ended meanwhile
        (tmp_path / "cgroup.procs").write_text(
            f"{os.getppid()}\n{child.pid}\n{os.getpid()}\n{grandchild}\n{gone}\n")
        assert family_in(tmp_path, os.getpid()) == [os.getpid(), child.pid, grandchild]
    finally:
        child.kill()
        os.kill(grandchild, signal.SIGKILL)
        child.wait()


def test_io_limit_finds_the_whole_disk_of_datapath(tmp_path: Path) -> None:
    device = block_device(tmp_path)
    if device is None:
        pytest.skip("DATAPATH's filesystem has no block device here (overlay, tmpfs)")
    assert Path(f"/sys/dev/block/{device}").exists()
    assert not Path(f"/sys/dev/block/{device}/partition").exists()


@pytest.mark.skipif(python39() is None, reason="no CPython 3.9 on this machine")
def test_users_limits_and_cgroups_on_python_3_9(daemon_factory, open_dir: Path) -> None:
    daemon = daemon_factory(interpreter=python39(), workdir=open_dir / "d39",
                            JOBD_ALLOW_ROOT="false", JOBD_LIMIT_NOFILE="100",
                            JOBD_MAX_QUEUE="100")
    script = "id -u > uid\ncat /proc/self/limits > limits.txt\n"
    assert daemon.upload("py39", {"run.sh": script}, priority=1, timeout="1m").status_code == 201
    response = daemon.wait_done("py39")
    assert response.json()["Status"] == "SUCCESS", response.json()["Message"]
    files = result_files(response)
    if IS_ROOT:
        assert 20000 <= int(files["uid"]) <= 29999
    assert "Max open files            100                  100" in files["limits.txt"].decode()


@needs_root
def test_cgroup_kill_without_cgroup_kill_file_freezes_and_kills() -> None:
    """The path for kernels before 5.14 (no cgroup.kill), on a real cgroup."""
    own = own_cgroup()
    if own is None or not os.access(own, os.W_OK):
        pytest.skip("no writable cgroup v2 here")
    path = own / f"jobd-test-{os.getpid()}"
    path.mkdir()
    sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        group = JobCgroup(path, has_kill=False)
        group.add(sleeper.pid)
        assert group.pids() == [sleeper.pid] and group.populated()
        group.kill()
        assert sleeper.wait(10) == -signal.SIGKILL
        asyncio.run(group.remove())
        assert not path.exists()
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
        if path.exists():
            path.rmdir()


# -- users ------------------------------------------------------------------------------------


JOB_REPORT = """id -u > uid; id -g > gid; id -G > groups
stat -c '%a %u %g' "$JOBD_WORKDIR/.." > root.stat
stat -c '%u' "$JOBD_WORKDIR" "$HOME" "$TMPDIR" > owners
echo made-by-job > made.txt
"""


@needs_root
def test_each_job_runs_as_its_own_unprivileged_user(daemon_factory, open_dir: Path) -> None:
    shared = open_dir / "shared"
    gate = shared / "gate"
    daemon = start(daemon_factory, open_dir / "d")
    first = JOB_REPORT + f"while [ ! -e {gate} ]; do sleep 0.02; done\n"
    assert daemon.upload("first", {"run.sh": first, "secret.txt": "mine"}).status_code == 201
    wait_until(lambda: (daemon.datapath / "first" / "work" / "owners").exists(),
               what="the first job to report")
    nosy = JOB_REPORT + (f"ls {daemon.datapath} > list.txt 2>&1 || echo denied >> list.txt\n"
                         f"cat {daemon.datapath}/first/work/secret.txt > peek.txt 2>&1 || "
                         f"echo denied >> peek.txt\n")
    assert daemon.upload("nosy", {"run.sh": nosy}).status_code == 201
    nosy_files = result_files(daemon.wait_done("nosy"))
    gate.touch()
    first_files = result_files(daemon.wait_done("first"))
    uids = {int(first_files["uid"]), int(nosy_files["uid"])}
    assert len(uids) == 2 and all(20000 <= uid <= 29999 for uid in uids)
    for files in (first_files, nosy_files):
        uid = files["uid"].strip().decode()
        assert files["gid"].strip().decode() == uid and files["groups"].split() == [uid.encode()]
        assert files["owners"].decode().split() == [uid] * 3
        mode, owner, group = files["root.stat"].decode().split()
        assert (mode, owner, group) == ("750", "0", uid)
        assert files["made.txt"] == b"made-by-job\n"  # packed though another uid made it
    assert b"denied" in nosy_files["list.txt"] and b"mine" not in nosy_files["peek.txt"]
    assert b"denied" in nosy_files["peek.txt"]
    assert oct((daemon.datapath / "first").stat().st_mode)[-3:] == "700"  # closed again
    assert oct(daemon.datapath.stat().st_mode)[-3:] == "711"
    assert "jobs run as a uid of their own from 20000-29999" in daemon.log()


@needs_root
@pytest.mark.parametrize(("run_as", "uid", "gid"), [("nobody", 65534, 65534),
                                                   ("12345:23456", 12345, 23456)])
def test_jobs_run_as_the_configured_user(daemon_factory, open_dir: Path, run_as: str,
                                         uid: int, gid: int) -> None:
    daemon = start(daemon_factory, open_dir / "d", JOBD_RUN_AS=run_as)
    assert daemon.upload("me", {"run.sh": JOB_REPORT}).status_code == 201
    response = daemon.wait_done("me")
    assert response.json()["Status"] == "SUCCESS", response.json()["Message"]
    files = result_files(response)
    assert int(files["uid"]) == uid and int(files["gid"]) == gid


class NobodyDaemon(Daemon):
    """The zipapp started as an unprivileged user (as `docker run --user`)."""

    def start(self, timeout: float = 60.0) -> NobodyDaemon:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the process
        self.proc = subprocess.Popen([str(self.zipapp)], env=self.env, cwd=self.workdir,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     user=65534, group=65534, extra_groups=[])
        wait_until(self._healthy, timeout, 0.05, "the daemon to answer /health")
        return self


@needs_root
def test_unprivileged_jobd_runs_jobs_as_itself_with_limits(zipapp: Path, open_dir: Path) -> None:
    where = open_dir / "nobody"
    where.mkdir()
    os.chown(where, 65534, 65534)
    daemon = NobodyDaemon(zipapp, where, SHIV_ROOT=str(where / "shiv"), JOBD_ALLOW_ROOT="false",
                          JOBD_LIMIT_NOFILE="64", JOBD_LIMIT_MEMORY="200M")
    try:
        daemon.start()
        script = "id -u > uid\ncat /proc/self/limits > limits.txt\n"
        assert daemon.upload("plain", {"run.sh": script}).status_code == 201
        response = daemon.wait_done("plain")
        assert response.json()["Status"] == "SUCCESS", response.json()["Message"]
        files = result_files(response)
        assert files["uid"] == b"65534\n"
        limits = files["limits.txt"].decode()
        assert "Max open files            64                   64" in limits
        assert "jobs run as jobd's own user (uid 65534): jobd is not root" in daemon.log()
        assert "setrlimit only" in daemon.log()  # the host's cgroup is root's: not delegated
        assert daemon.stop() == 0
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop(signal.SIGKILL)
        daemon.client.close()


@needs_root
def test_root_jobs_need_an_explicit_yes(zipapp: Path, open_dir: Path) -> None:
    env = {"PATH": os.environ["PATH"], "DATAPATH": str(open_dir / "data"),
           "DB_PATH": str(open_dir / "db"), "PORT": "0", "JOBD_RUN_AS": "root",
           "SHIV_ROOT": str(open_dir / "shiv")}
    done = subprocess.run([str(zipapp)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "refusing to run jobs as root" in done.stderr and "JOBD_ALLOW_ROOT" in done.stderr


@needs_root
def test_unreachable_datapath_is_refused_at_start(zipapp: Path, open_dir: Path) -> None:
    closed = open_dir / "closed"
    closed.mkdir(mode=0o700)
    env = {"PATH": os.environ["PATH"], "DATAPATH": str(closed / "data"),
           "DB_PATH": str(open_dir / "db"), "PORT": "0", "SHIV_ROOT": str(open_dir / "shiv")}
    done = subprocess.run([str(zipapp)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"{closed} (mode 0700) cannot be searched" in done.stderr


# -- environment ------------------------------------------------------------------------------


def test_environment_is_exactly_the_documented_set(daemon_factory, open_dir: Path) -> None:
    daemon = start(daemon_factory, open_dir / "d", TZ="UTC", OMP_NUM_THREADS="4",
                   CONDA_PREFIX="/opt/conda", SECRET_TOKEN="do-not-pass", LC_ALL="C.UTF-8")
    # /usr/bin/python3 itself: a pyenv shim found on PATH would add its own variables.
    script = "#!/usr/bin/python3\nimport json, os\n" \
             "json.dump(dict(os.environ), open('env.json', 'w'))\n"
    assert daemon.upload("env", {"run.sh": script}).status_code == 201
    response = daemon.wait_done("env")
    env = json.loads(result_files(response)["env.json"])
    root = str((daemon.datapath / "env").resolve())
    assert daemon.proc is not None  # PATH as the daemon has it (a pyenv shim may prepend)
    daemon_env = dict(item.split("=", 1) for item in Path(
        f"/proc/{daemon.proc.pid}/environ").read_text().split("\0") if item)
    assert "SECRET_TOKEN" in daemon_env and "DATAPATH" in daemon_env
    assert env == {
        "PATH": daemon_env["PATH"], "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TZ": "UTC",
        "OMP_NUM_THREADS": "4", "CONDA_PREFIX": "/opt/conda", "JOBD_JOB_ID": "env",
        "JOBD_WORKDIR": f"{root}/work", "HOME": f"{root}/home", "TMPDIR": f"{root}/tmp",
        "JOBD_ARTIFACTS_DIR": f"{root}/work/artifacts",
    }


def test_params_become_jobd_param_variables(tmp_path: Path) -> None:
    """Through the manager (the native protocol adds params on another branch)."""
    config = Config(datapath=tmp_path / "data", db_path=tmp_path / "db", fsync=False,
                    allow_root=True, cgroup="off", slots=1)

    async def scenario() -> dict[str, Any]:
        async with running_manager(config) as manager:
            upload = manager.data.new_incoming()
            script = "#!/usr/bin/env python3\nimport json, os\njson.dump({k: v for k, v in " \
                     "os.environ.items() if k.startswith('JOBD_PARAM_')}, open('p.json', 'w'))\n"
            upload.write_bytes(make_zip({"run.sh": script}))
            await manager.create("params", upload, protocol="native", options={
                "params": {"N": 3, "name": "x y", "flags": [1, 2]}})
            await manager.wait_finished("params")
            assert manager.get("params")["status"] == "SUCCESS"
            with zipfile.ZipFile(manager.files("params").result) as archive:
                return json.loads(archive.read("p.json"))

    assert asyncio.run(scenario()) == {"JOBD_PARAM_N": "3", "JOBD_PARAM_name": "x y",
                                       "JOBD_PARAM_flags": "[1, 2]"}


# -- crash leftovers, damaged database, attempts ------------------------------------------------

def test_a_cancel_during_a_slow_start_ends_the_job(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A confined start awaits (a cgroup move); a cancel that comes meanwhile finds no
    process yet, and must still end the job, not wait for it to finish by itself."""
    config = Config(datapath=tmp_path / "data", db_path=tmp_path / "db", fsync=False,
                    allow_root=True, cgroup="off", slots=1)
    started = LocalExecutor.start

    async def slow_start(self: LocalExecutor, *args: Any, **kwargs: Any) -> Any:
        process = await started(self, *args, **kwargs)
        await asyncio.sleep(0.5)  # the cancel arrives here
        return process

    monkeypatch.setattr(LocalExecutor, "start", slow_start)

    async def scenario() -> tuple[str, float]:
        async with running_manager(config) as manager:
            upload = manager.data.new_incoming()
            upload.write_bytes(make_zip({"run.sh": "sleep 30\n"}))
            await manager.create("slow", upload, protocol="classic")
            while manager.get("slow")["status"] != "RUNNING":
                await asyncio.sleep(0.01)
            begun = time.monotonic()
            record, _ = await asyncio.wait_for(manager.cancel("slow"), 20)
            return record["status"], time.monotonic() - begun

    status, took = asyncio.run(scenario())
    assert status == "CANCELLED"
    assert took < 10


def test_a_disk_error_while_storing_is_a_503_not_a_201(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    config = Config(datapath=tmp_path / "data", db_path=tmp_path / "db", fsync=True,
                    allow_root=True, cgroup="off", slots=1)

    def failing(path: str) -> OSError | None:
        return OSError(errno.EIO, "I/O error") if path.endswith("input.zip") else None

    monkeypatch.setattr(storage, "_fsync_path", failing)

    async def scenario() -> Rejected:
        async with running_manager(config) as manager:
            upload = manager.data.new_incoming()
            upload.write_bytes(make_zip({"run.sh": "true\n"}))
            with pytest.raises(Rejected) as caught:
                await manager.create("eio", upload, protocol="classic")
            return caught.value

    refused = asyncio.run(scenario())
    assert (refused.status, refused.code) == (503, "service_unavailable")
    assert "could not be stored" in refused.message and "I/O error" in refused.message


def test_a_job_stored_without_its_input_was_never_acknowledged(tmp_path: Path,
                                                               caplog: Any) -> None:
    """`create` answers 201 only once input and record are on disk, but the job may start
    before that. A crash in between leaves a record (queued, or running) whose input never
    reached the disk: the next start removes it, so the client's retry with the same id
    works; a job whose input is there runs."""
    config = Config(datapath=tmp_path / "data", db_path=tmp_path / "db", fsync=False,
                    allow_root=True, cgroup="off", slots=1)
    payload = make_zip({"run.sh": "true\n"})
    with JobStore(config.db_path, fsync=False) as store:
        for job_id, status in (("lost", "QUEUED"), ("lost-running", "RUNNING"),
                               ("torn", "QUEUED"), ("kept", "QUEUED")):
            store.add({**job.new_record(job_id, protocol="classic", input_size=len(payload)),
                       "status": status})
    for job_id, data in (("kept", payload), ("torn", b"")):  # torn: its data never synced
        root = config.datapath / job_id
        root.mkdir(parents=True)
        (root / "input.zip").write_bytes(data)

    async def scenario() -> tuple[set[str], str]:
        async with running_manager(config) as manager:
            await manager.wait_finished("kept", 30)
            return {r["id"] for r in manager.store}, manager.get("kept")["status"]

    with caplog.at_level(logging.WARNING, logger="jobd.jobs"):
        assert asyncio.run(scenario()) == ({"kept"}, "SUCCESS")
    assert "its input never fully reached the disk" in caplog.text


def test_many_jobs_without_input_mean_a_wrong_datapath_not_a_crash(tmp_path: Path,
                                                                     caplog: Any) -> None:
    """DATAPATH not mounted: every job lacks its input. They are kept, with an error."""
    config = Config(datapath=tmp_path / "data", db_path=tmp_path / "db", fsync=False,
                    allow_root=True, cgroup="off", slots=1, poll_interval=3600)
    with JobStore(config.db_path, fsync=False) as store:
        for n in range(12):
            store.add(job.new_record(f"j{n}", protocol="classic", input_size=100))

    async def scenario() -> int:
        # nothing runs: only what start-up did is looked at
        async with running_manager(config, slots=0) as manager:
            return len(manager.store)

    with caplog.at_level(logging.WARNING, logger="jobd.jobs"):
        assert asyncio.run(scenario()) == 12
    assert "is DATAPATH the data of this database" in caplog.text


@pytest.mark.parametrize("cgroup", ["auto", "off"])
def test_restart_after_daemon_only_crash_kills_the_old_run(daemon_factory, open_dir: Path,
                                                           cgroup: str) -> None:
    """jobd dies alone (kill -9), its job keeps running: the next jobd kills that run before
    requeueing the job, so the job never runs twice at once."""
    shared = open_dir / "shared"
    gate = shared / "gate"
    where = open_dir / "d"
    daemon = start(daemon_factory, where, JOBD_CGROUP=cgroup)
    script = report(shared, "start") + f"while [ ! -e {gate} ]; do sleep 0.02; done\n" + \
        report(shared, "end")
    assert daemon.upload("survivor", {"run.sh": script}).status_code == 201
    wait_until(lambda: read_events(shared), what="the job to start")
    old_pid = read_events(shared)[0][2]
    daemon.stop(signal.SIGKILL)
    assert alive(old_pid)  # the job outlived its daemon
    again = start(daemon_factory, where, JOBD_CGROUP=cgroup)
    wait_until(lambda: not alive(old_pid), 10, what="the old run to be killed")
    wait_until(lambda: len(read_events(shared)) >= 2, what="the job to start again")
    gate.touch()
    assert again.wait_done("survivor").json()["Status"] == "SUCCESS"
    events = read_events(shared)
    assert [(kind, pid == old_pid) for kind, _, pid, _, _ in events] == \
        [("start", True), ("start", False), ("end", False)]
    assert "left by jobs of a previous run" in again.log() or "from a previous run" in \
        again.log()


def test_job_interrupted_max_attempts_times_fails(daemon_factory, open_dir: Path) -> None:
    shared = open_dir / "shared"
    where = open_dir / "d"
    script = report(shared, "start") + "sleep 300\n"
    for attempt in range(2):
        daemon = start(daemon_factory, where, JOBD_MAX_ATTEMPTS="2")
        if attempt == 0:
            assert daemon.upload("doomed", {"run.sh": script}).status_code == 201
        wait_until(lambda n=attempt: len(read_events(shared)) > n, what="a start")
        daemon.stop(signal.SIGKILL)
        pid = read_events(shared)[-1][2]
        os.kill(pid, signal.SIGKILL)  # the container dies whole
        wait_until(lambda p=pid: not alive(p), what="the job to die")
    daemon = start(daemon_factory, where, JOBD_MAX_ATTEMPTS="2")
    record = daemon.wait_done("doomed").json()
    assert record["Status"] == "FAILED"
    assert record["Message"] == "job failed: interrupted 2 times (the daemon restarted while " \
                                "it ran), giving up"


def test_damaged_database_stops_the_zipapp_with_its_path(zipapp: Path, tmp_path: Path,
                                                         daemon_factory) -> None:
    daemon = daemon_factory(workdir=tmp_path / "d")
    for n in range(3):
        assert daemon.upload(f"j{n}", {"run.sh": "true\n"}).status_code == 201
        daemon.wait_done(f"j{n}")
    assert daemon.stop() == 0
    db = daemon.db_path / "jobs.json"
    lines = db.read_bytes().splitlines(keepends=True)
    lines[1] = b'{"garbage\n'
    db.write_bytes(b"".join(lines))
    env = {**daemon.env, "PORT": "0"}
    done = subprocess.run([str(zipapp)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert str(db) in done.stderr
    assert "listening" not in done.stderr and "Uvicorn running" not in done.stderr


# -- disk guard ----------------------------------------------------------------------------------


def test_disk_guard_answers_507_and_sweeps(daemon_factory, tmp_path: Path) -> None:
    where = tmp_path / "d"
    first = daemon_factory(workdir=where)
    assert first.upload("old", {"run.sh": "true\n"}).status_code == 201
    assert first.wait_done("old").json()["Status"] == "SUCCESS"
    finished = time.monotonic()
    assert first.stop() == 0
    info = os.statvfs(tmp_path)
    floor = info.f_bavail * info.f_frsize + (100 << 30)  # more than is free
    daemon = daemon_factory(workdir=where, JOBD_MIN_FREE=str(floor), JOBD_RETENTION="12s",
                            JOBD_RETENTION_INTERVAL="1h")
    assert daemon.client.get("/api/get/old").status_code == 200  # young: the start sweep kept it
    wait_until(lambda: time.monotonic() - finished > 12.5, 30, 0.1, "the job to age")
    refused = daemon.upload("new", {"run.sh": "true\n"})
    assert refused.status_code == 507
    body = refused.json()
    assert body["error"] == "insufficient_storage" and body["status"] == 507
    assert body["message"].startswith("not enough disk space") and "JOBD_MIN_FREE" in \
        body["message"]
    wait_until(lambda: daemon.client.get("/api/get/old").status_code == 404, 10,
               what="the on-demand retention sweep")
    assert "running the retention sweep now" in daemon.log()
    assert daemon.client.get("/api/get/new").status_code == 404


def test_disk_guard_as_percentage_lets_uploads_through(daemon_factory) -> None:
    daemon = daemon_factory(JOBD_MIN_FREE="1%")
    assert daemon.upload("fine", {"run.sh": "true\n"}).status_code == 201


# -- start-up report ----------------------------------------------------------------------------


def test_start_log_names_the_mechanisms(daemon_factory, open_dir: Path) -> None:
    daemon = start(daemon_factory, open_dir / "d", JOBD_LIMIT_MEMORY="1G")
    log = daemon.log()
    line = next(x for x in log.splitlines() if "limits: setrlimit" in x)
    assert "defaults: memory=1G" in line
    own = own_cgroup()
    if IS_ROOT and own is not None and os.access(own, os.W_OK):
        assert f"cgroup v2 {own / tree_name(daemon.datapath)}" in line
    assert "users: jobs run as" in log


@pytest.mark.parametrize("env", [{}, {"JOBD_LIMIT_MEMORY": "1G"}], ids=["direct", "gated"])
def test_a_missing_shebang_interpreter_fails_the_same_way_gated_or_not(
        daemon_factory: Callable[..., Daemon], tmp_path: Path, env: dict[str, str]) -> None:
    """With limits the job starts through the gate shell, whose exec would only exit 127:
    the interpreter is checked first, so both paths name it."""
    daemon = daemon_factory(workdir=tmp_path / "d", **env)
    for job_id, script, says in (
            ("missing", "#!/no/such/python\nprint(1)\n", "(/no/such/python) was not found"),
            ("crlf", "#!/bin/sh\r\necho hi\r\n", "Windows line endings")):
        daemon.upload(job_id, {"run.sh": script})
        daemon.wait_done(job_id)
        record = daemon.client.get(f"/api/v1/jobs/{job_id}").json()
        assert record["status"] == "FAILED"
        assert record["message"].startswith("could not start the job: could not start "
                                            "./run.sh: ") and says in record["message"], record


@pytest.mark.parametrize("meddling", ["delete", "restart"])
def test_a_sweep_leaves_jobs_restarted_or_deleted_while_it_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, meddling: str) -> None:
    """The retention sweep lets the loop run while it lists and deletes: a job a client
    deletes or restarts meanwhile is neither deleted twice nor deleted under its new run."""
    config = Config(datapath=tmp_path / "data", db_path=tmp_path / "db", fsync=False,
                    allow_root=True, cgroup="off", slots=1, retention=3600.0,
                    retention_interval=1e6)
    monkeypatch.setattr(manager_mod, "_SWEEP_BATCH", 1)

    async def scenario() -> tuple[int, dict[str, Any] | None, float]:
        async with running_manager(config) as manager:
            for job_id in ("a", "b", "c"):
                upload = manager.data.new_incoming()
                upload.write_bytes(make_zip({"run.sh": "true\n"}))
                await manager.create(job_id, upload, protocol="classic")
                await manager.wait_finished(job_id)
            listed = asyncio.Event()
            records = manager._records
            seen: set[str] = set()

            def watched(status: str) -> Iterator[dict[str, Any]]:
                yield from records(status)
                seen.add(status)
                if seen == set(job.TERMINAL):
                    listed.set()  # the sweep now deletes what it listed, awaiting each

            monkeypatch.setattr(manager, "_records", watched)

            async def meddle() -> None:
                await listed.wait()
                if meddling == "delete":
                    await manager.delete("b")
                else:
                    await manager.restart("c")

            meddler = asyncio.ensure_future(meddle())
            first_end = manager.store.get("c")["finished"]  # type: ignore[index]
            await asyncio.sleep(0.01)
            # a, b and c expired; a run of c that ends from now on is younger than that
            deleted = await manager.sweep(now=time.time() + config.retention)
            await meddler
            await manager.wait_finished("c")
            return deleted, manager.store.get("c"), first_end

    deleted, c, first_end = asyncio.run(scenario())
    assert deleted == 2
    if meddling == "restart":  # it ran again, and is kept
        assert c is not None and c["status"] == "SUCCESS" and c["finished"] > first_end
