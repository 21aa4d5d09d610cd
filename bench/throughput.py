"""Throughput: trivial jobs end to end from concurrent clients, against webhook.

A jobd job is: upload (201), then `GET /api/get/{id}?wait=30` (jobd's long poll: one
request that answers when the job is done, with the result as base64 zip). A classic client
that polls every `poll` seconds instead is measured too (its many requests cost the daemon).
A webhook job is one request whose answer waits for the same script. Both are driven by the
same raw-socket client (bench/wire.py), one keep-alive connection per client thread, in the
same run. The client's own CPU is measured and
reported; webhook is also driven by `wrk` (C, next to no client cost) when installed.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bench.daemon import (
    Jobd,
    children_cpu_seconds,
    cpu_seconds,
    free_port,
    helper_cpu_seconds,
    helpers,
    machine_busy_seconds,
    proc_status_kib,
)
from bench.figures import median, ms, ratio
from bench.report import Section
from bench.wire import Conn
from bench.zips import make_zip

SCRIPT = "#!/bin/sh\necho ok > out.txt\n"


@dataclass
class Rate:
    jobs: int
    seconds: float
    client_cpu: float  # seconds of this process's CPU during the run
    requests: int
    machine_cpu: float = 0.0  # seconds of CPU all cores were busy during the run
    server_cpu: float = 0.0  # the server process's own CPU (`server` of _drive)
    jobs_cpu: float = 0.0  # its children's, once waited for (the jobs' processes)
    helper_cpu: float = 0.0  # its fsync helper process's (jobd/syncer.py), part of server_cpu

    @property
    def per_second(self) -> float:
        return self.jobs / self.seconds if self.seconds else 0.0


class Job(Protocol):
    address: tuple[str, int]

    def __call__(self, conn: Conn, thread: int, k: int) -> int: ...


def _drive(clients: int, seconds: float, one_job: Job, server: int | None = None) -> Rate:
    """Run `one_job(conn, thread, k)` in `clients` threads until `seconds` pass; with
    `server` (a pid), its CPU and its children's are measured too."""
    counts = [0] * clients
    requests = [0] * clients
    errors: list[BaseException] = []
    begin = threading.Barrier(clients + 1)
    deadline = [0.0]

    def worker(t: int) -> None:
        try:
            with Conn(*one_job.address) as conn:
                begin.wait()
                k = 0
                while time.perf_counter() < deadline[0]:
                    requests[t] += one_job(conn, t, k)
                    counts[t] += 1
                    k += 1
        except BaseException as exc:
            errors.append(exc)
            begin.abort()

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(clients)]
    for thread in threads:
        thread.start()
    cpu0 = time.process_time()
    machine0 = machine_busy_seconds()
    server0 = _server_cpu(server)
    start = time.perf_counter()
    deadline[0] = start + seconds  # before the clients are let go: they read it at once
    begin.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    machine = machine_busy_seconds() - machine0
    server1 = _server_cpu(server)
    if errors:
        raise RuntimeError(f"a client failed: {errors[0]!r}") from errors[0]
    return Rate(sum(counts), elapsed, cpu, sum(requests), machine,
                server1[0] - server0[0], server1[1] - server0[1], server1[2] - server0[2])


def _server_cpu(server: int | None) -> tuple[float, float, float]:
    """(the server's CPU with its fsync helper's, its jobs', the helper's alone) so far."""
    if not server:
        return 0.0, 0.0, 0.0
    helper = helper_cpu_seconds(server)
    return cpu_seconds(server) + helper, children_cpu_seconds(server), helper


class JobdJob:
    """upload, poll, fetch and check one trivial job; returns the number of requests."""

    def __init__(self, daemon: Jobd, poll: float | None, tag: str) -> None:
        """`poll`: seconds between classic polls, or None for one long poll (`?wait=`)."""
        self.address = ("127.0.0.1", daemon.port)
        self.poll = poll
        self.tag = tag
        b64 = base64.b64encode(make_zip({"run.sh": SCRIPT})).decode()
        self.head = b'{"id":"'
        self.tail = f'","input":"{b64}"}}'.encode()

    def __call__(self, conn: Conn, thread: int, k: int) -> int:
        job_id = f"tp-{self.tag}-{thread}-{k}"
        answer = conn.request("POST", "/api/upload", self.head + job_id.encode() + self.tail)
        if answer.status != 201:
            raise RuntimeError(f"upload {job_id}: {answer.status} {answer.body[:200]!r}")
        n = 1
        while True:
            if self.poll is None:
                answer = conn.request("GET", f"/api/get/{job_id}?wait=30")
            else:
                time.sleep(self.poll)
                answer = conn.request("GET", f"/api/get/{job_id}")
            n += 1
            if answer.status != 202:
                break
        if answer.status != 200 or b'"Status":"SUCCESS"' not in answer.body:
            raise RuntimeError(f"job {job_id}: {answer.status} {answer.body[:300]!r}")
        if k % 64 == 0:  # check a sample of results completely; the rest by status
            output = json.loads(answer.body)["Output"]
            with zipfile.ZipFile(io.BytesIO(base64.b64decode(output))) as archive:
                if archive.read("out.txt") != b"ok\n":
                    raise RuntimeError(f"job {job_id}: wrong out.txt")
        return n


class WebhookJob:
    def __init__(self, port: int) -> None:
        self.address = ("127.0.0.1", port)

    def __call__(self, conn: Conn, thread: int, k: int) -> int:
        answer = conn.request("POST", "/hooks/run", b"{}")
        if answer.status != 200:
            raise RuntimeError(f"webhook: {answer.status} {answer.body[:200]!r}")
        return 1


class Webhook:
    """The Debian `webhook` running the same script per request."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.dir = workdir / "webhook"
        (self.dir / "work").mkdir(parents=True, exist_ok=True)
        script = self.dir / "run.sh"
        script.write_text(SCRIPT)
        script.chmod(0o755)
        hooks = [{"id": "run", "execute-command": str(script),
                  "command-working-directory": str(self.dir / "work"),
                  "include-command-output-in-response": True}]
        (self.dir / "hooks.json").write_text(json.dumps(hooks))
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Webhook:
        log = open(self.dir / "webhook.log", "wb")  # the child keeps it
        try:
            self.proc = subprocess.Popen(
                ["webhook", "-hooks", str(self.dir / "hooks.json"), "-ip", "127.0.0.1",
                 "-port", str(self.port)], stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        deadline = time.monotonic() + 20
        while True:
            try:
                with Conn("127.0.0.1", self.port, timeout=2) as conn:
                    if conn.request("POST", "/hooks/run", b"{}").status == 200:
                        return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise
            time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


def wrk_rate(url: str, clients: int, seconds: float, workdir: Path) -> float | None:
    """Requests/s of `wrk` POSTing to `url` with `clients` connections (None without wrk)."""
    if not shutil.which("wrk"):
        return None
    script = workdir / "post.lua"
    script.write_text('wrk.method = "POST"\nwrk.body = "{}"\n'
                      'wrk.headers["Content-Type"] = "application/json"\n')
    out = subprocess.run(["wrk", f"-t{min(2, clients)}", f"-c{clients}",
                          f"-d{max(1, round(seconds))}s", "-s", str(script), url],
                         capture_output=True, text=True, timeout=seconds + 60, check=True)
    found = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    if not found:
        raise RuntimeError(f"cannot read wrk's output:\n{out.stdout}")
    return float(found.group(1))


def run(workdir: Path, *, clients: int = 8, seconds: float = 10.0, repeats: int = 3,
        stored: int = 10_000, poll: float = 0.002, env: dict[str, str] | None = None) -> Section:
    section = Section(f"2. Throughput: trivial jobs end to end, {clients} clients, "
                      f"{stored:,} stored, {seconds:g} s per run, median of {repeats} runs")
    has_webhook = shutil.which("webhook") is not None
    jobd_rates: list[Rate] = []
    polling_rates: list[Rate] = []
    hook_rates: list[Rate] = []
    wrk_rates: list[float] = []
    with Jobd(workdir / "jobd", stored=stored, **(env or {})) as daemon:
        _drive(clients, min(1.0, seconds), JobdJob(daemon, None, "warm"))
        for r in range(repeats):
            jobd_rates.append(_drive(clients, seconds, JobdJob(daemon, None, str(r)),
                                     daemon.pid))
            polling_rates.append(_drive(clients, seconds, JobdJob(daemon, poll, f"p{r}")))
            if has_webhook:
                with Webhook(workdir) as hook:
                    assert hook.proc is not None
                    hook_rates.append(_drive(clients, seconds, WebhookJob(hook.port),
                                             hook.proc.pid))
                    rate = wrk_rate(f"http://127.0.0.1:{hook.port}/hooks/run", clients,
                                    seconds, workdir)
                    if rate is not None:
                        wrk_rates.append(rate)
        rss = daemon.status_kib("VmHWM")
        helper_rss = [proc_status_kib(pid, "VmHWM") for pid in helpers(daemon.pid)]
    jobd_rate = median([r.per_second for r in jobd_rates])
    hook_rate = median([r.per_second for r in hook_rates]) if hook_rates else 0.0
    section.add("jobs/s (upload, run, result fetched with ?wait=)", f"{jobd_rate:.0f}",
                f"webhook, same client: {hook_rate:.0f}/s" if has_webhook else
                "webhook not installed", ratio(jobd_rate, hook_rate) if has_webhook else "",
                "≥ 300/s and ≥ 0.2x webhook",
                jobd_rate >= 300 and (not has_webhook or jobd_rate >= hook_rate / 5))
    if wrk_rates:
        section.add("webhook driven by wrk (no client cost)", "", f"{median(wrk_rates):.0f}/s",
                    ratio(jobd_rate, median(wrk_rates)))
    polling = median([r.per_second for r in polling_rates])
    section.add(f"jobs/s, classic client polling every {ms(poll)} instead", f"{polling:.0f}",
                f"webhook: {hook_rate:.0f}/s" if has_webhook else "",
                ratio(polling, hook_rate) if has_webhook else "")
    per_job = median([r.requests / max(r.jobs, 1) for r in polling_rates])
    section.add("requests per job of the polling client (upload + polls + fetch)",
                f"{per_job:.1f}")
    cpu = median([r.client_cpu / r.seconds for r in jobd_rates])
    cpu_job = median([r.client_cpu / max(r.jobs, 1) for r in jobd_rates])
    section.add("client CPU while driving jobd", f"{cpu * 100:.0f}% of a core, "
                f"{ms(cpu_job)} per job")
    if hook_rates:
        section.add("client CPU while driving webhook", "",
                    f"{median([r.client_cpu / r.seconds for r in hook_rates]) * 100:.0f}% "
                    "of a core")
    section.add("jobd peak RSS during the runs", f"{rss / 1024:.1f} MiB",
                f"its fsync helper process: {max(helper_rss) / 1024:.1f} MiB" if helper_rss
                else "no fsync helper process")
    _cpu_rows(section, jobd_rates, hook_rates)
    section.notes.append(
        f"each client uploads, then asks once with ?wait=30 (or polls every {ms(poll)}, "
        f"second row); the client and the daemon share the machine's {os.cpu_count()} cores "
        "(the client's CPU is reported above)")
    return section


def _cpu_rows(section: Section, jobd: list[Rate], hook: list[Rate]) -> None:
    """Where each job's CPU goes, in the same runs: what bounds the rate."""
    def per_job(rates: list[Rate], field: str) -> float:
        return median([getattr(r, field) / max(r.jobs, 1) for r in rates])

    cores = os.cpu_count() or 1
    hook_server = f"webhook: {ms(per_job(hook, 'server_cpu'))}" if hook else ""
    section.add("CPU per job: the server process and its fsync helper",
                ms(per_job(jobd, "server_cpu")), hook_server)
    section.add("CPU per job: of which the fsync helper process (jobd/syncer.py)",
                ms(per_job(jobd, "helper_cpu")))
    hook_jobs = f"webhook's: {ms(per_job(hook, 'jobs_cpu'))}" if hook else ""
    section.add("CPU per job: its job processes (fork, exec, run.sh)",
                ms(per_job(jobd, "jobs_cpu")), hook_jobs)
    machine = per_job(jobd, "machine_cpu")
    hook_machine = per_job(hook, "machine_cpu") if hook else 0.0
    section.add("CPU per job: the whole machine (server, jobs, client, kernel)", ms(machine),
                f"webhook: {ms(hook_machine)}" if hook else "")
    section.add(f"ceiling if every one of the {cores} cores were busy (cores / machine CPU "
                "per job)", f"{cores / machine:.0f}/s" if machine else "",
                f"webhook: {cores / hook_machine:.0f}/s" if hook_machine else "")
