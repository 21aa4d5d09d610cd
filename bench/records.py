"""Realistic job records, and a database pre-filled with many of them in one snapshot write.

Filling a database through N uploads would take minutes and measure the wrong thing; the
journal format is documented (jobd/storage.py), so the bench writes its snapshot line
directly with the storage class itself, as a restored backup would be.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from jobd.storage import JournalStorage
from jobd.store import DB_FILE, TABLE

STATUSES = ["SUCCESS"] * 80 + ["FAILED"] * 12 + ["CANCELLED"] * 4 + ["QUEUED"] * 3 + ["RUNNING"]
TERMINAL = ["SUCCESS"] * 80 + ["FAILED"] * 12 + ["CANCELLED"] * 4


def job_record(i: int, rng: random.Random, *, created: float | None = None,
               statuses: list[str] = STATUSES) -> dict:
    """A record shaped like the ones jobd stores (see ARCHITECTURE.md)."""
    created = 1_700_000_000.0 + i * 7.5 if created is None else created
    status = rng.choice(statuses)
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
        "owner": None, "slurm_id": None, "seq": i + 1,
    }


def finished_records(n: int, seed: int = 0) -> list[dict]:
    """`n` finished jobs from the last hour: nothing to run, and retention keeps them."""
    rng = random.Random(seed)
    start = time.time() - 3600.0
    step = 3000.0 / max(n, 1)
    return [job_record(i, rng, created=start + i * step, statuses=TERMINAL) for i in range(n)]


def prefill(db_dir: Path, n: int) -> None:
    """A jobd database holding `n` finished jobs (their files are absent: metadata only)."""
    storage = JournalStorage(db_dir / DB_FILE, fsync=False)
    try:
        storage.write({TABLE: {r["id"]: r for r in finished_records(n)}})
    finally:
        storage.close()
