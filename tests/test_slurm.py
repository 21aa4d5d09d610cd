"""The Slurm executor against a real single-node Slurm the tests start (slurm_cluster.py).

Black-box tests drive the built zipapp over the classic protocol (`slurml: true`) and look at
Slurm itself with squeue; in-process tests drive `JobManager` directly where the classic
protocol has no call for it (cancel, a running job's message, per-job resources). Jobs that must
stay running wait for a gate file the test creates, so no test relies on a fixed sleep.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from jobd import job
from jobd.config import Config
from jobd.manager import JobManager
from jobd.reaper import Reaper
from jobd.slurm import OptionError
from jobd.store import JobStore
from tests.conftest import Daemon, make_zip, python39, result_files, wait_until
from tests.slurm_cluster import SlurmCluster, missing_reason

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def cluster() -> Iterator[SlurmCluster]:
    reason = missing_reason()
    if reason is not None:
        pytest.skip(reason)
    # Not under pytest's tmp_path: munged wants its socket directory's parents searchable.
    root = Path(tempfile.mkdtemp(prefix="jobd-slurm-"))
    started = SlurmCluster(root).start()
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(started.conf)  # for the in-process executor
    try:
        yield started
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        started.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def gates(tmp_path: Path) -> Path:
    """Files a job waits for: the test opens a gate by creating the file."""
    path = tmp_path / "gates"
    path.mkdir()
    return path


def gated(gates: Path, name: str, before: str = "", after: str = "") -> str:
    """A run.sh that runs `before`, waits for gate `name`, then runs `after`."""
    return (f"#!/bin/sh\n{before}\nwhile [ ! -e {gates / name} ]; do sleep 0.1; done\n"
            f"{after}\n")


def slurm_env(cluster: SlurmCluster, **env: str) -> dict[str, str]:
    return {"SLURM_CONF": str(cluster.conf), "JOBD_SLURM": "true",
            "JOBD_SLURM_SHARED_CHECK": "warn", "JOBD_SLURM_POLL_INTERVAL": "0.3",
            "JOBD_FSYNC": "false", "JOBD_ALLOW_ROOT": "true", **env}


@pytest.fixture
def slurm_daemon(daemon_factory: Callable[..., Daemon],
                 cluster: SlurmCluster) -> Callable[..., Daemon]:
    def start(workdir: Path | None = None, interpreter: str | None = None, **env: str) -> Daemon:
        return daemon_factory(interpreter, workdir=workdir, **slurm_env(cluster, **env))
    return start


def slurm_jobs(cluster: SlurmCluster, job_id: str) -> dict[str, dict[str, str]]:
    """The Slurm jobs jobd submitted for `job_id` (by job name)."""
    return cluster.jobs(f"--name=jobd-{job_id}")


def slurm_state(cluster: SlurmCluster, job_id: str) -> str | None:
    found = slurm_jobs(cluster, job_id)
    return next(iter(found.values()))["state"] if len(found) == 1 else None


# -- black box: the zipapp, the classic protocol ----------------------------------------------


def test_success_result_and_environment(slurm_daemon: Callable[..., Daemon],
                                        cluster: SlurmCluster) -> None:
    daemon = slurm_daemon()
    script = "#!/bin/sh\necho hello from slurm\nenv | sort > env.txt\npwd > pwd.txt\n"
    upload = daemon.upload("ok", {"run.sh": script, "input.txt": "data\n"}, slurml=True)
    assert upload.status_code == 201, upload.text
    assert upload.json()["Status"] == "QUEUED"
    done = daemon.wait_done("ok", 90)
    record = done.json()
    assert done.status_code == 200
    assert record["Status"] == "SUCCESS", record
    assert record["Message"] == "job finished successfully"
    assert record["Slurml"] is True and record["SlurmID"] > 0
    files = result_files(done)
    assert files["input.txt"] == b"data\n"
    env = dict(line.split("=", 1) for line in files["env.txt"].decode().splitlines()
               if "=" in line)
    assert env["JOBD_JOB_ID"] == "ok"
    assert env["SLURM_JOB_ID"] == str(record["SlurmID"])
    assert env["SLURM_JOB_NAME"] == "jobd-ok"
    workdir = daemon.datapath.resolve() / "ok" / "work"
    assert env["JOBD_WORKDIR"] == str(workdir)
    assert files["pwd.txt"].decode().strip() == str(workdir)
    assert env["HOME"] == str(daemon.datapath.resolve() / "ok" / "home")
    assert "SHIV_ROOT" not in env  # a clean environment, as for local jobs
    log = (daemon.datapath / "ok" / "log").read_text()
    assert "hello from slurm" in log
    submitted = slurm_jobs(cluster, "ok")
    assert list(submitted) == [str(record["SlurmID"])]
    assert submitted[str(record["SlurmID"])]["workdir"] == str(workdir)
    assert submitted[str(record["SlurmID"])]["state"] == "COMPLETED"


def test_failures_keep_exit_code_and_signal(slurm_daemon: Callable[..., Daemon]) -> None:
    """Also proves the Slurm executor on CPython 3.9, when the machine has it."""
    daemon = slurm_daemon(interpreter=python39())
    assert daemon.upload("exit3", {"run.sh": "echo failing\nexit 3\n"}, slurml=True) \
        .status_code == 201
    assert daemon.upload("killed", {"run.sh": "kill -9 $$\n"}, slurml=True).status_code == 201
    exit3 = daemon.wait_done("exit3", 90).json()
    assert exit3["Status"] == "FAILED"
    assert exit3["Message"] == "could not finish the job, error: exit status 3"
    killed = daemon.wait_done("killed", 90).json()
    assert killed["Status"] == "FAILED"
    assert killed["Message"] == "could not finish the job, error: signal: SIGKILL (9)"


def test_timeout_cancels_the_slurm_job(slurm_daemon: Callable[..., Daemon],
                                       cluster: SlurmCluster) -> None:
    """Also: JOBD_EXECUTOR=slurm sends jobs that do not ask (slurml false) to Slurm."""
    daemon = slurm_daemon(JOBD_TIMEOUT="2s", JOBD_EXECUTOR="slurm", JOBD_SLURM="false")
    upload = daemon.upload("slow", {"run.sh": "echo started\nsleep 120\n"})
    assert upload.status_code == 201 and upload.json()["Slurml"] is True
    record = daemon.wait_done("slow", 90).json()
    assert record["Status"] == "FAILED"
    assert "timed out after 2s" in record["Message"], record
    found = slurm_jobs(cluster, "slow")[str(record["SlurmID"])]
    assert found["state"] == "CANCELLED"
    assert found["time_limit"] == "2:00"  # Slurm's own limit: the next minute up, plus one


def test_live_log_grows_while_running(slurm_daemon: Callable[..., Daemon],
                                      gates: Path) -> None:
    daemon = slurm_daemon()
    script = gated(gates, "live", before="echo first line", after="echo second line")
    assert daemon.upload("live", {"run.sh": script}, slurml=True).status_code == 201
    log = daemon.datapath / "live" / "log"
    wait_until(lambda: log.exists() and "first line" in log.read_text(), 60,
               what="the first line in the Slurm output file")
    assert daemon.client.get("/api/get/live").status_code == 202
    assert "second line" not in log.read_text()
    (gates / "live").touch()
    assert daemon.wait_done("live", 60).json()["Status"] == "SUCCESS"
    assert log.read_text().splitlines() == ["first line", "second line"]


def test_restart_reattaches_never_resubmits(slurm_daemon: Callable[..., Daemon],
                                            cluster: SlurmCluster, gates: Path,
                                            tmp_path: Path) -> None:
    """SIGTERM and kill -9 of jobd with jobs running, pending and finishing meanwhile."""
    home = tmp_path / "jobd"
    first = slurm_daemon(workdir=home)
    for name in ("run", "down"):
        body = {"run.sh": gated(gates, name, before=f"echo {name} started",
                                after="echo done > out.txt")}
        assert first.upload(name, body, slurml=True).status_code == 201
    for name in ("run", "down"):
        wait_until(lambda n=name: slurm_state(cluster, n) == "RUNNING", 60,
                   what=f"{name} running in Slurm")
    cluster.run("scontrol", "update", "PartitionName=debug", "State=DOWN")
    try:
        assert first.upload("pend", {"run.sh": "echo pending job ran > out.txt\n"},
                            slurml=True).status_code == 201
        wait_until(lambda: slurm_state(cluster, "pend") == "PENDING", 60,
                   what="pend pending in Slurm")
        ids = {name: next(iter(slurm_jobs(cluster, name))) for name in ("run", "down", "pend")}

        # A clean stop leaves Slurm jobs alone: they are not the daemon's processes.
        assert first.stop(signal.SIGTERM) == 0
        assert slurm_state(cluster, "run") == "RUNNING"
        assert slurm_state(cluster, "pend") == "PENDING"

        second = slurm_daemon(workdir=home)
        wait_until(lambda: second.log().count("following Slurm job") >= 3, 30,
                   what="the second daemon to follow the three jobs again")
        second.stop(signal.SIGKILL)  # a crash

        (gates / "down").touch()  # finishes while no jobd is looking
        wait_until(lambda: slurm_state(cluster, "down") == "COMPLETED", 60,
                   what="down to complete in Slurm")
        third = slurm_daemon(workdir=home)
    finally:
        cluster.run("scontrol", "update", "PartitionName=debug", "State=UP")
    (gates / "run").touch()
    for name in ("run", "down", "pend"):
        done = third.wait_done(name, 90)
        record = done.json()
        assert record["Status"] == "SUCCESS", record
        assert str(record["SlurmID"]) == ids[name]
        assert list(slurm_jobs(cluster, name)) == [ids[name]], "submitted twice"
        assert b"\n" in result_files(done)["out.txt"]
    assert "requeued" not in third.log()


def test_two_hundred_jobs_at_once(slurm_daemon: Callable[..., Daemon],
                                  cluster: SlurmCluster) -> None:
    daemon = slurm_daemon(JOBD_SLOTS="4", JOBD_SLURM_POLL_INTERVAL="0.5", JOBD_ACCESS_LOG="false")
    names = [f"bulk-{i:03d}" for i in range(200)]

    def upload(name: str) -> int:
        return daemon.upload(name, {"run.sh": 'echo "$JOBD_JOB_ID" > id.txt\n'},
                             slurml=True).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert set(pool.map(upload, names)) == {201}

    def all_done() -> bool:
        return all(daemon.client.get(f"/api/get/{n}").status_code == 200 for n in names)

    wait_until(all_done, 240, 1.0, "200 Slurm jobs to finish")
    slurm_ids = set()
    for name in names:
        done = daemon.client.get(f"/api/get/{name}")
        assert done.json()["Status"] == "SUCCESS", done.json()
        assert result_files(done)["id.txt"] == f"{name}\n".encode()
        slurm_ids.add(done.json()["SlurmID"])
    assert len(slurm_ids) == 200
    submitted = [j for j in cluster.jobs().values() if j["name"].startswith("jobd-bulk-")]
    assert len(submitted) == 200  # one sbatch per job


def test_slurml_without_slurm_is_a_clear_400(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory()
    response = daemon.upload("nope", {"run.sh": "true\n"}, slurml=True)
    assert response.status_code == 400
    assert response.json() == {
        "error": "bad_request", "status": 400,
        "message": "error validating job the slurm executor is not configured on this jobd "
                   "(JOBD_SLURM)"}
    assert daemon.client.get("/api/get/nope").status_code == 404


def test_datapath_under_tmp_refused_at_start(zipapp: Path, tmp_path: Path,
                                             cluster: SlurmCluster) -> None:
    env = slurm_env(cluster)
    del env["JOBD_SLURM_SHARED_CHECK"]  # the default: fail
    daemon = Daemon(zipapp, tmp_path, **env)
    with pytest.raises(AssertionError, match="daemon exited"):
        daemon.start()
    assert daemon.stop() != 0
    log = daemon.log()
    assert "DATAPATH must be on storage shared with the Slurm compute nodes" in log
    assert "is under /tmp" in log and "JOBD_SLURM_SHARED_CHECK=warn" in log


# -- in process: the manager's calls the classic protocol does not have ----------------------


class InProcess:
    """A JobManager of this process on the real cluster (what the HTTP routes call)."""

    def __init__(self, root: Path, **settings: Any) -> None:
        defaults: dict[str, Any] = {
            "datapath": root / "data", "db_path": root / "db", "slurm": True,
            "slurm_shared_check": "warn", "slurm_poll_interval": 0.3, "fsync": False,
            "kill_grace": 5.0, "allow_root": True}  # Slurm runs jobs as the submitter
        defaults.update(settings)
        self.config = Config(**defaults)

    async def __aenter__(self) -> InProcess:
        self.store = JobStore(self.config.db_path, fsync=False)
        self.reaper = Reaper(adopt_orphans=False)
        self.reaper.start()
        self.manager = JobManager(self.config, self.store, self.reaper)
        await self.manager.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.manager.stop()
        await self.reaper.stop()
        self.store.close()

    async def create(self, job_id: str, script: str, **options: Any) -> dict[str, Any]:
        upload = self.manager.data.new_incoming()
        upload.write_bytes(make_zip({"run.sh": script}))
        return await self.manager.create(job_id, upload, protocol="native", executor="slurm",
                                         options=options)

    async def wait(self, job_id: str, predicate: Callable[[dict[str, Any]], bool],
                   what: str, timeout: float = 60.0) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            record = self.manager.get(job_id)
            if predicate(record):
                return record
            if loop.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {record}")
            await asyncio.sleep(0.05)

    async def finished(self, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
        return await self.wait(job_id, lambda r: job.is_terminal(r["status"]),
                               f"{job_id} to finish", timeout)


async def _in_thread(function: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


def test_cancel_running_and_pending(cluster: SlurmCluster, gates: Path, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcess(tmp_path / "a") as jobd:
            script = gated(gates, "never", before="trap 'echo got TERM; exit 7' TERM")
            await jobd.create("running", script)
            running = await jobd.wait("running", lambda r: r["status"] == job.RUNNING,
                                      "running to run in Slurm")
            record, changed = await jobd.manager.cancel("running")
            assert changed and record["status"] == job.CANCELLED
            assert record["message"] == "job cancelled"
            found = await _in_thread(slurm_jobs, cluster, "running")
            assert found[str(running["slurm_id"])]["state"] == "CANCELLED"
            assert "got TERM" in (jobd.manager.files("running").log.read_text())
            assert (await jobd.manager.cancel("running"))[1] is False  # idempotent
        # A job Slurm holds back: cancelled while pending.
        async with InProcess(tmp_path / "b", slurm_extra=("--begin=now+3600",)) as jobd:
            await jobd.create("pending", "#!/bin/sh\necho should not run\n")
            record = await jobd.wait("pending", lambda r: "BeginTime" in r["message"],
                                     "pending to wait for its begin time")
            assert record["status"] == job.PREPARED and record["slurm_id"]
            record, changed = await jobd.manager.cancel("pending")
            assert changed and record["status"] == job.CANCELLED
            found = await _in_thread(slurm_jobs, cluster, "pending")
            assert found[str(record["slurm_id"])]["state"] == "CANCELLED"
            assert jobd.manager.files("pending").result.exists()

    asyncio.run(scenario())


def test_controller_outage_keeps_jobs_then_completes(cluster: SlurmCluster, gates: Path,
                                                     tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcess(tmp_path, slurm_command_timeout=3.0, kill_grace=1.0) as jobd:
            await jobd.create("through", gated(gates, "through", after="echo ok > out.txt"))
            await jobd.create("stopme", gated(gates, "never"))
            before = await jobd.wait("through", lambda r: r["status"] == job.RUNNING,
                                     "through to run")
            await jobd.wait("stopme", lambda r: r["status"] == job.RUNNING, "stopme to run")
            await _in_thread(cluster.stop_controller)
            try:
                record = await jobd.wait("through", lambda r: "unreachable" in r["message"],
                                         "the message to say why", 60)
                assert record["status"] == job.RUNNING
                assert "keeps its state" in record["message"]
                await jobd.create("during", "#!/bin/sh\necho submitted late > out.txt\n")
                record = await jobd.wait("during", lambda r: "unreachable" in r["message"],
                                         "the new job to wait for the controller", 60)
                assert record["status"] == job.PREPARED and record["slurm_id"] is None
                assert jobd.manager.get("through")["status"] == job.RUNNING
                # A job waiting for the controller can still be cancelled, at once.
                await jobd.create("dropped", "#!/bin/sh\necho must not run\n")
                await jobd.wait("dropped", lambda r: "unreachable" in r["message"],
                                "dropped to wait for the controller", 60)
                record, changed = await asyncio.wait_for(jobd.manager.cancel("dropped"), 30)
                assert changed and record["status"] == job.CANCELLED
                # A running job's scancel cannot get through: cancel answers, the job keeps
                # its status, and the scancel stays owed until the controller is back.
                record, changed = await asyncio.wait_for(jobd.manager.cancel("stopme"), 60)
                assert changed and record["status"] == job.RUNNING
                assert record["message"].startswith("cancel requested: waiting for Slurm")
            finally:
                await _in_thread(cluster.start_controller)
            (gates / "through").touch()
            through = await jobd.finished("through", 90)
            during = await jobd.finished("during", 90)
            assert through["status"] == job.SUCCESS, through
            assert through["slurm_id"] == before["slurm_id"]
            assert during["status"] == job.SUCCESS, during
            assert len(await _in_thread(slurm_jobs, cluster, "during")) == 1
            assert await _in_thread(slurm_jobs, cluster, "dropped") == {}
            stopped = await jobd.finished("stopme", 90)
            assert stopped["status"] == job.CANCELLED, stopped

    asyncio.run(scenario())


def test_unreachable_past_the_deadline_fails(cluster: SlurmCluster, gates: Path,
                                             tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcess(tmp_path, slurm_command_timeout=2.0,
                             slurm_unreachable_deadline=3.0) as jobd:
            await jobd.create("lost", gated(gates, "lost"))
            await jobd.wait("lost", lambda r: r["status"] == job.RUNNING, "lost to run")
            await _in_thread(cluster.stop_controller)
            try:
                record = await jobd.finished("lost", 60)
            finally:
                await _in_thread(cluster.start_controller)
                (gates / "lost").touch()
            assert record["status"] == job.FAILED
            assert "Slurm controller unreachable for" in record["message"]
            assert "JOBD_SLURM_UNREACHABLE_DEADLINE" in record["message"]

    asyncio.run(scenario())


def test_resources_reach_sbatch_and_bad_ones_are_refused(cluster: SlurmCluster,
                                                         tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcess(tmp_path) as jobd:
            await jobd.create("sized", "#!/bin/sh\nenv > env.txt\n", cpus=3, memory="64M",
                              timeout=30)
            record = await jobd.finished("sized")
            assert record["status"] == job.SUCCESS, record
            found = (await _in_thread(slurm_jobs, cluster, "sized"))[str(record["slurm_id"])]
            assert found["cpus"] == "3" and found["time_limit"] == "2:00"
            for bad in ({"cpus": "2 --wrap=x"}, {"cpus": 0}, {"memory": "1G;rm"},
                        {"gpus": "a100:2 --x"}, {"timeout": "soon"}):
                with pytest.raises(OptionError):
                    await jobd.create("bad", "#!/bin/sh\n", **bad)
                assert not jobd.manager.exists("bad")
            # Slurm itself refuses: this cluster has no GPUs.
            await jobd.create("gpu", "#!/bin/sh\ntrue\n", gpus=1)
            record = await jobd.finished("gpu")
            assert record["status"] == job.FAILED
            assert record["message"].startswith("could not submit the job to Slurm: sbatch "
                                                 "refused the job:"), record
            assert jobd.manager.get("gpu")["slurm_id"] is None

    asyncio.run(scenario())


def test_exit_status_fallbacks(cluster: SlurmCluster, tmp_path: Path) -> None:
    """scontrol for a finished job's exit status; no accounting on this cluster."""
    async def scenario() -> None:
        async with InProcess(tmp_path) as jobd:
            await jobd.create("five", "#!/bin/sh\nexit 5\n")
            record = await jobd.finished("five")
            slurm = jobd.manager.slurm
            assert slurm is not None
            assert await slurm.has_accounting() is False
            assert await slurm.scontrol_status(record["slurm_id"]) == ("FAILED", 5, None)
            assert await slurm.scontrol_status(999_999) is None

    asyncio.run(scenario())


def test_crash_between_sbatch_and_the_record_write(cluster: SlurmCluster, gates: Path,
                                                   tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The Slurm id never reached the record: the next start finds the submission by its
    token instead of submitting again."""
    async def scenario() -> None:
        async with InProcess(tmp_path) as jobd:
            await jobd.create("unsure", gated(gates, "unsure", after="echo once >> ../count"))
            first = await jobd.wait("unsure", lambda r: r["status"] == job.RUNNING,
                                    "unsure to run")
        # What a crash right after sbatch leaves: PREPARED, no Slurm id, the token on disk.
        with JobStore(tmp_path / "db", fsync=False) as store:
            store.update("unsure", {"status": job.PREPARED, "slurm_id": None,
                                    "message": "preparing the job for Slurm"})
        async with InProcess(tmp_path) as jobd:
            found = await jobd.wait("unsure", lambda r: r["slurm_id"] is not None,
                                    "the submission to be found again")
            assert found["slurm_id"] == first["slurm_id"]
            (gates / "unsure").touch()
            record = await jobd.finished("unsure")
            assert record["status"] == job.SUCCESS, record
        assert list(await _in_thread(slurm_jobs, cluster, "unsure")) == [
            str(first["slurm_id"])]
        assert (tmp_path / "data" / "unsure" / "count").read_text() == "once\n"

    with caplog.at_level(logging.INFO, logger="jobd.jobs"):
        asyncio.run(scenario())
    assert "found again after a restart" in caplog.text
