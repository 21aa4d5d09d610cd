"""Load: many concurrent connections reading a finished job's status with `wrk`.

`wrk` keeps every connection open for the whole run and fires `GET /api/get/{id}` of a small
finished job (the record plus its base64 result, about 1 KB) as fast as answers come back.
The share of those the connection layer's fast path answered (jobd/fastpath.py) comes from
`/metrics`.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

from bench.daemon import Jobd
from bench.figures import mib
from bench.report import Section
from bench.zips import make_zip

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _seconds(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def parse_wrk(out: str) -> dict[str, float]:
    """Requests/s, p99 latency, and every kind of error from `wrk --latency` output."""
    figures = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
               "requests": float(re.search(r"(\d+) requests in", out).group(1))}  # type: ignore[union-attr]
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    figures["p99"] = _seconds(p99.group(1)) if p99 else float("nan")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    figures["socket errors"] = float(sum(int(g) for g in errors.groups())) if errors else 0.0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    figures["non-2xx"] = float(non2xx.group(1)) if non2xx else 0.0
    return figures


def fast_share(metrics: str, route: str = "/api/get/{id}") -> float:
    """Of the requests to `route` counted in /metrics, the share the fast path answered."""
    total = sum(int(n) for n in re.findall(
        rf'^jobd_http_requests_total{{method="GET",route="{re.escape(route)}",code="\d+"}} (\d+)$',
        metrics, re.M))
    fast = re.search(rf'^jobd_http_fast_path_requests_total{{route="{re.escape(route)}"}} (\d+)$',
                     metrics, re.M)
    return int(fast.group(1)) / total if fast and total else 0.0


def run(workdir: Path, *, connections: int = 1000, seconds: float = 60.0,
        stored: int = 10_000) -> Section:
    section = Section(f"6. Load: {connections:,} connections reading a job's status for "
                      f"{seconds:g} s, {stored:,} stored")
    if not shutil.which("wrk"):
        section.notes.append("skipped: wrk is not installed (apt-get install wrk)")
        return section
    with Jobd(workdir / "jobd", stored=stored) as daemon:
        body = json.dumps({"id": "status", "input": base64.b64encode(
            make_zip({"run.sh": "#!/bin/sh\necho ok > out.txt\n"})).decode()}).encode()
        with daemon.conn() as conn:
            if conn.request("POST", "/api/upload", body).status != 201:
                raise RuntimeError("could not upload the status job")
            deadline = time.monotonic() + 60
            while conn.request("GET", "/api/get/status").status != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError("the status job did not finish")
                time.sleep(0.01)
        time.sleep(1.0)
        before = daemon.status_kib("VmRSS") * 1024
        out = subprocess.run(
            ["wrk", "-t2", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
             "--timeout", "10s", f"http://127.0.0.1:{daemon.port}/api/get/status"],
            capture_output=True, text=True, timeout=seconds + 120, check=True).stdout
        peak = daemon.status_kib("VmHWM") * 1024
        time.sleep(2.0)
        after = daemon.status_kib("VmRSS") * 1024
        with daemon.conn() as conn:
            fast = fast_share(conn.request("GET", "/metrics").body.decode())
    got = parse_wrk(out)
    errors = int(got["socket errors"] + got["non-2xx"])
    section.add("requests/s", f"{got['rps']:.0f}")
    section.add("p99 latency", f"{got['p99'] * 1e3:.1f} ms", target="< 100 ms",
                met=got["p99"] < 0.1)
    section.add("errors (socket errors + non-2xx)", f"{errors} of {int(got['requests']):,}",
                target="0", met=errors == 0)
    growth = after - before
    section.add("answered by the fast path", f"{fast:.1%}")
    section.add("RSS before / peak / 2 s after", f"{mib(before)} / {mib(peak)} / {mib(after)}",
                target="flat (after - before ≤ 16 MiB)", met=growth <= 16 << 20)
    return section
