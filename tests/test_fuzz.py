"""Fuzzing the archive reader: a bounded coverage-guided atheris run, and a hypothesis run.

`JOBD_FUZZ_SECONDS` sets the atheris budget (default 30 s, what CI spends). atheris ships
wheels for CPython 3.11+ on x86-64 Linux only (setup.cfg pins it with that marker); elsewhere
the atheris test is skipped with the reason and the hypothesis run below still mutates real
archives with a fixed budget.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobd import archive

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "tests" / "fuzz_archive.py"
FUZZ_SECONDS = int(os.environ.get("JOBD_FUZZ_SECONDS", "30"))


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                    reason="atheris is not installed: it has wheels for CPython 3.11+ on "
                           "x86-64 Linux only (the hypothesis fuzz below still runs)")
def test_atheris_finds_nothing(tmp_path: Path) -> None:
    """Coverage-guided, bounded in time: only ArchiveError may come out of the reader, and
    nothing may be written outside the destination (the harness checks both)."""
    result = subprocess.run(
        [sys.executable, str(HARNESS), f"-max_total_time={FUZZ_SECONDS}", "-timeout=20",
         "-rss_limit_mb=2048", f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=FUZZ_SECONDS + 120)
    output = result.stdout + result.stderr
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-",
                                                                              "timeout-",
                                                                              "oom-")))
    assert result.returncode == 0 and not crashes, f"{crashes}\n{output[-6000:]}"
    runs = re.search(r"Done (\d+) runs", output)
    assert runs is not None and int(runs.group(1)) > 100, output[-3000:]
    print(f"atheris: {runs.group(0)}")


# -- hypothesis: mutations of real archives ---------------------------------------------------


def _zip_seed() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("run.sh", "#!/bin/sh\necho hi\n")
        zf.writestr("dir/data.txt", "x" * 300)
        zf.writestr("dir/", "")
    return buffer.getvalue()


def _tar_seed(mode: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tf:
        for name, content in (("run.sh", b"#!/bin/sh\n"), ("d/x", b"abc" * 100)):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
        link = tarfile.TarInfo("d/l")
        link.type, link.linkname = tarfile.SYMTYPE, "x"
        tf.addfile(link)
    return buffer.getvalue()


SEEDS = [_zip_seed(), _tar_seed("w"), _tar_seed("w:gz")]
LIMITS = archive.Limits(max_size=1 << 20, max_entries=64, ratio_floor=64 << 10)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A seed with bytes overwritten, inserted, deleted or cut off."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        action = draw(st.sampled_from(("set", "insert", "delete", "cut")))
        if action == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        else:
            del data[at:]
    return bytes(data)


@given(mutated())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_archives_only_raise_archive_error(tmp_path_factory: pytest.TempPathFactory,
                                                   data: bytes) -> None:
    box = tmp_path_factory.mktemp("box")
    path = box / "input"
    path.write_bytes(data)
    dest = box / "dest"
    try:
        if archive.detect(path) == "zip":
            archive.check_zip(path, LIMITS, None)
        archive.extract(path, dest, LIMITS)
    except archive.ArchiveError as exc:
        assert str(exc)  # a message for the client
    assert sorted(p.name for p in box.iterdir()) in (["input"], ["dest", "input"])
    top = os.path.realpath(dest)
    for found in dest.rglob("*") if dest.exists() else []:
        real = os.path.realpath(found)  # links followed
        assert real == top or real.startswith(top + os.sep), found
    shutil.rmtree(box)
