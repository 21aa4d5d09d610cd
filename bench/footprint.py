"""Footprint: the zipapp's size, start times, idle memory and idle CPU.

Start time is from `Popen` to the first 200 of `/health` (polled every 2 ms over fresh
connections). The first start unpacks the zipapp's dependencies into an empty SHIV_ROOT;
later starts reuse it. Idle CPU is the run time of the daemon's threads (schedstat, in ns)
over the idle window, after the daemon settled for a few seconds, and its wake-ups are the
context switches of its threads over the same window.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from bench.daemon import ZIPAPP, Jobd, python
from bench.figures import median, mib, ms
from bench.report import Section


def python_floor(repeats: int, code: str = "pass", path: str = "") -> float:
    """Median seconds for the same python to run `code` and exit (with `path` importable)."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": path} if path else None
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        subprocess.run([python(), "-c", code], check=True, env=env)
        times.append(time.perf_counter() - began)
    return median(times)


DEPENDENCIES = "import uvicorn, starlette.applications, starlette.responses, tinydb"


def wakeups(pid: int) -> int:
    """Context switches of the process's live threads so far: how often an idle daemon
    woke up (each sleep that ends is one voluntary switch)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
        for line in text.splitlines():
            if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                total += int(line.split()[1])
    return total


def run(workdir: Path, *, stored: int = 100_000, idle_seconds: float = 60.0,
        starts: int = 5) -> Section:
    section = Section(f"5. Footprint: {stored:,} stored for the idle figures, "
                      f"idle CPU over {idle_seconds:g} s")
    size = ZIPAPP.stat().st_size
    section.add("zipapp size", f"{size / 1024:.0f} KiB", target="≤ 1 MiB", met=size <= 1 << 20)

    firsts, laters = [], []
    for k in range(min(starts, 3)):  # each unpacks anew: a few are enough
        root = workdir / f"shiv-fresh-{k}"
        with Jobd(workdir / f"first-{k}", shiv_root=root) as daemon:
            firsts.append(daemon.start_seconds)
        shutil.rmtree(root)
    shared = workdir / "shiv-shared"
    with Jobd(workdir / "unpack", shiv_root=shared):
        pass
    empty_rss = []
    for k in range(starts):
        with Jobd(workdir / f"later-{k}", shiv_root=shared) as daemon:
            laters.append(daemon.start_seconds)
            time.sleep(0.5)
            empty_rss.append(daemon.status_kib("VmRSS") * 1024)
    floor = python_floor(starts)
    site = next(shared.glob("jobd_*/site-packages"))
    imports = python_floor(starts, DEPENDENCIES, str(site))
    section.add("first start (unpacks into an empty SHIV_ROOT) to /health", ms(median(firsts)),
                f"python -c pass: {ms(floor)}")
    later = median(laters)
    section.add("later start to /health", ms(later),
                f"python -c pass: {ms(floor)}; python importing uvicorn, starlette and "
                f"tinydb: {ms(imports)}", f"{later / imports:.1f}x the imports", "≤ 0.3 s",
                later <= 0.3)
    section.add("idle RSS, empty store", mib(median(empty_rss)), target="≤ 32 MiB",
                met=median(empty_rss) <= 32 << 20)

    with Jobd(workdir / "idle", shiv_root=shared, stored=stored) as daemon:
        section.add(f"start to /health with {stored:,} stored", ms(daemon.start_seconds))
        time.sleep(min(3.0, idle_seconds / 4))
        cpu0, t0, woke0 = daemon.cpu_ns(), time.perf_counter(), wakeups(daemon.pid)
        time.sleep(idle_seconds)
        cpu = (daemon.cpu_ns() - cpu0) / 1e9 / (time.perf_counter() - t0)
        woke = (wakeups(daemon.pid) - woke0) / (time.perf_counter() - t0)
        rss = daemon.status_kib("VmRSS") * 1024
        hwm = daemon.status_kib("VmHWM") * 1024
    section.add(f"idle RSS, {stored:,} stored", mib(rss), f"peak while loading: {mib(hwm)}",
                target="≤ 32 MiB", met=rss <= 32 << 20)
    section.add(f"idle CPU, {stored:,} stored", f"{cpu * 100:.3f}%", target="< 0.1%",
                met=cpu < 0.001)
    section.add("idle wake-ups (context switches of its threads)", f"{woke:.1f}/s")
    section.notes.append("idle CPU: run time of the daemon's threads from "
                         "/proc/<pid>/task/*/schedstat (ns) over the window")
    return section
