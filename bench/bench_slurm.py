"""What the Slurm executor costs: submit-to-Slurm latency and the price of one tracking poll.

    sudo .venv/bin/python bench/bench_slurm.py [--jobs 500] [--latency-samples 50] [--polls 20]

Starts its own single-node Slurm (tests/slurm_cluster.py: munged, slurmctld, slurmd as root,
nothing installed) and an in-process JobManager with the Slurm executor, then measures:

1. **Submit latency**: from `JobManager.create` returning to the Slurm job id being stored
   (scheduling, unpacking, the batch script, sbatch, the durable record write), one job at a
   time on an idle daemon; and the wall time to get `--jobs` jobs submitted at once.
2. **Tracking cost with `--jobs` active jobs** (all held pending by `--begin`, so the set stays
   the same while measuring): one poll is one `squeue` for every job. Per poll: wall time, jobd's
   own CPU (parsing, bookkeeping), squeue's CPU (a child process) and slurmctld's CPU (the
   server side of the query, from /proc). The peer is what the poll replaces: one `squeue -j`
   per job.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobd.config import Config
from jobd.manager import JobManager
from jobd.reaper import Reaper
from jobd.store import JobStore
from tests.conftest import make_zip
from tests.slurm_cluster import SlurmCluster, missing_reason

SCRIPT = make_zip({"run.sh": "#!/bin/sh\necho bench\n"})


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Bench:
    def __init__(self, root: Path, cluster: SlurmCluster, **settings: Any) -> None:
        self.cluster = cluster
        self.config = Config(datapath=root / "data", db_path=root / "db", slurm=True,
                             slurm_shared_check="off", slurm_poll_interval=3600.0,
                             fsync=True, access_log=False, **settings)

    async def __aenter__(self) -> Bench:
        self.store = JobStore(self.config.db_path, fsync=self.config.fsync)
        self.reaper = Reaper(adopt_orphans=False)
        self.reaper.start()
        self.manager = JobManager(self.config, self.store, self.reaper)
        await self.manager.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.manager.stop()
        await self.reaper.stop()
        self.store.close()

    async def create(self, job_id: str) -> None:
        upload = self.manager.data.new_incoming()
        upload.write_bytes(SCRIPT)
        await self.manager.create(job_id, upload, protocol="native", executor="slurm")

    async def submitted(self, job_ids: list[str], timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(self.manager.get(j).get("slurm_id") for j in job_ids):
            if time.monotonic() > deadline:
                raise RuntimeError("jobs not submitted in time")
            await asyncio.sleep(0.001)


async def latency(cluster: SlurmCluster, root: Path, samples: int) -> list[float]:
    """Seconds from create() to a stored Slurm id, one job at a time."""
    taken: list[float] = []
    async with Bench(root, cluster, slurm_extra=("--begin=now+3600",)) as bench:
        for i in range(samples):
            started = time.perf_counter()
            await bench.create(f"lat-{i}")
            await bench.submitted([f"lat-{i}"])
            taken.append(time.perf_counter() - started)
    cluster.run("scancel", "--user=root")
    return taken


async def tracking(cluster: SlurmCluster, root: Path, jobs: int, polls: int,
                   ctld_pid: int) -> dict[str, Any]:
    async with Bench(root, cluster, slurm_extra=("--begin=now+3600",)) as bench:
        names = [f"poll-{i}" for i in range(jobs)]
        started = time.perf_counter()
        for name in names:
            await bench.create(name)
        await bench.submitted(names)
        burst = time.perf_counter() - started
        slurm = bench.manager.slurm
        assert slurm is not None and slurm.active == jobs
        await slurm.poll()  # warm up: first messages written
        wall, own, child, ctld = [], [], [], []
        for _ in range(polls):
            c0, p0, s0, w0 = children_cpu(), time.process_time(), proc_cpu(ctld_pid), \
                time.perf_counter()
            await slurm.poll()
            wall.append(time.perf_counter() - w0)
            own.append(time.process_time() - p0)
            child.append(children_cpu() - c0)
            ctld.append(proc_cpu(ctld_pid) - s0)
        ids = sorted(int(bench.manager.get(n)["slurm_id"]) for n in names)
        out = cluster.run("squeue", "--jobs=" + ",".join(map(str, ids)), "--states=all",
                          "--noheader", "--Format=JobID:|,State:|,exit_code:|,StartTime:|,"
                          "NodeList:|,Reason:|").stdout
    return {
        "jobs": jobs, "submit_burst_s": burst, "squeue_output_bytes": len(out),
        "poll_wall_ms_median": statistics.median(wall) * 1000,
        "poll_wall_ms_p95": quantile(wall, 0.95) * 1000,
        # CPU clocks tick every 10 ms: means over all polls, not medians of ticks.
        "poll_jobd_cpu_ms_mean": sum(own) / polls * 1000,
        "poll_squeue_cpu_ms_mean": sum(child) / polls * 1000,
        "poll_slurmctld_cpu_ms_mean": sum(ctld) / polls * 1000,
        "slurm_ids": ids,
    }


def naive(cluster: SlurmCluster, ids: list[int], ctld_pid: int) -> dict[str, float]:
    """The peer: one squeue per job, as a per-job tracker would run every interval."""
    c0, s0, w0 = children_cpu(), proc_cpu(ctld_pid), time.perf_counter()
    for slurm_id in ids:
        subprocess.run(["squeue", f"--jobs={slurm_id}", "--states=all", "--noheader"],
                       env=cluster.env, capture_output=True, check=True)
    return {"wall_s": time.perf_counter() - w0, "squeue_cpu_s": children_cpu() - c0,
            "slurmctld_cpu_s": proc_cpu(ctld_pid) - s0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--latency-samples", type=int, default=50)
    parser.add_argument("--polls", type=int, default=20)
    args = parser.parse_args()
    reason = missing_reason()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="jobd-bench-slurm-"))
    os.chmod(root, 0o755)  # munged wants every directory above its socket searchable
    cluster = SlurmCluster(root / "cluster").start()
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        ctld_pid = cluster.procs["slurmctld"].pid
        lat = asyncio.run(latency(cluster, root / "latency", args.latency_samples))
        track = asyncio.run(tracking(cluster, root / "tracking", args.jobs, args.polls,
                                     ctld_pid))
        track["naive_one_squeue_per_job"] = naive(cluster, track.pop("slurm_ids"), ctld_pid)
        cluster.run("scancel", "--user=root")
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "submit_latency_ms": {"samples": len(lat),
                              "median": statistics.median(lat) * 1000,
                              "p95": quantile(lat, 0.95) * 1000,
                              "max": max(lat) * 1000},
        "tracking": track,
        "machine": {"cpus": os.cpu_count(), "load_1m": os.getloadavg()[0]},
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
