"""Latency of native API reads over HTTP at growing numbers of stored jobs.

    .venv/bin/python bench/bench_api.py [--sizes 100,100000] [--samples 200]

For each size N, a database of N finished jobs (records as bench_store.py makes them) is written
as one snapshot, the built zipapp (dist/jobd, run `./build.sh` first) is started on it, and single
requests are timed one by one over a keep-alive connection: median and p99. Listing should cost
the same at every size (a page costs about `limit` steps), as should the overview.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_store import both, job_record, sample  # noqa: E402

from jobd.storage import JournalStorage  # noqa: E402
from jobd.store import DB_FILE  # noqa: E402

ZIPAPP = HERE.parent / "dist" / "jobd"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def finished_record(i: int, rng: random.Random) -> dict:
    record = job_record(i, rng)
    if record["status"] not in ("SUCCESS", "FAILED", "CANCELLED"):
        record.update(status="SUCCESS", started=record["created"] + 2.0,
                      finished=record["created"] + 95.5, exit_code=0)
    return record


def bench_size(root: Path, n: int, samples: int) -> dict[str, str]:
    rng = random.Random(n)
    records = [finished_record(i, rng) for i in range(n)]
    work = root / f"n{n}"
    (work / "db").mkdir(parents=True)
    filler = JournalStorage(work / "db" / DB_FILE, fsync=False)
    filler.write({"jobs": {r["id"]: r for r in records}})
    filler.close()
    port = free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work),
           "SHIV_ROOT": str(root / "shiv"), "PORT": str(port), "JOBD_HOST": "127.0.0.1",
           "DATAPATH": str(work / "data"), "DB_PATH": str(work / "db"),
           "JOBD_RETENTION": "0", "JOBD_ACCESS_LOG": "false", "JOBD_SLOTS": "1"}
    with open(work / "daemon.log", "wb") as log:
        proc = subprocess.Popen([str(ZIPAPP)], env=env, stdout=log, stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        deadline = time.monotonic() + 120
        started = time.monotonic()
        while True:
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"daemon did not start: {(work / 'daemon.log').read_text()}")
            time.sleep(0.05)
        startup = time.monotonic() - started
        cursor = str(records[n // 2]["seq"]) if n else None  # a page from the middle
        one = records[n // 2]["id"] if n else "none"

        def timed(path: str, **params: object) -> Callable[[int], object]:
            def call(_: int) -> object:
                response = client.get(path, params=params)
                assert response.status_code in (200, 404), response.text
                return response
            return call

        row = {
            "N": f"{n:,}", "start": f"{startup:.2f} s",
            "list, first page (50)": both(sample(timed("/api/v1/jobs"), samples)),
            "list, page at the middle": both(sample(
                timed("/api/v1/jobs", **({"cursor": cursor} if cursor else {})), samples)),
            "list, status=FAILED": both(sample(timed("/api/v1/jobs", status="FAILED"),
                                               samples)),
            "list, label=project=p3": both(sample(timed("/api/v1/jobs", label="project=p3"),
                                                  samples)),
            "get one job": both(sample(timed(f"/api/v1/jobs/{one}"), samples)),
            "overview": both(sample(timed("/api/v1/overview"), samples)),
        }
    finally:
        client.close()
        proc.terminate()
        proc.wait(30)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,100000")
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    if not ZIPAPP.exists():
        raise SystemExit("dist/jobd is missing: run ./build.sh first")
    root = Path(tempfile.mkdtemp(prefix="jobd-bench-api-"))
    rows = []
    try:
        for n in (int(s) for s in args.sizes.split(",") if s.strip()):
            rows.append(bench_size(root, n, args.samples))
            print(f"size {n:,} done", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"Python {sys.version.split()[0]}, {args.samples} requests each, median / p99, "
          "HTTP over loopback, one keep-alive connection\n")
    headers = list(rows[0])
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(row[h] for h in headers) + " |")


if __name__ == "__main__":
    main()
