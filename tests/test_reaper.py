"""The reaper's subreaper duty: orphans of jobs come back to jobd, not to init."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run in a process of its own (a subreaper stays one): it becomes a subreaper and forks a
# child that forks a grandchild and exits; the orphaned grandchild reports its new parent.
_ORPHAN = """
import os, time
from jobd.reaper import become_subreaper

assert become_subreaper()
read, write = os.pipe()
child = os.fork()
if child == 0:
    parent = os.getpid()
    if os.fork() == 0:
        deadline = time.monotonic() + 10
        while os.getppid() == parent and time.monotonic() < deadline:
            time.sleep(0.01)
        os.write(write, str(os.getppid()).encode())
        os._exit(0)
    os._exit(0)
os.close(write)
os.waitpid(child, 0)
adopter = int(os.read(read, 32) or b"0")
os.wait()  # the grandchild: ours to reap now
print(adopter == os.getpid())
"""


def test_orphaned_grandchild_is_reparented_to_the_subreaper() -> None:
    done = subprocess.run([sys.executable, "-c", _ORPHAN], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
