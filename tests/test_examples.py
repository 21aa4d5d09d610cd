"""Every example that can run here, run: the job itself, the jq+curl script of the classic
protocol and the Python orchestrator (the CLI's examples are in test_cli.py). The Dockerfiles
need a Docker engine, which this machine does not have: their content is checked here, and
tests/test_images.py runs the same file in bare Debian root filesystems the way the research
image runs it (read-only root, tmpfs /tmp, uid 1000, pre-unpacked SHIV_ROOT)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, Daemon, python39

EXAMPLES = ROOT / "examples"
REVERSED = ">chain A\nRQKAIYATKM\n>chain B\nVPDELMHSG\n"


def test_the_job_runs_as_is(tmp_path: Path) -> None:
    """run.sh finds the tool beside it outside the research image."""
    work = tmp_path / "work"
    shutil.copytree(EXAMPLES / "job", work)
    result = subprocess.run(["sh", "run.sh"], cwd=work, capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], "TOOL": "/nonexistent"}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "reversed 2 sequence line(s)\n"
    assert (work / "reversed.fasta").read_text() == REVERSED


def test_the_tool_in_the_image_is_the_tool_in_the_job() -> None:
    """Dockerfile.research copies examples/tool to /opt/tool, where run.sh looks first."""
    assert (EXAMPLES / "tool" / "reverse.py").read_text() == \
        (EXAMPLES / "job" / "reverse.py").read_text()
    dockerfile = (EXAMPLES / "Dockerfile.research").read_text()
    assert "COPY examples/tool/ /opt/tool/" in dockerfile
    assert "TOOL=${TOOL:-/opt/tool/reverse.py}" in (EXAMPLES / "job" / "run.sh").read_text()
    # The image pre-unpacks jobd where it runs it from, and keeps state under the tmpfs.
    assert re.search(r"^ENV SHIV_ROOT=/opt/jobd-cache$", dockerfile, re.M)
    assert "/bin/jobd --version" in dockerfile
    assert "DATAPATH=/tmp/" in dockerfile and "DB_PATH=/tmp/" in dockerfile
    assert "COPY --from=jobd /jobd /bin/jobd" in dockerfile
    assert "COPY --from=build /src/dist/jobd /jobd" in (ROOT / "Dockerfile").read_text()


@pytest.mark.skipif(any(shutil.which(tool) is None for tool in ("jq", "curl", "zip", "unzip")),
                    reason="classic.sh needs jq, curl, zip and unzip (./test.sh installs them)")
def test_classic_sh(daemon: Daemon, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(EXAMPLES / "classic.sh"), daemon.url, "classic-1",
                             str(EXAMPLES / "job"), str(out)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "submitted classic-1",
        f"classic-1: SUCCESS: job finished successfully (files in {out})",
    ]
    assert (out / "reversed.fasta").read_text() == REVERSED

    failing = tmp_path / "failing"
    failing.mkdir()
    (failing / "run.sh").write_text("echo broken >&2\nexit 5\n")
    result = subprocess.run(["bash", str(EXAMPLES / "classic.sh"), daemon.url, "classic-2",
                             str(failing), str(tmp_path / "out2")],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 1
    assert "classic-2: FAILED: could not finish the job, error: exit status 5" in result.stdout
    assert (tmp_path / "out2" / "run.sh").exists()  # a failed job's directory comes back too


def _inputs(where: Path, count: int) -> list[Path]:
    where.mkdir()
    paths = []
    for n in range(count):
        path = where / f"seq{n}.fasta"
        path.write_text(f">s{n}\n{'ACDEFGHIKLMNPQRSTVWY'[n:] + str(n)}\n")
        paths.append(path)
    return paths


@pytest.mark.parametrize("interpreter", ["current", "3.9"])
def test_orchestrator_fans_out_and_collects(daemon: Daemon, tmp_path: Path,
                                            interpreter: str) -> None:
    python = sys.executable if interpreter == "current" else python39()
    if python is None:
        pytest.skip("no CPython 3.9 on this machine")
    inputs = _inputs(tmp_path / "in", 12)
    out = tmp_path / "results"
    result = subprocess.run([python, str(EXAMPLES / "orchestrator.py"), "--url", daemon.url,
                             "--out", str(out), "--prefix", "fan", "--parallel", "4",
                             *map(str, inputs)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == sorted(
        f"fan-{n}: SUCCESS: job finished successfully" for n in range(1, 13))
    assert "12 of 12 job(s) succeeded" in result.stderr
    for n, path in enumerate(inputs, 1):
        header, sequence = path.read_text().splitlines()
        got = (out / f"fan-{n}" / "reversed.fasta").read_text()
        assert got == f"{header}\n{sequence[::-1]}\n"
        assert os.access(out / f"fan-{n}" / "run.sh", os.X_OK)


def test_orchestrator_reports_failures(daemon: Daemon, tmp_path: Path) -> None:
    template = tmp_path / "template"
    template.mkdir()
    (template / "run.sh").write_text("grep -q good input.fasta\n")
    good, bad = tmp_path / "good.fasta", tmp_path / "bad.fasta"
    good.write_text("good\n")
    bad.write_text("bad\n")
    result = subprocess.run([sys.executable, str(EXAMPLES / "orchestrator.py"), "--url",
                             daemon.url, "--job", str(template), "--out", str(tmp_path / "r"),
                             "--prefix", "mixed", str(good), str(bad)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 1
    assert "mixed-1: SUCCESS" in result.stdout
    assert "mixed-2: FAILED: could not finish the job, error: exit status 1" in result.stdout
    assert "1 of 2 job(s) succeeded" in result.stderr
