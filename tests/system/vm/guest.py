"""Runs inside the test VM of tests/test_cgroup_v2_vm.py, as root on a pure cgroup v2 host.

The VM's init (tests/system/vm/init) mounts cgroup2 alone on /sys/fs/cgroup and starts this
script with the Debian root filesystem's python3. It plays a container runtime that delegates a
cgroup: it enables memory, cpu, pids and io at the root, starts dist/jobd inside
`/sys/fs/cgroup/jobd.service` (so jobd must move itself into a leaf before it can hand the
controllers to its job cgroups), submits jobs that push against each limit, watches their
cgroups from outside while they run, and reports everything as JSON lines on the second serial
port (/dev/ttyS1). It asserts nothing: the host test does. Standard library only, Python 3.9+.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

CGROOT = Path("/sys/fs/cgroup")
SERVICE = CGROOT / "jobd.service"
JOBD = Path("/tmp/payload/jobd")
DATAPATH = Path("/srv/jobd/data")  # on /dev/vdb: a real block device for io.max
PORT = 8080
URL = f"http://127.0.0.1:{PORT}"
RESULTS = "/dev/ttyS1"
MARK = "JOBD-VM "

# Job scripts. `cg` is the job's own cgroup directory, found the way any process can.
CG = 'cg=/sys/fs/cgroup$(sed -n "s/^0:://p" /proc/self/cgroup)\n'

HOG = """import sys, time
step = 4 << 20
total = int(sys.argv[1]) << 20
name = sys.argv[2]
blocks = []
while len(blocks) * step < total:
    blocks.append(bytes([len(blocks) % 251 + 1]) * step)  # written: resident, not reserved
    print(name, len(blocks) * 4, "MiB", flush=True)
print(name, "holds", total >> 20, "MiB", flush=True)
time.sleep(float(sys.argv[3]) if len(sys.argv) > 3 else 1.0)
"""

# Three processes of 40 MiB each: every one is far under a 64M RLIMIT_DATA, the job is not.
HOGS = CG + """echo "memory.max $(cat $cg/memory.max)"
echo "memory.oom.group $(cat $cg/memory.oom.group)"
for n in 1 2 3; do python3 hog.py 40 hog$n 3 & done
wait
echo "all hogs done"
"""

SINGLE = CG + """echo "memory.max $(cat $cg/memory.max)"
exec python3 hog.py 200 single
"""

# Every process forks for ever and retries when refused: only a kill ends it.
BOMB = CG + """echo "pids.max $(cat $cg/pids.max)"
exec python3 -c '
import os, time
while True:
    try:
        os.fork()
    except OSError:
        time.sleep(0.05)
'
"""

SPIN = CG + """exec python3 - "$cg" <<'PY'
import json, sys, time
cg = sys.argv[1]
def usage():
    for line in open(cg + "/cpu.stat"):
        key, value = line.split()
        if key == "usage_usec":
            return int(value)
t0, u0 = time.monotonic(), usage()
while time.monotonic() - t0 < 4.0:
    pass
t1, u1 = time.monotonic(), usage()
stat = dict(line.split() for line in open(cg + "/cpu.stat"))
out = {"wall": t1 - t0, "cpu": (u1 - u0) / 1e6, "cpu.max": open(cg + "/cpu.max").read().strip(),
       "nr_throttled": int(stat.get("nr_throttled", 0)),
       "throttled_usec": int(stat.get("throttled_usec", 0))}
json.dump(out, open("cpu.json", "w"))
print(json.dumps(out))
PY
"""

# 4 MiB written then read with O_DIRECT (no page cache: every byte reaches the disk).
DISK = CG + """echo "io.max $(cat $cg/io.max)"
exec python3 - "$cg" <<'PY'
import json, subprocess, sys, time
cg = sys.argv[1]
def run(*argv):
    t0 = time.monotonic()
    subprocess.run(argv, check=True, stderr=subprocess.DEVNULL)
    return time.monotonic() - t0
write = run("dd", "if=/dev/zero", "of=blob", "bs=64k", "count=64", "oflag=direct")
read = run("dd", "if=blob", "of=/dev/null", "bs=64k", "iflag=direct")
out = {"bytes": 64 * 65536, "write_s": write, "read_s": read,
       "io.max": open(cg + "/io.max").read().strip(),
       "io.stat": open(cg + "/io.stat").read().strip()}
json.dump(out, open("io.json", "w"))
print(json.dumps(out))
PY
"""

JOBS: list[dict[str, Any]] = [
    {"id": "mem-hogs", "files": {"run.sh": HOGS, "hog.py": HOG}, "limits": {"memory": "64M"}},
    {"id": "mem-hogs-free", "files": {"run.sh": HOGS, "hog.py": HOG}},
    {"id": "mem-single", "files": {"run.sh": SINGLE, "hog.py": HOG},
     "limits": {"memory": "64M"}},
    {"id": "forkbomb", "files": {"run.sh": BOMB}, "limits": {"nproc": 24}, "timeout": 8},
    {"id": "cpu", "files": {"run.sh": SPIN}, "limits": {"cpus": 0.25}},
    {"id": "cpu-free", "files": {"run.sh": SPIN}},
    {"id": "io", "files": {"run.sh": DISK}, "limits": {"io": "1M"}},
    {"id": "io-free", "files": {"run.sh": DISK}},
]

WATCHED = ("memory.max", "memory.current", "memory.peak", "memory.events", "pids.max",
           "pids.current", "pids.events", "cpu.max", "io.max", "cgroup.procs")


class Reporter:
    """JSON lines on the second serial port, away from the kernel's console messages."""

    def __init__(self, path: str) -> None:
        self.out = open(path, "w")  # noqa: SIM115 - kept open for the whole run

    def emit(self, kind: str, **payload: Any) -> None:
        self.out.write(MARK + json.dumps({"kind": kind, **payload}) + "\n")
        self.out.flush()


def read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def request(method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(URL + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as answer:
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def zipped(files: dict[str, str]) -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.external_attr = 0o100755 << 16
            archive.writestr(info, text)
    return base64.b64encode(buffer.getvalue()).decode()


def process_count() -> int:
    return sum(1 for p in Path("/proc").iterdir() if p.name.isdigit())


def command_line(pid: int) -> str:
    try:
        return f"{pid} " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError as exc:
        return f"{pid} ({exc})"


def host_facts() -> dict[str, Any]:
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    return {
        "kernel": os.uname().release,
        "cmdline": read(Path("/proc/cmdline")),
        "cgroup_mounts": [m for m in mounts if m.split()[2] in ("cgroup", "cgroup2")],
        "root_controllers": read(CGROOT / "cgroup.controllers"),
        "python": sys.version.split()[0],
        "datapath_device": os.major(os.stat("/srv").st_dev),
    }


def start_jobd(log_path: Path) -> subprocess.Popen[bytes]:
    """jobd in jobd.service, as a runtime that delegates a cgroup starts a container."""
    _write(CGROOT / "cgroup.subtree_control", "+memory +cpu +pids +io")
    SERVICE.mkdir(exist_ok=True)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/root",
           "SHIV_ROOT": "/tmp/shiv", "PORT": str(PORT), "JOBD_HOST": "127.0.0.1",
           "DATAPATH": str(DATAPATH), "DB_PATH": "/srv/jobd/db", "JOBD_SLOTS": "1",
           "JOBD_ALLOW_ROOT": "true", "JOBD_KILL_GRACE": "1s", "JOBD_MIN_FREE": "1M",
           "JOBD_KEEP_WORKDIR": "true"}
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            ["python3", str(JOBD)], env=env, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=lambda: _write(SERVICE / "cgroup.procs", "0"))


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def wait_healthy(proc: subprocess.Popen[bytes], deadline: float) -> bool:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(URL + "/health", timeout=5) as answer:
                if answer.status == 200:
                    return True
        except OSError:
            pass  # not listening yet
        time.sleep(0.2)
    return False


def job_cgroup(job_id: str) -> Path | None:
    found = list(SERVICE.glob(f"jobd-*/job-{job_id}"))
    return found[0] if found else None


def run_job(spec: dict[str, Any], deadline: float) -> dict[str, Any]:
    """Submit one job, watch its cgroup from outside until it ends, gather what it left."""
    job_id = spec["id"]
    body: dict[str, Any] = {"id": job_id, "input": zipped(spec["files"])}
    for key in ("limits", "timeout"):
        if key in spec:
            body[key] = spec[key]
    before = process_count()
    began = time.monotonic()
    status, answer = request("POST", "/api/upload", body)
    result: dict[str, Any] = {"id": job_id, "upload_status": status, "upload": answer,
                              "seen": {}, "peaks": {}}
    if status != 201:
        return result
    record: dict[str, Any] = {}
    while time.monotonic() < deadline:
        group = job_cgroup(job_id)
        if group is not None:
            result["cgroup"] = str(group)
            for name in WATCHED:
                value = read(group / name)
                if value is None:
                    continue
                result["seen"][name] = value
                if name in ("memory.current", "pids.current") and value.isdigit():
                    result["peaks"][name] = max(result["peaks"].get(name, 0), int(value))
        _, record = request("GET", f"/api/v1/jobs/{job_id}")
        if record and record.get("status") in ("SUCCESS", "FAILED", "CANCELLED"):
            break
        time.sleep(0.1)
    result["record"] = record
    result["elapsed"] = time.monotonic() - began
    job_dir = DATAPATH / job_id
    result["log"] = (read(job_dir / "log") or "")[-6000:]
    result["files"] = {}
    for name in ("cpu.json", "io.json"):
        text = read(job_dir / "work" / name)
        if text is not None:
            result["files"][name] = text
    group = job_cgroup(job_id)
    result["cgroup_left"] = str(group) if group is not None else None
    # Everything the job started is gone (a fork bomb included): the count is back.
    settle = time.monotonic() + 10
    while process_count() > before and time.monotonic() < settle:
        time.sleep(0.1)
    result["processes_before"], result["processes_after"] = before, process_count()
    return result


def main() -> int:
    reporter = Reporter(RESULTS)
    started = time.monotonic()
    deadline = started + float(os.environ.get("JOBD_VM_GUEST_DEADLINE", "420"))
    reporter.emit("facts", **host_facts())
    log_path = Path("/tmp/jobd.log")
    proc = start_jobd(log_path)
    healthy = wait_healthy(proc, time.monotonic() + 120)
    jobd_cgroup = read(Path(f"/proc/{proc.pid}/cgroup"))
    reporter.emit("daemon", healthy=healthy, seconds=time.monotonic() - started,
                  cgroup=jobd_cgroup, log=(read(log_path) or "")[-4000:],
                  service_procs=[command_line(int(p)) for p in
                                 (read(SERVICE / "cgroup.procs") or "").split()],
                  service_subtree=read(SERVICE / "cgroup.subtree_control"),
                  trees=[str(p) for p in SERVICE.glob("jobd-*")])
    only = os.environ.get("JOBD_VM_JOBS", "").split(",")  # jobd_vm_jobs=a,b on the kernel line
    if healthy:
        for spec in [s for s in JOBS if s["id"] in only or only == [""]]:
            reporter.emit("job", **run_job(spec, min(deadline, time.monotonic() + 90)))
            print(f"guest: job {spec['id']} done at {time.monotonic() - started:.1f}s",
                  flush=True)
    proc.send_signal(signal.SIGTERM)
    try:
        code: int | None = proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = None
    reporter.emit("stopped", exit_code=code, log=(read(log_path) or "")[-4000:],
                  trees_left=[str(p) for p in SERVICE.glob("jobd-*")],
                  seconds=time.monotonic() - started)
    reporter.emit("end")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        # The host shows this instead of waiting for an "end" that will not come.
        Reporter(RESULTS).emit("guest-failed", traceback=traceback.format_exc())
        raise
