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

from jobd.storage import JournalStorage
from jobd.store import DB_FILE, JobStore

STATUSES = ["SUCCESS"] * 80 + ["FAILED"] * 12 + ["CANCELLED"] * 4 + ["QUEUED"] * 3 + ["RUNNING"]


def job_record(i: int, rng: random.Random) -> dict:
    """A record shaped like the ones jobd stores (see ARCHITECTURE.md)."""
    created = 1_700_000_000.0 + i * 7.5
    status = rng.choice(STATUSES)
    done = status in ("SUCCESS", "FAILED", "CANCELLED")
    return {
        "id": f"job-{i:07d}-{rng.getrandbits(32):08x}", "status": status,
        "message": "job finished successfully" if status == "SUCCESS" else f"job {status.lower()}",
        "created": created, "started": created + 2.0 if done else None,
        "finished": created + 95.5 if done else None, "updated": created + 95.5,
        "exit_code": (0 if status == "SUCCESS" else 1) if done else None, "signal": None,
        "attempt": 1, "priority": rng.choice([0, 0, 0, 10]),
        "labels": {"project": f"p{i % 17}", "user": f"user{i % 5}"},
        "executor": "local", "protocol": rng.choice(["classic", "native", "orchestrator"]),
        "options": {"entry": "run.sh", "args": ["--input", "data.pdb"], "timeout": 86400,
                    "limits": {"memory": 4 << 30, "cpus": 2}},
        "input_size": rng.randint(1_000, 5_000_000), "output_size": rng.randint(0, 50_000_000),
        "seq": i + 1,
    }


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
        "N": f"{n:,}", "file": f"{size / 1e6:.1f} MB", "open (replay)": fmt(p50(opens)),
        "add, fsync": both(adds), "update, no fsync": both(fast), "update, fsync": both(safe),
        "get": both(gets), "page(50) first": fmt(p50(pages)),
        "ids_with_status": fmt(p50(queued)), "compaction": fmt(compact),
    }


def bench_tinydb(root: Path, n: int, samples: int) -> str:
    """Stock TinyDB + JSONStorage: one insert (whole-file rewrite and fsync)."""
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
    return f"{both(times)} (n={count})"


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
