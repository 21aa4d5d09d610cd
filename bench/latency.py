"""Start latency: upload-to-start of sequential jobs on an idle daemon, against the floor.

"Started" is when `run.sh` itself runs: its only command is `exec date +%s%N > MARKS/<id>`,
so the mark holds CLOCK_REALTIME read by `date` inside the job's process. The client reads
the same clock just before it sends the upload's first byte. Both ends are on this machine,
so the difference is upload + validate + store + schedule + unpack + spawn + shell start.
The floor is the same `run.sh` spawned by this process with the same Popen flags as jobd
(new session, close_fds, /dev/null stdin, log file out), timed the same way: the difference
between the two is jobd's own cost. The error of the method is the few µs between reading
the clock and the send, and `date`'s own start-up, which the floor pays too.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from base64 import b64encode
from pathlib import Path

from bench.daemon import Jobd
from bench.figures import median, ms, percentile, ratio
from bench.report import Section
from bench.zips import make_zip

SCRIPT = '#!/bin/sh\nexec date +%s%N > {marks}/"$JOBD_JOB_ID"\n'


def _read_mark(path: Path, timeout: float = 30.0) -> int:
    """The nanosecond stamp `date` wrote (poll: the shell creates the file before date runs)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            text = b""
        if text.endswith(b"\n"):
            return int(text)
        if time.monotonic() > deadline:
            raise RuntimeError(f"no start mark in {path} after {timeout}s")
        time.sleep(0.0005)


def floor(workdir: Path, marks: Path, n: int) -> list[float]:
    """Seconds from Popen to the script's first command, spawning run.sh directly."""
    work = workdir / "floor"
    work.mkdir(parents=True, exist_ok=True)
    script = work / "run.sh"
    script.write_text(SCRIPT.format(marks=marks))
    script.chmod(0o755)
    out = []
    for i in range(n):
        job_id = f"floor-{time.time_ns()}-{i}"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "JOBD_JOB_ID": job_id}
        log_fd = os.open(work / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC)
        try:
            sent = time.time_ns()
            proc = subprocess.Popen(["./run.sh"], cwd=work, env=env, stdin=subprocess.DEVNULL,
                                    stdout=log_fd, stderr=log_fd, start_new_session=True,
                                    close_fds=True)
        finally:
            os.close(log_fd)
        proc.wait()
        out.append((_read_mark(marks / job_id) - sent) / 1e9)
        time.sleep(0.005)
    return out


def through_jobd(daemon: Jobd, marks: Path, n: int, tag: str) -> dict[str, list[float]]:
    """Upload `n` jobs one after the other, each once the previous one is fully done."""
    b64 = b64encode(make_zip({"run.sh": SCRIPT.format(marks=marks)})).decode()
    starts, acks, recorded = [], [], []
    with daemon.conn() as conn:
        for i in range(n):
            job_id = f"lat-{tag}-{i}"
            body = json.dumps({"id": job_id, "input": b64}).encode()
            sent = time.time_ns()
            answer = conn.request("POST", "/api/upload", body)
            acked = time.time_ns()
            if answer.status != 201:
                raise RuntimeError(f"upload {job_id}: {answer.status} {answer.body[:200]!r}")
            started = _read_mark(marks / job_id)
            while True:  # wait until the job is packed and recorded: the daemon is idle again
                got = conn.request("GET", f"/api/get/{job_id}")
                if got.status == 200:
                    break
                time.sleep(0.002)
            record = json.loads(got.body)
            if record["Status"] != "SUCCESS":
                raise RuntimeError(f"job {job_id}: {record['Status']} {record['Message']}")
            starts.append((started - sent) / 1e9)
            acks.append((acked - sent) / 1e9)
            time.sleep(0.005)
    return {"start": starts, "ack": acks, "recorded": recorded}


def run(workdir: Path, *, jobs: int = 100, repeats: int = 3, stored: int = 10_000,
        env: dict[str, str] | None = None) -> Section:
    section = Section(f"1. Start latency: {jobs} sequential jobs, {stored:,} stored, "
                      f"median of {repeats} runs")
    marks = workdir / "marks"
    marks.mkdir(parents=True, exist_ok=True)
    stats: dict[str, list[float]] = {k: [] for k in
                                     ("p50", "p90", "p99", "f50", "f90", "f99", "ack50", "ack99")}
    with Jobd(workdir / "jobd", stored=stored, **(env or {})) as daemon:
        through_jobd(daemon, marks, 5, "warm")  # first-use imports and caches are not latency
        for r in range(repeats):
            floor_s = floor(workdir, marks, jobs)
            got = through_jobd(daemon, marks, jobs, str(r))
            for name, p in (("50", 50), ("90", 90), ("99", 99)):
                stats["p" + name].append(percentile(got["start"], p))
                stats["f" + name].append(percentile(floor_s, p))
            stats["ack50"].append(percentile(got["ack"], 50))
            stats["ack99"].append(percentile(got["ack"], 99))
    m = {k: median(v) for k, v in stats.items()}
    targets = {"50": 0.005, "90": None, "99": 0.020}
    for name in ("50", "90", "99"):
        target = targets[name]
        section.add(f"upload-to-start p{name}", ms(m["p" + name]),
                    f"spawn run.sh directly: {ms(m['f' + name])}",
                    ratio(m["p" + name], m["f" + name]),
                    f"≤ {ms(target)}" if target else "",
                    None if target is None else m["p" + name] <= target)
    section.add("upload answered (201) p50 / p99", f"{ms(m['ack50'])} / {ms(m['ack99'])}")
    section.notes.append(
        "started = CLOCK_REALTIME read by `date` as run.sh's first command, minus the client's "
        "clock just before sending the upload; the floor spawns the same run.sh with jobd's "
        "Popen flags and is timed the same way (see bench/latency.py)")
    return section
