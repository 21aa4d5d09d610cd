"""The benchmark suite at tiny sizes, so CI runs its scripts against the built zipapp.

The figures of a smoke run mean nothing (the sizes are too small and CI machines vary); what
is checked is that every section runs, reports its figures and appends a dated section. The
peers (webhook, wrk) are compared only when installed: `bench/run.sh` installs them for the
full suite.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT

SECTIONS = ["1. Start latency", "2. Throughput", "3. Large payloads", "4. Store",
            "5. Footprint", "6. Load"]


def test_smoke_run_of_the_whole_suite(zipapp: Path, tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    env = {**os.environ, "JOBD_ZIPAPP": str(zipapp)}
    began = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--results", str(results)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    text = results.read_text()
    assert re.match(r"\n## \d{4}-\d\d-\d\d \d\d:\d\d UTC: smoke run, jobd ", text), text[:200]
    for key in ("CPU", "cores", "RAM", "kernel", "python (daemon)"):
        assert f"- {key}: " in text
    for title in SECTIONS:
        assert f"### {title}" in text, f"section {title!r} missing:\n{text}"
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert any(line.startswith("| upload-to-start p50 | ") for line in rows)
    assert any(line.startswith("| jobs/s ") for line in rows)
    assert any("peak RSS" in line for line in rows)
    assert any(line.startswith("| zipapp size |") for line in rows)
    print(f"smoke suite took {time.monotonic() - began:.0f} s")
