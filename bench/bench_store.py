"""Cost of one JobStore operation at growing database sizes, next to stock TinyDB.

    .venv/bin/python bench/bench_store.py [--sizes 0,10000,100000] [--samples 200] [--dir D]

For each size N a fresh store is pre-filled with N realistic job records through one snapshot
write (not N fsyncs), then single operations are timed one by one: median and p99. The peer
is stock TinyDB with its JSONStorage (which rewrites and fsyncs the whole file per insert),
sampled less at large sizes so the run stays near a minute. ``--dir`` picks the filesystem
(default: the system temp dir); fsync cost depends on it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinydb import TinyDB

from bench.records import job_record
from bench.report import Section
from jobd.storage import JournalStorage
from jobd.store import DB_FILE, JobStore


def sample(fn: Callable[[int], object], n: int) -> list[float]:
    """Seconds taken by each of n calls fn(0), fn(1), ..."""
    out = []
    for k in range(n):
        start = time.perf_counter()
        fn(k)
        out.append(time.perf_counter() - start)
    return out


def p50(xs: list[float]) -> float:
    return statistics.median(xs)


def p99(xs: list[float]) -> float:
    return sorted(xs)[max(0, math.ceil(0.99 * len(xs)) - 1)]


def fmt(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def both(xs: list[float]) -> str:
    return f"{fmt(p50(xs))} / {fmt(p99(xs))}"


def bench_jobstore(root: Path, n: int, samples: int) -> dict[str, str]:
    """Formatted figures of one size (see `measure_jobstore` for the raw seconds)."""
    raw = measure_jobstore(root, n, samples)
    return {
        "N": f"{n:,}", "file": f"{raw['file'] / 1e6:.1f} MB", "open (replay)": fmt(raw["open"]),
        "add, fsync": both(raw["add"]), "update, no fsync": both(raw["update"]),
        "update, fsync": both(raw["update durable"]), "get": both(raw["get"]),
        "page(50) first": fmt(p50(raw["page"])), "ids_with_status": fmt(p50(raw["queued"])),
        "compaction": fmt(raw["compaction"]),
    }


def measure_jobstore(root: Path, n: int, samples: int) -> dict:
    """Seconds per operation on a JobStore pre-filled with `n` records."""
    rng = random.Random(n)
    records = [job_record(i, rng) for i in range(n)]
    db_dir = root / f"jobstore-{n}"
    filler = JournalStorage(db_dir / DB_FILE, fsync=False)
    filler.write({"jobs": {r["id"]: r for r in records}})
    filler.close()
    size = (db_dir / DB_FILE).stat().st_size

    opens = []
    for _ in range(3):
        start = time.perf_counter()
        store = JobStore(db_dir)
        opens.append(time.perf_counter() - start)
        store.close()
    store = JobStore(db_dir)
    template = job_record(n, rng)
    template["status"] = "QUEUED"

    adds = sample(lambda k: store.add({**template, "id": f"new-{k}"}), samples)
    ids = [r["id"] for r in records] + [f"new-{k}" for k in range(samples)]
    pick = [rng.choice(ids) for _ in range(2000)]
    stamp = {"message": "job running", "started": time.time()}
    fast = sample(lambda k: store.update(pick[k], stamp, durable=False), samples)
    safe = sample(lambda k: store.update(pick[k], stamp, durable=True), samples)
    gets = sample(lambda k: store.get(pick[k]), 2000)
    pages = sample(lambda k: store.page(limit=50), 200)
    queued = sample(lambda k: store.ids_with_status("QUEUED"), 200)
    storage = store._table.storage
    start = time.perf_counter()
    storage.compact()  # type: ignore[attr-defined]
    compact = time.perf_counter() - start
    store.close()
    shutil.rmtree(db_dir)
    return {
        "file": size, "open": p50(opens), "add": adds, "update": fast, "update durable": safe,
        "get": gets, "page": pages, "queued": queued, "compaction": compact,
    }


def bench_tinydb(root: Path, n: int, samples: int) -> str:
    """Stock TinyDB + JSONStorage: one insert (whole-file rewrite and fsync)."""
    times = measure_tinydb(root, n, samples)
    return f"{both(times)} (n={len(times)})"


def measure_tinydb(root: Path, n: int, samples: int) -> list[float]:
    """Seconds per insert into stock TinyDB holding `n` records (fewer samples when large)."""
    rng = random.Random(n)
    path = root / f"tinydb-{n}.json"
    with open(path, "w") as f:
        json.dump({"_default": {str(i + 1): job_record(i, rng) for i in range(n)}}, f)
    db = TinyDB(str(path))
    template = job_record(n, rng)
    count = samples if n <= 1_000 else max(3, samples * 1_000 // n)
    db.insert(template)  # the first insert also scans for the next id: not counted
    times = sample(lambda k: db.insert(template), count)
    db.close()
    path.unlink()
    return times


def interleaved_adds(root: Path, sizes: list[int], samples: int) -> dict[int, list[float]]:
    """Seconds per durable add at each size, sampled round-robin across the sizes.

    The fsync dominates an add and its time drifts with whatever else the disk does, so the
    sizes take turns: a slow spell hits all of them alike and their ratio stays meaningful.
    """
    stores = {}
    for n in sizes:
        rng = random.Random(n)
        db_dir = root / f"interleaved-{n}"
        filler = JournalStorage(db_dir / DB_FILE, fsync=False)
        filler.write({"jobs": {r["id"]: r for r in (job_record(i, rng) for i in range(n))}})
        filler.close()
        stores[n] = (JobStore(db_dir), job_record(n, rng))
    times: dict[int, list[float]] = {n: [] for n in sizes}
    try:
        for k in range(samples):
            for n, (store, template) in stores.items():
                record = {**template, "id": f"new-{k}", "status": "QUEUED"}
                start = time.perf_counter()
                store.add(record)
                times[n].append(time.perf_counter() - start)
    finally:
        for store, _ in stores.values():
            store.close()
    return times


def section(sizes: list[int], samples: int, where: str | None = None) -> Section:
    """The suite's store section: write and read cost against the number of stored jobs."""
    out = Section(f"4. Store: one operation with {', '.join(f'{n:,}' for n in sizes)} jobs "
                  f"stored, {samples} samples each (median, p99)")
    root = Path(tempfile.mkdtemp(prefix="jobd-bench-", dir=where))
    updates: dict[int, float] = {}
    try:
        for n in sizes:
            raw = measure_jobstore(root, n, samples)
            peer = measure_tinydb(root, n, samples)
            updates[n] = p50(raw["update"])
            out.add(f"{n:,} stored: write (add + fsync)", both(raw["add"]),
                    f"stock TinyDB insert: {both(peer)}", f"{p50(raw['add']) / p50(peer):.3f}x")
            out.add(f"{n:,} stored: write without fsync (update)", both(raw["update"]))
            out.add(f"{n:,} stored: read (get)", both(raw["get"]))
            out.add(f"{n:,} stored: open (replay {raw['file'] / 1e6:.1f} MB)", fmt(raw["open"]))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    low, high = min(sizes), max(sizes)
    if high > low:
        turns = interleaved_adds(root, [low, high], samples)
        shutil.rmtree(root, ignore_errors=True)
        adds = {n: p50(xs) for n, xs in turns.items()}
        growth = adds[high] / adds[low]
        out.add(f"write (add + fsync), sizes taking turns: {low:,} / {high:,} stored",
                f"{fmt(adds[low])} / {fmt(adds[high])}")
        out.add(f"write at {high:,} / write at {low:,}", f"{growth:.2f}x",
                f"without fsync: {updates[high] / updates[low]:.2f}x", "",
                "≤ 1.5x", growth <= 1.5)
    out.notes.append(f"filesystem of {where or tempfile.gettempdir()}; the write cost is mostly "
                     "the fsync, whose time varies with what else the disk is doing")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0,10000,100000",
                        help="comma-separated database sizes (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=200,
                        help="timed calls per write operation (default: %(default)s)")
    parser.add_argument("--dir", default=None, help="where to create the databases")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    root = Path(tempfile.mkdtemp(prefix="jobd-bench-", dir=args.dir))
    began = time.perf_counter()
    rows = []
    try:
        for n in sizes:
            row = bench_jobstore(root, n, args.samples)
            row["TinyDB JSONStorage insert"] = bench_tinydb(root, n, args.samples)
            rows.append(row)
            print(f"size {n:,} done", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"Python {sys.version.split()[0]}, {args.samples} samples per write, "
          f"median / p99, filesystem of {args.dir or tempfile.gettempdir()}\n")
    headers = list(rows[0])
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(row[h] for h in headers) + " |")
    print(f"\ntotal {time.perf_counter() - began:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
