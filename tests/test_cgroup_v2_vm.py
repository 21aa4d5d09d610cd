"""jobd's cgroup v2 limits, enforced for real: dist/jobd on a pure cgroup v2 host under qemu.

The machines this suite runs on mix cgroup v1 and v2 (the v2 tree has no controllers), so there
the limits can only be checked as the values written. Here a Debian kernel boots under qemu
(TCG software emulation: no KVM needed) with `cgroup_no_v1=all` and cgroup2 alone on
/sys/fs/cgroup. Its initramfs holds a static busybox, the virtio modules, tests/system/vm/init
as PID 1, the zipapp and tests/system/vm/guest.py. The root filesystem is the Debian trixie
tree of tests/system/rootfs.sh (cached; it has python3) copied into an ext4 image and attached
read-only; a second, empty ext4 disk holds DATAPATH, so io.max has a real block device.
The guest script runs jobd in a delegated cgroup, submits jobs that push against each limit and
writes what happened as JSON lines to the second serial port, which qemu writes to a file here.
One boot serves every test of this module (about a minute under TCG on 2 shared cores).

Skipped, with the reason, only when qemu, a kernel, busybox or the root filesystem cannot be had
(not root, no apt-get, or the install fails); ./test.sh installs the packages on a fresh machine.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

PACKAGES = {"qemu-system-x86_64": "qemu-system-x86", "kernel": "linux-image-cloud-amd64",
            "busybox": "busybox-static", "mkfs.ext4": "e2fsprogs"}
SUITE = "trixie"
VM_DIR = ROOT / "tests" / "system" / "vm"
ROOTFS_SH = ROOT / "tests" / "system" / "rootfs.sh"
MODULES = ("virtio_pci", "virtio_blk")  # the rest is built in (ext4, cgroups, 8250 serial)
BUSYBOX = Path("/bin/busybox")
MARK = "JOBD-VM "
DEADLINE = 600  # seconds for the whole VM run; it takes about 60 under TCG
MiB = 1 << 20


# -- what the VM needs ------------------------------------------------------------------------


def kernel() -> tuple[Path, Path] | None:
    """The newest Debian kernel in /boot whose modules are installed: (vmlinuz, modules dir)."""
    found = []
    for image in Path("/boot").glob("vmlinuz-*"):
        version = image.name[len("vmlinuz-"):]
        modules = Path("/lib/modules") / version
        if (modules / "modules.dep").exists():
            key = [int(n) for n in re.findall(r"\d+", version)]
            found.append((key, image, modules))
    if not found:
        return None
    _, image, modules = max(found)
    return image, modules


def static_busybox() -> bool:
    """busybox-static's /bin/busybox (the dynamic one would need a libc in the initramfs)."""
    try:
        head = BUSYBOX.read_bytes()[:1 << 16]
    except OSError:
        return False
    return b"ld-linux" not in head


def missing_packages() -> list[str]:
    missing = []
    if shutil.which("qemu-system-x86_64") is None:
        missing.append(PACKAGES["qemu-system-x86_64"])
    if kernel() is None:
        missing.append(PACKAGES["kernel"])
    if not static_busybox():
        missing.append(PACKAGES["busybox"])
    if shutil.which("mkfs.ext4", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
        missing.append(PACKAGES["mkfs.ext4"])
    return missing


def install(packages: list[str]) -> str | None:
    """apt-get install them (as ./test.sh does); the reason to skip when that is not possible."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"needs {' '.join(packages)} (./test.sh installs them as root with apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    argv = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:  # a fresh machine may have no package lists yet
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, timeout=600)
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        return f"cannot install {' '.join(packages)}: {done.stderr.strip()[-500:]}"
    return None


def modules_in_order(modules_dir: Path, wanted: tuple[str, ...]) -> list[Path]:
    """The module files for `wanted` and what they depend on, dependencies first
    (modules.dep); none for a module built into the kernel."""
    def name_of(path: str) -> str:
        return Path(path).name.split(".ko")[0].replace("-", "_")

    builtin_list = modules_dir / "modules.builtin"
    builtin = {name_of(line) for line in builtin_list.read_text().split()} \
        if builtin_list.exists() else set()
    deps: dict[str, list[str]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        name, _, rest = line.partition(":")
        deps[name] = rest.split()
    by_module = {name_of(p): p for p in deps}
    ordered: list[str] = []

    def visit(path: str) -> None:
        for dep in deps[path]:
            visit(dep)
        if path not in ordered:
            ordered.append(path)

    for name in wanted:
        if name in builtin:
            continue
        if name not in by_module:
            raise FileNotFoundError(f"kernel module {name} is not in {modules_dir}")
        visit(by_module[name])
    return [modules_dir / p for p in ordered]


def module_bytes(path: Path) -> bytes:
    """A module as insmod takes it: Debian compresses modules with xz since Linux 6.x."""
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if not path.name.endswith(".ko"):
        raise ValueError(f"cannot unpack kernel module {path} (only .ko, .ko.xz, .ko.gz)")
    return path.read_bytes()


def cpio(entries: list[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """An uncompressed `newc` cpio archive (what the kernel unpacks as its initramfs).

    Entries are (name, mode with file type, content, (rdev major, rdev minor)).
    """
    out = bytearray()

    def add(name: str, mode: int, data: bytes, rdev: tuple[int, int], ino: int) -> None:
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data, rdev) in enumerate(entries, start=1):
        add(name, mode, data, rdev, ino)
    add("TRAILER!!!", 0, b"", (0, 0), 0)
    return bytes(out)


def initramfs(dest: Path, modules_dir: Path, zipapp: Path) -> None:
    directory, regular, executable = 0o040755, 0o100644, 0o100755
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = [
        (name, directory, b"", (0, 0))
        for name in ("bin", "dev", "proc", "sys", "lib", "lib/modules", "payload", "newroot")]
    entries.append(("dev/console", 0o020600, b"", (5, 1)))  # init's output before devtmpfs
    entries.append(("init", executable, (VM_DIR / "init").read_bytes(), (0, 0)))
    entries.append(("bin/busybox", executable, BUSYBOX.read_bytes(), (0, 0)))
    ko = {p.name.split(".ko")[0] + ".ko": module_bytes(p)
          for p in modules_in_order(modules_dir, MODULES)}
    entries.append(("modules", regular, "".join(name + "\n" for name in ko).encode(), (0, 0)))
    entries += [(f"lib/modules/{name}", regular, data, (0, 0)) for name, data in ko.items()]
    entries.append(("payload/jobd", executable, zipapp.read_bytes(), (0, 0)))
    entries.append(("payload/guest.py", regular, (VM_DIR / "guest.py").read_bytes(), (0, 0)))
    dest.write_bytes(cpio(entries))


def mkfs(image: Path, size: str, source: Path | None = None) -> None:
    argv = ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"]
    if source is not None:
        argv += ["-d", str(source)]
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
    done = subprocess.run([*argv, str(image), size], capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"mkfs.ext4 {image}: {done.stderr}"


# -- one boot for the whole module ------------------------------------------------------------


class Report:
    """What the guest reported, by kind; the console log for failure messages."""

    def __init__(self, lines: list[dict[str, Any]], console: str, seconds: float) -> None:
        self.lines = lines
        self.console = console
        self.seconds = seconds
        self.jobs = {line["id"]: line for line in lines if line["kind"] == "job"}

    def one(self, kind: str) -> dict[str, Any]:
        found = [line for line in self.lines if line["kind"] == kind]
        assert found, f"the guest reported no {kind!r}; console:\n{self.console[-6000:]}"
        return found[0]

    def job(self, job_id: str) -> dict[str, Any]:
        assert job_id in self.jobs, \
            f"the guest reported no job {job_id}; console:\n{self.console[-6000:]}"
        return self.jobs[job_id]


@pytest.fixture(scope="module")
def vm(zipapp: Path, tmp_path_factory: pytest.TempPathFactory) -> Report:
    missing = missing_packages()
    if missing:
        reason = install(missing)
        if reason:
            pytest.skip(reason)
        assert not missing_packages(), f"still missing after install: {missing_packages()}"
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        pytest.skip("the guest's root filesystem needs root and debootstrap "
                    "(./test.sh installs it)")
    built = subprocess.run(["bash", str(ROOTFS_SH), SUITE], capture_output=True, text=True,
                           timeout=1200)
    assert built.returncode == 0, f"debootstrap {SUITE} failed:\n{built.stderr}"
    rootfs = Path(built.stdout.strip().splitlines()[-1])

    work = tmp_path_factory.mktemp("vm")
    found = kernel()
    assert found is not None
    vmlinuz, modules_dir = found
    initramfs(work / "initramfs.cpio", modules_dir, zipapp)
    mkfs(work / "root.img", "512M", rootfs)
    mkfs(work / "data.img", "256M")
    console, results = work / "console.log", work / "results.log"
    accel = os.environ.get("JOBD_VM_ACCEL", "tcg")  # KVM is often unusable in a container
    argv = [
        "qemu-system-x86_64", "-accel", accel, "-m", "1024", "-smp", "1",
        "-nodefaults", "-display", "none", "-no-reboot",
        "-kernel", str(vmlinuz), "-initrd", str(work / "initramfs.cpio"),
        "-append", "console=ttyS0 panic=-1 oops=panic cgroup_no_v1=all loglevel=4"
                   # Debugging: JOBD_VM_JOBS=mem-hogs,cpu runs only those jobs in the guest.
                   + (f" jobd_vm_jobs={os.environ['JOBD_VM_JOBS']}"
                      if os.environ.get("JOBD_VM_JOBS") else ""),
        "-drive", f"file={work / 'root.img'},format=raw,if=virtio,readonly=on",
        "-drive", f"file={work / 'data.img'},format=raw,if=virtio",
        "-serial", f"file:{console}", "-serial", f"file:{results}",
    ]
    began = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=DEADLINE)
        qemu_error = done.stderr if done.returncode != 0 else ""
    except subprocess.TimeoutExpired:
        qemu_error = f"the VM did not finish within {DEADLINE}s"
    seconds = time.monotonic() - began
    for image in ("root.img", "data.img"):  # 200 MB; the logs stay for a look after a failure
        (work / image).unlink()
    console_text = console.read_text(errors="replace") if console.exists() else ""
    lines = []
    if results.exists():
        for raw in results.read_text(errors="replace").splitlines():
            if raw.startswith(MARK):
                try:
                    lines.append(json.loads(raw[len(MARK):]))
                except json.JSONDecodeError:
                    continue  # cut short by the deadline: the missing "end" says so
    report = Report(lines, console_text, seconds)
    for line in lines:
        assert line["kind"] not in ("init-failed", "guest-failed"), \
            f"{line}\nconsole:\n{console_text[-6000:]}"
    assert lines and lines[-1]["kind"] == "end", \
        f"{qemu_error}\nguest report incomplete after {seconds:.0f}s; console:\n" \
        f"{console_text[-6000:]}"
    return report


def explain(job: dict[str, Any]) -> str:
    return json.dumps(job, indent=1)[-6000:]


# -- the tests ----------------------------------------------------------------------------------


def test_the_guest_is_a_pure_cgroup_v2_host_with_every_controller(vm: Report) -> None:
    facts = vm.one("facts")
    assert [m.split()[2] for m in facts["cgroup_mounts"]] == ["cgroup2"], facts
    assert set(facts["root_controllers"].split()) >= {"memory", "cpu", "pids", "io"}, facts
    assert facts["datapath_device"] != 0  # DATAPATH is on a real block device (vdb)


def test_jobd_moves_itself_into_a_leaf_and_enables_the_controllers(vm: Report) -> None:
    """Started in a delegated cgroup that holds it (as a container is), jobd goes into
    `jobd-daemon` so that cgroup can hand memory, cpu, pids and io to the job cgroups."""
    daemon = vm.one("daemon")
    assert daemon["healthy"], daemon["log"]
    assert daemon["cgroup"] == "0::/jobd.service/jobd-daemon", daemon
    assert "limits: setrlimit + cgroup v2 /sys/fs/cgroup/jobd.service/jobd-" in daemon["log"]
    assert "(controllers: memory cpu pids io; cgroup.kill)" in daemon["log"], daemon["log"]
    assert set(daemon["service_subtree"].split()) == {"memory", "cpu", "pids", "io"}
    # The helpers Python 3.13 leaves from shiv's first unpack moved with it (else: EBUSY).
    assert daemon["service_procs"] == [], daemon
    assert re.search(r"moved jobd and \d helper process\(es\) of its own into", daemon["log"])
    stopped = vm.one("stopped")
    assert stopped["exit_code"] == 0, stopped["log"]
    # The per-daemon cgroup is removed at stop; the leaf stays for the next start.
    assert stopped["trees_left"] == ["/sys/fs/cgroup/jobd.service/jobd-daemon"], stopped


def test_memory_hogs_are_killed_at_the_job_limit_and_the_message_says_so(vm: Report) -> None:
    """Three processes of 40 MiB each, every one far under the 64M RLIMIT_DATA: only the
    cgroup's memory.max (for the job as a whole) stops them, and the kernel's OOM kill count
    makes jobd's message definite. The same job without a limit finishes."""
    job = vm.job("mem-hogs")
    record = job["record"]
    assert record["status"] == "FAILED", explain(job)
    assert record["signal"] == "SIGKILL", explain(job)
    # memory.oom.group: the kernel kills the job's shell and its three hogs together.
    assert record["message"] == ("could not finish the job: out of memory: the kernel killed the "
                                 "job at its memory limit 64M (signal: SIGKILL (9))"), explain(job)
    # The job pressed against memory.max: seen in memory.events, or, when jobd removed the
    # cgroup within the observer's 0.1 s after the kill, in the last memory.current it read.
    events = dict(line.split() for line in job["seen"]["memory.events"].splitlines())
    assert int(events["max"]) > 0 or job["peaks"]["memory.current"] > 56 * MiB, explain(job)
    assert f"memory.max {64 * MiB}" in job["log"]  # what the job itself saw
    assert "memory.oom.group 1" in job["log"]
    assert "all hogs done" not in job["log"]
    assert 0 < job["peaks"]["memory.current"] <= 64 * MiB, explain(job)
    assert job["cgroup_left"] is None
    free = vm.job("mem-hogs-free")
    assert free["record"]["status"] == "SUCCESS", explain(free)
    assert free["log"].count("holds 40 MiB") == 3, explain(free)
    assert free["peaks"]["memory.current"] > 100 * MiB, explain(free)  # what the limit denied


def test_a_single_memory_hog_is_stopped_at_its_limit(vm: Report) -> None:
    """One process: RLIMIT_DATA is the same 64M and refuses its allocations before memory.max
    is reached (anonymous memory is what both count), so the job ends with MemoryError and
    jobd says "probably"; were the cgroup to act first, the message would be the definite one."""
    job = vm.job("mem-single")
    record = job["record"]
    assert record["status"] == "FAILED", explain(job)
    assert record["message"] in (
        "could not finish the job: memory limit 64M was probably reached (the log reports a "
        "failed allocation) (exit status 1)",
        "could not finish the job: out of memory: the kernel killed the job at its memory "
        "limit 64M (signal: SIGKILL (9))"), explain(job)
    assert "holds 200 MiB" not in job["log"]
    assert 0 < job["peaks"]["memory.current"] <= 64 * MiB, explain(job)


def test_a_fork_bomb_is_held_at_pids_max_and_killed_whole(vm: Report) -> None:
    """Jobs run as root here, so RLIMIT_NPROC does not apply: pids.max alone holds the bomb.
    At the timeout jobd kills every process of the job through cgroup.kill."""
    job = vm.job("forkbomb")
    record = job["record"]
    assert "pids.max 24" in job["log"], explain(job)
    assert record["status"] == "FAILED", explain(job)
    assert record["message"].startswith("could not finish the job: timed out after 8s"), \
        explain(job)
    assert 0 < job["peaks"]["pids.current"] <= 24, explain(job)
    events = dict(line.split() for line in job["seen"]["pids.events"].splitlines())
    assert int(events["max"]) > 0, explain(job)  # forks refused by pids.max
    assert job["processes_after"] <= job["processes_before"], explain(job)
    assert job["cgroup_left"] is None


def test_cpu_max_holds_a_busy_loop_to_its_quota(vm: Report) -> None:
    limited = json.loads(vm.job("cpu")["files"]["cpu.json"])
    free = json.loads(vm.job("cpu-free")["files"]["cpu.json"])
    assert limited["cpu.max"] == "25000 100000"
    share = limited["cpu"] / limited["wall"]
    assert share <= 0.25 * 1.2, limited
    assert limited["nr_throttled"] > 0, limited
    assert free["cpu"] / free["wall"] >= 0.5, free  # the same loop unlimited: most of a CPU


def test_io_max_throttles_reads_and_writes_on_the_disk_of_datapath(vm: Report) -> None:
    job = vm.job("io")
    limited = json.loads(job["files"]["io.json"])
    free = json.loads(vm.job("io-free")["files"]["io.json"])
    assert re.fullmatch(r"\d+:\d+ rbps=1048576 wbps=1048576 riops=max wiops=max",
                        limited["io.max"]), limited
    rate = 1 * MiB
    for direction in ("write_s", "read_s"):
        assert limited["bytes"] / limited[direction] <= rate * 1.25, limited
        assert free["bytes"] / free[direction] > rate * 2, free
