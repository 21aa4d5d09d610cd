"""kill -9 of the whole "container" (daemon and every job process) at random moments, many
times, while uploads arrive: every acknowledged job completes with its output, no job runs
twice at the same time, the database always opens.

JOBD_TORTURE_ROUNDS sets the number of rounds (default 20); JOBD_TORTURE_SEED replays one run.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from jobd.cgroup import own_cgroup, tree_name
from jobd.run import leftover_processes
from tests.conftest import (
    Daemon,
    alive,
    read_events,
    remove_cgroups,
    report,
    result_files,
    wait_until,
)

ROUNDS = int(os.environ.get("JOBD_TORTURE_ROUNDS", "20"))

pytestmark = pytest.mark.system


class ContainerDaemon(Daemon):
    """The daemon in a session of its own, like a container's process tree."""

    def start(self, timeout: float = 60.0) -> ContainerDaemon:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the process
        self.proc = subprocess.Popen([str(self.zipapp)], env=self.env, cwd=self.workdir,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_until(self._healthy, timeout, 0.05, "the daemon to answer /health")
        return self

    def kill_container(self) -> int:
        """kill -9 the daemon and every process of its jobs; returns how many jobs' processes.

        Jobs run in sessions of their own, so they are found by their environment (and, when
        the daemon uses one, by its cgroup) until none is left.
        """
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._log.close()
        own = own_cgroup()
        tree = own / tree_name(self.datapath) if own is not None else None
        killed: set[int] = set()
        quiet = 0
        while quiet < 3:  # three empty scans in a row: nothing is forking any more
            found = [p for p in leftover_processes(self.datapath) if alive(p)]
            if tree is not None and (tree / "cgroup.kill").exists():
                (tree / "cgroup.kill").write_text("1")
            for pid in found:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
            killed.update(found)
            quiet = 0 if found else quiet + 1
            time.sleep(0.01)
        wait_until(lambda: not any(alive(p) for p in killed), 10, what="the jobs to die")
        return len(killed)


QUICK = "echo $JOBD_JOB_ID > out.txt\n"
SLOW = "sleep {seconds}\necho $JOBD_JOB_ID > out.txt\n"


def test_kill_9_at_random_moments(zipapp: Path, open_dir: Path) -> None:
    seed = int(os.environ.get("JOBD_TORTURE_SEED", str(int(time.time()))))
    rng = random.Random(seed)
    print(f"torture: {ROUNDS} rounds, seed {seed}")
    shared = open_dir / "shared"
    where = open_dir / "d"
    where.mkdir()
    env = {"JOBD_ALLOW_ROOT": "false", "JOBD_MAX_ATTEMPTS": "1000", "JOBD_POLL_INTERVAL": "0.2",
           "JOBD_SHUTDOWN_GRACE": "1s"}
    acknowledged: dict[str, str] = {}
    kills: list[float] = []
    began = time.monotonic()
    counter = 0
    processes_killed = 0
    for round_no in range(ROUNDS):
        daemon = ContainerDaemon(zipapp, where, JOBD_SLOTS=str(rng.randint(1, 3)), **env)
        daemon.start()  # the database opened: damage would stop it here
        stop = threading.Event()
        batch: list[tuple[str, str]] = []
        for _ in range(rng.randint(4, 10)):
            counter += 1
            slow = rng.random() < 0.4
            script = SLOW.format(seconds=round(rng.uniform(0.3, 2.5), 2)) if slow else QUICK
            batch.append((f"r{round_no}j{counter}", script))

        def upload(jobs: list[tuple[str, str]] = batch, d: Daemon = daemon,
                   halt: threading.Event = stop) -> None:
            for job_id, script in jobs:
                if halt.is_set():
                    return
                body = report(shared, "start") + script + report(shared, "end")
                try:
                    response = d.upload(job_id, {"run.sh": body})
                except httpx.TransportError:
                    return  # killed under it: not acknowledged
                if response.status_code == 201:
                    acknowledged[job_id] = script
                time.sleep(rng.uniform(0, 0.15))

        uploader = threading.Thread(target=upload)
        uploader.start()
        time.sleep(rng.uniform(0.2, 2.5))
        processes_killed += daemon.kill_container()
        kills.append(time.time())
        stop.set()
        uploader.join(60)
        daemon.client.close()
    crashed = time.monotonic() - began

    final = ContainerDaemon(zipapp, where, JOBD_SLOTS="3", **env).start()
    try:
        for job_id in acknowledged:
            response = final.wait_done(job_id, timeout=180)
            record = response.json()
            assert record["Status"] == "SUCCESS", (job_id, record["Message"])
            assert result_files(response)["out.txt"].decode().strip() == job_id
        assert final.stop(signal.SIGTERM) == 0
    finally:
        if final.proc is not None and final.proc.poll() is None:
            final.kill_container()
        final.client.close()
        remove_cgroups(final.datapath)

    # No job ran twice at once: its runs' [start, end] intervals never overlap (a run killed
    # with the container ends at that round's kill).
    runs: dict[str, list[tuple[float, float]]] = {}
    open_runs: dict[tuple[str, int], float] = {}
    for kind, job_id, pid, when, _ in read_events(shared):
        if kind == "start":
            open_runs[(job_id, pid)] = when
        else:
            runs.setdefault(job_id, []).append((open_runs.pop((job_id, pid)), when))
    for (job_id, _), started in open_runs.items():
        killed_at = next(k for k in kills if k >= started)
        runs.setdefault(job_id, []).append((started, killed_at))
    for job_id, spans in runs.items():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert start >= end, f"job {job_id} ran twice at once: {spans}"
    reruns = sum(len(s) - 1 for s in runs.values())
    total = time.monotonic() - began
    print(f"torture: {ROUNDS} rounds in {crashed:.1f}s, {len(acknowledged)} jobs acknowledged, "
          f"{processes_killed} job processes killed, {reruns} runs repeated after a kill, "
          f"all complete after {total:.1f}s")
