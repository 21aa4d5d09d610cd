#!/usr/bin/env python3
"""A small orchestrator: one job per input file through the classic jobd protocol, results
collected into a directory per job. Standard library only, so it runs anywhere Python 3.9+ does.

    examples/orchestrator.py --url http://localhost:8080 --job examples/job \\
        --out results/ a.fasta b.fasta c.fasta

Each input is zipped with the job template (a directory holding run.sh) under the template's
input name (`--input-name`, default input.fasta), uploaded with `POST /api/upload`, polled with
`GET /api/get/{id}` until it is finished, and its `Output` unpacked into OUT/<id>/. Exit status
0 when every job ended SUCCESS, 1 otherwise. A summary line per job goes to stdout.

The classic protocol carries the zip as base64 inside JSON, so this example holds one job's
payload in memory at a time: fine for the small inputs an orchestrator fans out. For large
inputs use `jobd submit`, which streams.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

FINISHED = (200, 206)  # 206: PARTIAL in the Go jobd
_SAY = threading.Lock()


def say(line: str, stream=None) -> None:
    """One whole line per call (print from several threads would interleave)."""
    with _SAY:
        print(line, file=stream or sys.stdout, flush=True)


def job_zip(template: Path, input_file: Path, input_name: str) -> bytes:
    """The template's files (modes kept, so run.sh stays executable) plus this job's input."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(template.rglob("*")):
            name = path.relative_to(template).as_posix()
            if path.is_file() and name != input_name:
                zf.write(path, name)
        zf.write(input_file, input_name)
    return buffer.getvalue()


def call(method: str, url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
    """One request; HTTP errors are answers too (the classic error shape is JSON)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        with error:
            text = error.read()
        try:
            return error.code, json.loads(text)
        except ValueError:
            return error.code, {"message": text.decode(errors="replace")}


def run_one(url: str, job_id: str, payload: bytes, out: Path, deadline: float) -> str:
    """Upload, poll, unpack; returns the final status (or ERROR with the reason printed)."""
    status, answer = call("POST", f"{url}/api/upload",
                          {"id": job_id, "input": base64.b64encode(payload).decode()})
    if status != 201:
        say(f"{job_id}: upload refused ({status}): {answer.get('message')}", sys.stderr)
        return "ERROR"
    delay = 0.1
    while True:
        status, record = call("GET", f"{url}/api/get/{job_id}")
        if status in FINISHED:
            break
        if status != 202:
            say(f"{job_id}: unexpected answer {status}: {record}", sys.stderr)
            return "ERROR"
        if time.monotonic() > deadline:
            say(f"{job_id}: still not finished at the deadline", sys.stderr)
            return "ERROR"
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)
    target = out / job_id
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(base64.b64decode(record["Output"]))) as zf:
        for member in zf.infolist():  # refuse names that would land outside the target
            parts = PurePosixPath(member.filename).parts
            if member.filename.startswith("/") or ".." in parts:
                raise ValueError(f"{job_id}: unsafe name in result: {member.filename!r}")
        zf.extractall(target)
        for member in zf.infolist():  # zipfile drops the modes: put the exec bits back
            mode = member.external_attr >> 16 & 0o777
            if mode and not member.is_dir():
                os.chmod(target / member.filename, mode)
    say(f"{job_id}: {record['Status']}: {record['Message']}")
    return str(record["Status"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="one job per input file")
    parser.add_argument("--url", default=os.environ.get("JOBD_URL", "http://localhost:8080"))
    parser.add_argument("--job", type=Path, default=Path(__file__).parent / "job",
                        help="the job template: a directory with run.sh")
    parser.add_argument("--input-name", default="input.fasta",
                        help="the name run.sh reads its input from")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--prefix", default=f"orch-{int(time.time())}",
                        help="job ids are PREFIX-1, PREFIX-2, ...")
    parser.add_argument("--parallel", type=int, default=8, help="jobs in flight at once")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds for all jobs")
    args = parser.parse_args(argv)

    url = args.url.rstrip("/")
    deadline = time.monotonic() + args.timeout
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        futures = [
            pool.submit(run_one, url, f"{args.prefix}-{n}",
                        job_zip(args.job, path, args.input_name), args.out, deadline)
            for n, path in enumerate(args.inputs, 1)
        ]
        statuses = [future.result() for future in futures]
    done = sum(status == "SUCCESS" for status in statuses)
    print(f"{done} of {len(statuses)} job(s) succeeded; results in {args.out}", file=sys.stderr)
    return 0 if done == len(statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
