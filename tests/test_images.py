"""The one file runs where it is copied: dist/jobd in bare Debian root filesystems.

Debian 11 (Python 3.9, the oldest jobd supports) and Debian 13 (Python 3.13), each made with
`debootstrap --variant=minbase --include=python3` and cached outside the repository
(tests/system/rootfs.sh). Each run is what `docker run --read-only --tmpfs /tmp --user 1000`
gives a research image: a private mount namespace (`unshare --mount`) holding the root
filesystem bind-mounted read-only, a tmpfs on /tmp, /proc and a minimal /dev, then `chroot`
as uid 1000 whose HOME is not writable. The chroot shares the host's network namespace, so the
host reaches the daemon on its loopback port.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, classic_body, free_port, wait_until

pytestmark = pytest.mark.system

SUITES = {"bullseye": "3.9", "trixie": "3.13"}
ROOTFS_SH = ROOT / "tests" / "system" / "rootfs.sh"
EXAMPLE_JOB = ROOT / "examples" / "job"
REVERSED = ">chain A\nRQKAIYATKM\n>chain B\nVPDELMHSG\n"
USER = "1000:1000"
PATH = "/usr/local/bin:/usr/bin:/bin"


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mount namespaces, chroot)"
    for tool in ("debootstrap", "unshare", "chroot", "curl"):
        if shutil.which(tool) is None:
            return f"needs {tool} (./test.sh installs it)"
    return None


@pytest.fixture(scope="module", params=sorted(SUITES))
def rootfs(request: pytest.FixtureRequest) -> tuple[str, Path]:
    """The suite's cached root filesystem (built now when missing: about 40 s each)."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    suite = request.param
    built = subprocess.run(["bash", str(ROOTFS_SH), suite], capture_output=True, text=True,
                           timeout=1200)
    assert built.returncode == 0, f"debootstrap {suite} failed:\n{built.stderr}"
    return suite, Path(built.stdout.strip().splitlines()[-1])


class Image:
    """Runs commands in the read-only root filesystem, each in its own mount namespace."""

    def __init__(self, root: Path, zipapp: Path, scratch: Path) -> None:
        self.root = root
        self.zipapp = zipapp
        self.scratch = scratch
        self.count = 0

    def script(self, argv: list[str], env: dict[str, str], *, user: str | None = USER,
               copy_in: dict[str, Path] | None = None, cache: Path | None = None,
               cache_writable: bool = False, shm: bool = True) -> list[str]:
        self.count += 1
        mnt = self.scratch / f"mnt{self.count}"
        mnt.mkdir()
        q = shlex.quote
        lines = [
            "set -eu",
            f"mnt={q(str(mnt))}",
            f'mount --bind {q(str(self.root))} "$mnt"',
            'mount -o remount,bind,ro "$mnt"',
            'mount -t tmpfs -o mode=1777,size=1g tmpfs "$mnt/tmp"',
            'mount -t proc -o nosuid,nodev,noexec proc "$mnt/proc"',
            'mount -t tmpfs -o mode=755,size=1m tmpfs "$mnt/dev"',
            'for d in null zero full random urandom tty; do',
            '    touch "$mnt/dev/$d" && mount --bind "/dev/$d" "$mnt/dev/$d"',
            "done",
            # Docker gives every container a tmpfs /dev/shm, --read-only or not.
            'mkdir "$mnt/dev/shm" && mount -t tmpfs -o mode=1777,size=64m tmpfs "$mnt/dev/shm"'
            if shm else ":",
            f'mount --bind {q(str(self.zipapp))} "$mnt/usr/local/bin/jobd"',
            'mount -o remount,bind,ro "$mnt/usr/local/bin/jobd"',
        ]
        if cache is not None:
            lines.append(f'mount --bind {q(str(cache))} "$mnt/opt/jobd-cache"')
            if not cache_writable:
                lines.append('mount -o remount,bind,ro "$mnt/opt/jobd-cache"')
        for inside, source in (copy_in or {}).items():
            lines.append(f'cp -r {q(str(source))} "$mnt"{q(inside)}')
            lines.append(f'chown -R {USER} "$mnt"{q(inside)}')
        spec = f"--userspec={user} " if user else ""
        variables = " ".join(q(f"{k}={v}") for k, v in {"PATH": PATH, "LANG": "C.UTF-8",
                                                         **env}.items())
        lines.append(f'exec chroot {spec}"$mnt" /usr/bin/env -i {variables} '
                     + " ".join(q(a) for a in argv))
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(lines)]

    def run(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 180,
            **kwargs: object) -> subprocess.CompletedProcess[str]:
        command = self.script(argv, env or {}, **kwargs)  # type: ignore[arg-type]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)

    def start(self, argv: list[str], env: dict[str, str], log: Path,
              **kwargs: object) -> subprocess.Popen[bytes]:
        """In the background; sh and chroot exec, so the pid is the daemon's own."""
        command = self.script(argv, env, **kwargs)  # type: ignore[arg-type]
        with open(log, "ab") as out:
            return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture
def image(rootfs: tuple[str, Path], zipapp: Path, tmp_path: Path) -> Image:
    return Image(rootfs[1], zipapp, tmp_path)


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=60)


class ChrootDaemon:
    def __init__(self, image: Image, tmp_path: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / "daemon.log"
        self.env = {"HOME": "/home/research", "PORT": str(self.port), "JOBD_HOST": "127.0.0.1",
                    "DATAPATH": "/tmp/jobd/data", "DB_PATH": "/tmp/jobd/db", "JOBD_SLOTS": "2",
                    **env}
        self.proc = image.start(["/usr/local/bin/jobd"], self.env, self.log)
        wait_until(self._healthy, 90, 0.1, "the daemon in the chroot to answer /health")

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n"
                                 f"{self.log.read_text(errors='replace')}")
        return curl("-f", "-o", "/dev/null", f"{self.url}/health").returncode == 0

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


@pytest.fixture
def chroot_daemon(image: Image, tmp_path: Path) -> Iterator[ChrootDaemon]:
    daemon = ChrootDaemon(image, tmp_path)
    yield daemon
    if daemon.proc.poll() is None:
        daemon.proc.kill()
        daemon.proc.wait(30)


def test_the_image_is_what_it_claims(image: Image, rootfs: tuple[str, Path]) -> None:
    """Right Python, read-only root, writable tmpfs /tmp, uid 1000 with an unwritable HOME."""
    suite, _ = rootfs
    probe = ("import os, sys; print('%d.%d' % sys.version_info[:2]); print(os.getuid()); "
             "print(os.access('/', os.W_OK), os.access(os.environ['HOME'], os.W_OK), "
             "os.access('/tmp', os.W_OK))")
    result = image.run(["python3", "-c", probe], {"HOME": "/home/research"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == [SUITES[suite], "1000", "False False True"]
    refused = image.run(["sh", "-c", "touch /usr/x"], user=None)  # even root cannot write
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr


def test_classic_protocol_from_the_host(chroot_daemon: ChrootDaemon, tmp_path: Path) -> None:
    """A job through the jq+curl protocol: curl on the host, jobd in the chroot."""
    files = {p.name: p.read_bytes() for p in EXAMPLE_JOB.iterdir()}
    body = tmp_path / "job.json"
    body.write_text(json.dumps(classic_body("in-chroot", files)))
    uploaded = curl("-w", "%{http_code}", "-o", str(tmp_path / "up.json"), "-X", "POST",
                    "-H", "Content-Type: application/json", "--data-binary", f"@{body}",
                    f"{chroot_daemon.url}/api/upload")
    assert uploaded.stdout == "201", (tmp_path / "up.json").read_text()

    def finished() -> dict | None:
        got = curl("-w", "\n%{http_code}", f"{chroot_daemon.url}/api/get/in-chroot")
        text, _, code = got.stdout.rpartition("\n")
        return json.loads(text) if code == "200" else None

    record = wait_until(finished, 60, 0.1, "the job in the chroot")
    assert (record["Status"], record["Message"]) == ("SUCCESS", "job finished successfully")
    with zipfile.ZipFile(io.BytesIO(base64.b64decode(record["Output"]))) as zf:
        assert zf.read("reversed.fasta").decode() == REVERSED
    assert chroot_daemon.stop() == 0


def test_cli_inside_the_image(image: Image, chroot_daemon: ChrootDaemon) -> None:
    """The same file as a client, in a second read-only chroot: submit --wait -o."""
    native = curl("-o", "/dev/null", "-w", "%{http_code}", f"{chroot_daemon.url}/api/v1/jobs")
    if native.stdout == "404":
        pytest.skip("this build has no native API (/api/v1) yet: the CLI needs branch api")
    script = ("jobd submit /tmp/job --id cli-in-chroot --label where=chroot --wait -o /tmp/out"
              " && cat /tmp/out/reversed.fasta && jobd list && jobd status cli-in-chroot")
    result = image.run(["sh", "-c", script],
                       {"HOME": "/home/research", "JOBD_URL": chroot_daemon.url},
                       copy_in={"/tmp/job": EXAMPLE_JOB})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "cli-in-chroot"
    assert "\n".join(lines[1:5]) + "\n" == REVERSED
    assert lines[5].split() == ["ID", "STATUS", "AGE", "DURATION", "EXIT", "LABELS"]
    assert lines[6].split()[:2] == ["cli-in-chroot", "SUCCESS"]
    assert "cli-in-chroot: SUCCESS: job finished successfully" in result.stderr
    failing = image.run(["sh", "-c", "printf 'exit 7\\n' > /tmp/run.sh && "
                         "jobd submit /tmp/run.sh --wait"],
                        {"HOME": "/home/research", "JOBD_URL": chroot_daemon.url})
    assert failing.returncode == 7, failing.stderr
    assert chroot_daemon.stop() == 0


def test_pre_unpacked_read_only_cache(image: Image, tmp_path: Path) -> None:
    """examples/Dockerfile.research: unpack into /opt/jobd-cache at build time (as root, with
    the image's own Python), then run read-only from it: nothing is unpacked into /tmp."""
    cache = tmp_path / "jobd-cache"
    cache.mkdir()
    built = image.run(["sh", "-c", "/usr/local/bin/jobd --version && chmod -R a+rX "
                       "/opt/jobd-cache"], {"SHIV_ROOT": "/opt/jobd-cache"}, user=None,
                      cache=cache, cache_writable=True)
    assert built.returncode == 0, built.stderr
    assert [p.name for p in cache.iterdir() if p.name.startswith("jobd_")]

    port = free_port()
    script = (f"/usr/local/bin/jobd & pid=$!; "
              f"for i in $(seq 300); do python3 -c \"import urllib.request as u; "
              f"u.urlopen('http://127.0.0.1:{port}/health')\" 2>/dev/null && break; sleep 0.1; "
              "done; ls -A /tmp; kill -TERM $pid; wait $pid")
    env = {"HOME": "/home/research", "SHIV_ROOT": "/opt/jobd-cache", "PORT": str(port),
           "JOBD_HOST": "127.0.0.1", "DATAPATH": "/tmp/jobd/data", "DB_PATH": "/tmp/jobd/db"}
    result = image.run(["sh", "-c", script], env, cache=cache)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["jobd"]  # its data only: no jobd_<build> unpacked here
    assert "jobd ready" in result.stderr


def test_first_start_without_dev_shm(image: Image) -> None:
    """Where there is no /dev/shm (some sandboxes), shiv's first-start compile cannot use a
    process pool (Python 3.13 then fails to start); SHIV_COMPILE_WORKERS=1 compiles in-process.
    The README gives this workaround."""
    result = image.run(["/usr/local/bin/jobd", "--version"],
                       {"HOME": "/home/research", "SHIV_COMPILE_WORKERS": "1"}, shm=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("jobd, version ")
