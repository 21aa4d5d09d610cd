"""The local executor's pure parts: which argv runs an entry point, finding a job's strays."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobd import run
from jobd.run import (
    FUNCTION_RUNNER,
    INTERPRETERS,
    StartError,
    command_for,
    created_since,
    kill_marked,
    marked_processes,
)
from tests.conftest import wait_until


def write(path: Path, content: bytes | str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    path.chmod(mode)


def test_interpreters_by_extension() -> None:
    assert INTERPRETERS == {".py": "python3", ".sh": "bash", ".r": "Rscript", ".js": "node"}


@pytest.mark.parametrize(("entry", "argv"), [
    ("main.py", ["python3", "-u", "main.py", "a"]),
    ("tool.sh", ["bash", "tool.sh", "a"]),
    ("analysis.R", ["Rscript", "analysis.R", "a"]),
    ("analysis.r", ["Rscript", "analysis.r", "a"]),
    ("app.js", ["node", "app.js", "a"]),
    ("APP.JS", ["node", "APP.JS", "a"]),
    ("run.sh", ["/bin/sh", "run.sh", "a"]),  # the classic jobd's way
    ("sub/run.sh", ["bash", "sub/run.sh", "a"]),
    ("job.txt", ["/bin/sh", "job.txt", "a"]),
])
def test_entries_without_a_shebang(tmp_path: Path, entry: str, argv: list[str]) -> None:
    write(tmp_path / entry, "echo hi\n")
    assert command_for(tmp_path, entry, ["a"]) == argv


def test_shebang_and_elf_run_directly_and_get_the_exec_bit(tmp_path: Path) -> None:
    write(tmp_path / "main.py", "#!/usr/bin/env python3\n")
    write(tmp_path / "bin/prog", b"\x7fELF\x02\x01\x01")
    assert command_for(tmp_path, "main.py", ["x"]) == ["./main.py", "x"]
    assert command_for(tmp_path, "bin/prog") == ["./bin/prog"]
    assert os.stat(tmp_path / "main.py").st_mode & 0o111
    assert os.stat(tmp_path / "bin/prog").st_mode & 0o111


def test_function_runs_through_the_runner(tmp_path: Path) -> None:
    write(tmp_path / "tool.py", "#!/usr/bin/env python3\n")  # a shebang does not matter here
    assert command_for(tmp_path, "tool.py", ["1"], function="main") == \
        ["python3", "-u", "-c", FUNCTION_RUNNER, "tool.py", "main", "1"]


def test_function_runner_semantics(tmp_path: Path) -> None:
    write(tmp_path / "m.py", "import sys\n"
                             "def none(*a): print('args', a)\n"
                             "def code(x): return int(x)\n"
                             "def text(): return 'printed'\n"
                             "def boom(): raise ValueError('bad')\n"
                             "def flag(): return True\n")

    def run(name: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", FUNCTION_RUNNER, "m.py", name, *args],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)

    assert (run("none", "1", "two").returncode, run("none", "1", "two").stdout) == \
        (0, "args ('1', 'two')\n")
    assert run("code", "7").returncode == 7
    assert (run("text").returncode, run("text").stdout) == (0, "printed\n")
    failed = run("boom")
    assert failed.returncode == 1 and "ValueError: bad" in failed.stderr
    assert (run("flag").returncode, run("flag").stdout) == (0, "True\n")
    missing = run("nope")
    assert missing.returncode == 1 and "jobd: m.py has no function nope" in missing.stderr


def test_missing_interpreter_is_named(tmp_path: Path) -> None:
    write(tmp_path / "a.R", "print(1)\n")
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    with pytest.raises(StartError, match=r"a.R needs Rscript, which is not installed "
                                         r"\(not found on PATH .*empty-bin\)"):
        command_for(tmp_path, "a.R", path=str(empty))
    python = shutil.which("python3")
    assert python is not None
    write(tmp_path / "a.py", "print(1)\n")
    assert command_for(tmp_path, "a.py", path=os.path.dirname(python))[0] == "python3"


def test_a_missing_shebang_interpreter_is_found_before_the_start(tmp_path: Path) -> None:
    env = {"PATH": os.defpath}
    write(tmp_path / "mysh", "")  # an interpreter beside the script, named relatively
    cases = {
        "#!/no/such/python\n": "/no/such/python",
        "#!/usr/bin/env no-such-tool -x\n": "no-such-tool",
        "#!/bin/sh\r\necho\r\n": "/bin/sh\r",
        "#!/bin/sh\n": None,
        "#!/bin/sh\0junk\n": None,  # the kernel ends the name at a NUL
        "#!mysh\n": None,  # relative: from the script's directory, not jobd's
        "#!./nope\n": "./nope",
        "#! /usr/bin/env -S sh -e\n": None,
        "#!/usr/bin/env -S -u FOO no-such-tool\n": None,  # env's options: env decides
        "#!/usr/bin/env PATH=/opt/bin no-such-tool\n": None,
        "#!/usr/bin/env ./mysh\n": None,
        "echo no shebang\n": None,
    }
    for text, missing in cases.items():
        write(tmp_path / "run.sh", text)
        assert run.missing_interpreter(tmp_path / "run.sh", env, tmp_path) == missing, text
    assert run.missing_interpreter(tmp_path / "absent.sh", env, tmp_path) is None
    (tmp_path / "sub").mkdir()  # a relative interpreter is found from the working directory
    write(tmp_path / "sub" / "run.sh", "#!mysh\n")
    assert run.missing_interpreter(tmp_path / "sub" / "run.sh", env, tmp_path) is None
    os.mkfifo(tmp_path / "fifo")  # a link to a FIFO must not block the daemon
    (tmp_path / "link.sh").symlink_to(tmp_path / "fifo")
    assert run.missing_interpreter(tmp_path / "link.sh", env, tmp_path) is None
    assert run.missing_interpreter(tmp_path / "fifo", env, tmp_path) is None
    assert "Windows line endings" in str(run._interpreter_error("./run.sh", "/bin/sh\r"))
    assert "ELF interpreter" in str(run._interpreter_error("./run.sh", "ELF"))


def test_kill_marked_finds_processes_that_left_the_group(tmp_path: Path) -> None:
    marker = f"JOBD_WORKDIR={tmp_path}/work"
    env = {**os.environ, "JOBD_WORKDIR": f"{tmp_path}/work"}
    other = {**os.environ, "JOBD_WORKDIR": f"{tmp_path}/work2"}  # another job: left alone
    mine = subprocess.Popen(["sleep", "60"], env=env, start_new_session=True)
    theirs = subprocess.Popen(["sleep", "60"], env=other, start_new_session=True)
    try:
        wait_until(lambda: mine.pid in marked_processes(marker.encode()), 10,
                   what="the marked process to be visible")
        assert theirs.pid not in marked_processes(marker.encode())
        assert kill_marked(marker.encode(), signal.SIGKILL) >= 1
        assert mine.wait(10) == -signal.SIGKILL
        time.sleep(0.05)
        assert theirs.poll() is None
        assert marked_processes(marker.encode()) == []
    finally:
        for proc in (mine, theirs):
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("probe_span", [64, 0], ids=["probed", "listed"])
def test_created_since_finds_new_processes_only(probe_span: int,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The pid window of a young job: its own processes, not those started before it,
    whether the few pids are looked up one by one or found in a listing of /proc."""
    monkeypatch.setattr(run, "_PROBE_SPAN", probe_span)
    older = os.getpid()
    first = subprocess.Popen(["sleep", "30"])
    second = subprocess.Popen(["sleep", "30"])
    try:
        found = created_since(first.pid)
        assert found is not None
        assert first.pid in found and second.pid in found
        assert older not in found or older > first.pid  # only if pids went round since
        assert second.pid in (created_since(second.pid) or [])
    finally:
        for proc in (first, second):
            proc.kill()
            proc.wait()
