"""Large payloads: a big upload and a big result through the classic protocol.

The daemon's peak RSS (VmHWM, reset before each phase through /proc/<pid>/clear_refs) and the
rate of each transfer, next to `cat file > /dev/null` and `base64 < file > /dev/null` on the
same result.zip in the same run. Every rate is in MiB of the zip per second (the base64 on the
wire is 4/3 of it), so the three compare directly. The native binary download
(`GET /api/v1/jobs/{id}/archive`) is measured when the daemon has it.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from pathlib import Path

from bench.daemon import Jobd
from bench.figures import median, mib, ms, ratio
from bench.report import Section
from bench.wire import Conn
from bench.zips import make_zip

MiB = 1 << 20


def _wait_done(conn: Conn, job_id: str, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        answer = conn.request("GET", f"/api/get/{job_id}", discard=True)
        if answer.status == 200:
            return
        if answer.status != 202:
            raise RuntimeError(f"job {job_id}: {answer.status}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} did not finish within {timeout}s")
        time.sleep(0.05)


def _timed(argv: list[str], src: Path, repeats: int) -> float:
    """Median seconds of `argv < src > /dev/null`."""
    times = []
    for _ in range(repeats):
        with open(src, "rb") as stdin, open(os.devnull, "wb") as stdout:
            began = time.perf_counter()
            subprocess.run(argv, stdin=stdin, stdout=stdout, check=True)
            times.append(time.perf_counter() - began)
    return median(times)


class Phases:
    """Peak RSS of the daemon per phase."""

    def __init__(self, daemon: Jobd) -> None:
        self.daemon = daemon
        self.peaks: dict[str, int] = {}
        self.exact = True

    def begin(self) -> None:
        self.exact = self.daemon.reset_peak() and self.exact

    def end(self, name: str) -> None:
        self.peaks[name] = max(self.peaks.get(name, 0), self.daemon.status_kib("VmHWM"))


def _download(daemon: Jobd, path: str, repeats: int, phases: Phases,
              name: str) -> tuple[float, int]:
    """Median seconds to read the whole answer of GET `path`, and its size."""
    times, size = [], 0
    for _ in range(repeats):
        with daemon.conn() as conn:
            phases.begin()
            began = time.perf_counter()
            answer = conn.request("GET", path, discard=True)
            times.append(time.perf_counter() - began)
            phases.end(name)
        if answer.status != 200:
            raise RuntimeError(f"GET {path}: {answer.status}")
        size = answer.size
    return median(times), size


def _native_archive(daemon: Jobd, job_id: str) -> bool:
    """Whether the build has the native API's archive download (the routes are on a branch)."""
    with daemon.conn() as conn:
        if conn.request("GET", f"/api/v1/jobs/{job_id}", discard=True).status != 200:
            return False
        answer = conn.request("HEAD", f"/api/v1/jobs/{job_id}/archive?format=zip", discard=True)
    return answer.status == 200


def big_output(workdir: Path, out_mib: int, level: int, repeats: int) -> dict[str, float]:
    """A job writing `out_mib` MiB of random bytes; its result downloaded `repeats` times."""
    figures: dict[str, float] = {}
    with Jobd(workdir / f"out-l{level}", JOBD_ZIP_LEVEL=str(level), JOBD_SLOTS="1") as daemon:
        phases = Phases(daemon)
        script = f"#!/bin/sh\nhead -c {out_mib}M /dev/urandom > out.bin\n"
        body = json.dumps({"id": "big-out", "input": base64.b64encode(
            make_zip({"run.sh": script})).decode()}).encode()
        with daemon.conn() as conn:
            phases.begin()
            if conn.request("POST", "/api/upload", body).status != 201:
                raise RuntimeError("upload of the big-output job failed")
            _wait_done(conn, "big-out")
            phases.end("run and pack")
        result = daemon.datapath / "big-out" / "result.zip"
        zip_size = result.stat().st_size
        seconds, wire = _download(daemon, "/api/get/big-out", repeats, phases, "download")
        figures["zip"] = zip_size
        figures["classic"] = zip_size / seconds
        figures["wire"] = wire
        if _native_archive(daemon, "big-out"):
            native, _ = _download(daemon, "/api/v1/jobs/big-out/archive?format=zip", repeats,
                                  phases, "native download")
            figures["native"] = zip_size / native
        figures["cat"] = zip_size / _timed(["cat"], result, repeats)
        figures["base64"] = zip_size / _timed(["base64"], result, repeats)
        figures["peak"] = max(phases.peaks.values()) * 1024
        figures["exact"] = float(phases.exact)
        for name, kib in phases.peaks.items():
            figures[f"peak {name}"] = kib * 1024
    return figures


def big_input(workdir: Path, in_mib: int, repeats: int) -> dict[str, float]:
    """Upload a zip holding `in_mib` MiB of random bytes; the result (the same file) comes back."""
    figures: dict[str, float] = {}
    payload = make_zip({"run.sh": "#!/bin/sh\ntrue\n", "data.bin": os.urandom(in_mib * MiB)},
                       stored=True)
    b64 = base64.b64encode(payload)
    with Jobd(workdir / "in", JOBD_SLOTS="1") as daemon:
        phases = Phases(daemon)
        times = []
        for k in range(repeats):
            body = b'{"id":"big-in-' + str(k).encode() + b'","input":"' + b64 + b'"}'
            with daemon.conn() as conn:
                phases.begin()
                began = time.perf_counter()
                answer = conn.request("POST", "/api/upload", memoryview(body))
                times.append(time.perf_counter() - began)
                phases.end("upload")
                if answer.status != 201:
                    raise RuntimeError(f"big upload: {answer.status} {answer.body[:200]!r}")
                phases.begin()
                _wait_done(conn, f"big-in-{k}")
                phases.end("run and pack")
            del body
        figures["upload"] = len(payload) / median(times)
        seconds, _ = _download(daemon, "/api/get/big-in-0", repeats, phases, "download")
        result = daemon.datapath / "big-in-0" / "result.zip"
        figures["zip"] = result.stat().st_size
        figures["classic"] = figures["zip"] / seconds
        figures["base64"] = figures["zip"] / _timed(["base64"], result, repeats)
        figures["cat"] = figures["zip"] / _timed(["cat"], result, repeats)
        figures["peak"] = max(phases.peaks.values()) * 1024
        for name, kib in phases.peaks.items():
            figures[f"peak {name}"] = kib * 1024
    return figures


def run(workdir: Path, *, in_mib: int = 128, out_mib: int = 1024, repeats: int = 3) -> Section:
    section = Section(f"3. Large payloads: {in_mib} MiB in, {out_mib} MiB out, "
                      f"median of {repeats} transfers")
    began = time.perf_counter()
    fin = big_input(workdir, in_mib, repeats)
    section.add(f"upload {in_mib} MiB (classic, base64 JSON)", f"{fin['upload'] / MiB:.0f} MiB/s",
                f"base64 tool: {fin['base64'] / MiB:.0f} MiB/s",
                ratio(fin["upload"], fin["base64"]))
    section.add(f"download of that result ({mib(fin['zip'])}, classic)",
                f"{fin['classic'] / MiB:.0f} MiB/s",
                f"base64: {fin['base64'] / MiB:.0f} MiB/s, cat: {fin['cat'] / MiB:.0f} MiB/s",
                ratio(fin["classic"], fin["base64"]), "≥ 200 MiB/s", fin["classic"] >= 200 * MiB)
    section.add(f"peak RSS, {in_mib} MiB in (upload / run+pack / download)",
                " / ".join(mib(fin[f"peak {p}"]) for p in ("upload", "run and pack", "download")),
                target="≤ 128 MiB", met=fin["peak"] <= 128 * MiB)
    pending = False
    for level in (0, 1):
        fout = big_output(workdir, out_mib, level, repeats)
        what = f"{out_mib} MiB out, JOBD_ZIP_LEVEL={level}" + (" (default)" if level == 1 else "")
        section.add(f"download, {what}: classic base64 ({mib(fout['zip'])} zip)",
                    f"{fout['classic'] / MiB:.0f} MiB/s",
                    f"base64: {fout['base64'] / MiB:.0f} MiB/s, cat: {fout['cat'] / MiB:.0f} MiB/s",
                    ratio(fout["classic"], fout["base64"]), "≥ 200 MiB/s",
                    fout["classic"] >= 200 * MiB)
        if "native" in fout:
            section.add(f"download, {what}: native binary archive",
                        f"{fout['native'] / MiB:.0f} MiB/s", f"cat: {fout['cat'] / MiB:.0f} MiB/s",
                        ratio(fout["native"], fout["cat"]))
        else:
            pending = True
        section.add(f"peak RSS, {what} (run+pack / download)",
                    " / ".join(mib(fout[f"peak {p}"]) for p in ("run and pack", "download")),
                    target="≤ 128 MiB", met=fout["peak"] <= 128 * MiB)
    if pending:
        section.notes.append("native binary download (`GET /api/v1/jobs/{id}/archive`): pending, "
                             "the route is not on the measured build")
    section.notes.append("rates are MiB of result.zip per second for jobd, cat and base64 alike "
                         "(the classic answer carries 4/3 as many base64 bytes); peak RSS is "
                         "VmHWM reset before each phase; took " + ms(time.perf_counter() - began))
    return section
