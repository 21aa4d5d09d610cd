"""The benchmark suite: `.venv/bin/python -m bench` (or `bench/run.sh`, which also installs
the peers). Measures the built dist/jobd over real HTTP on loopback and appends a dated
section to bench/RESULTS.md.

    python -m bench                      every section, full sizes (a few minutes)
    python -m bench --smoke              tiny sizes, under a minute (what CI runs)
    python -m bench --only latency,store
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from bench import bench_store, footprint, latency, load, payload, throughput
from bench.daemon import ROOT, ZIPAPP
from bench.report import RESULTS, Section, append, machine, render

SECTIONS = ("latency", "throughput", "payload", "store", "footprint", "load")

FULL = {"jobs": 100, "repeats": 3, "stored": 10_000, "seconds": 10.0, "in_mib": 128,
        "out_mib": 1024, "sizes": [0, 10_000, 100_000], "samples": 200, "idle_stored": 100_000,
        "idle_seconds": 60.0, "starts": 5, "connections": 1000, "load_seconds": 60.0}
SMOKE = {"jobs": 10, "repeats": 1, "stored": 1_000, "seconds": 1.0, "in_mib": 1,
         "out_mib": 4, "sizes": [0, 1_000], "samples": 20, "idle_stored": 1_000,
         "idle_seconds": 1.0, "starts": 1, "connections": 50, "load_seconds": 1.0}


def _stale(target: Path) -> bool:
    if not target.exists():
        return True
    built = target.stat().st_mtime
    sources = [*ROOT.joinpath("jobd").rglob("*.py"), ROOT / "setup.cfg", ROOT / "build.sh"]
    return any(p.stat().st_mtime > built for p in sources)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, under a minute")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help="comma list of sections (default: %(default)s)")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="file the dated section is appended to (default: %(default)s)")
    parser.add_argument("--no-write", action="store_true", help="print only, append nothing")
    parser.add_argument("--idle-seconds", type=float, help="idle CPU window (default 60)")
    parser.add_argument("--load-seconds", type=float, help="wrk load duration (default 60)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {', '.join(sorted(unknown))}; known: {SECTIONS}")
    p = dict(SMOKE if args.smoke else FULL)
    if args.idle_seconds is not None:
        p["idle_seconds"] = args.idle_seconds
    if args.load_seconds is not None:
        p["load_seconds"] = args.load_seconds

    if not os.environ.get("JOBD_ZIPAPP") and _stale(ZIPAPP):
        subprocess.run(["bash", str(ROOT / "build.sh")], check=True, cwd=ROOT)
    work = Path(tempfile.mkdtemp(prefix="jobd-bench-"))
    runs: dict[str, Callable[[], Section]] = {
        "latency": lambda: latency.run(work / "latency", jobs=p["jobs"], repeats=p["repeats"],
                                       stored=p["stored"]),
        "throughput": lambda: throughput.run(work / "throughput", seconds=p["seconds"],
                                             repeats=p["repeats"], stored=p["stored"]),
        "payload": lambda: payload.run(work / "payload", in_mib=p["in_mib"],
                                       out_mib=p["out_mib"], repeats=p["repeats"]),
        "store": lambda: bench_store.section(p["sizes"], p["samples"], str(work)),
        "footprint": lambda: footprint.run(work / "footprint", stored=p["idle_stored"],
                                           idle_seconds=p["idle_seconds"], starts=p["starts"]),
        "load": lambda: load.run(work / "load", connections=p["connections"],
                                 seconds=p["load_seconds"], stored=p["stored"]),
    }
    info = machine()
    began = time.perf_counter()
    sections = []
    try:
        for name in chosen:
            t0 = time.perf_counter()
            section = runs[name]()
            section.notes.append(f"section took {time.perf_counter() - t0:.0f} s")
            sections.append(section)
            print(section.markdown(), flush=True)
    finally:
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    mode = "smoke" if args.smoke else ("partial" if len(chosen) < len(SECTIONS) else "full")
    text = render(sections, mode=mode, seconds=time.perf_counter() - began, info=info)
    if not args.no_write:
        append(text, args.results)
        print(f"appended to {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
