"""The Slurm executor's pure parts: parsing Slurm's output, option checks, the batch script."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from jobd.config import Config, ConfigError
from jobd.run import Outcome
from jobd.slurm import (
    OptionError,
    SlurmError,
    SlurmSetupError,
    batch_script,
    check_extra_options,
    decode_status,
    is_unreachable,
    mount_of,
    outcome_for,
    parse_exit_pair,
    parse_job_id,
    parse_sacct,
    parse_scontrol,
    parse_squeue,
    resource_options,
    shared_storage_problems,
    time_limit_minutes,
)


def test_raw_exit_status_from_squeue() -> None:
    assert decode_status(0) == (0, None)
    assert decode_status(3 << 8) == (3, None)
    assert decode_status(9) == (None, 9)
    assert decode_status(15) == (None, 15)


def test_exit_code_pairs() -> None:
    assert parse_exit_pair("0:0") == (0, None)
    assert parse_exit_pair("3:0") == (3, None)
    assert parse_exit_pair("0:15") == (None, 15)
    assert parse_exit_pair("nonsense") is None


@pytest.mark.parametrize(("state", "code", "signum", "requested", "expected"), [
    ("COMPLETED", 0, None, None, Outcome(0, None, None)),
    ("FAILED", 3, None, None, Outcome(3, None, None)),
    ("FAILED", None, 9, None, Outcome(None, 9, None)),
    ("FAILED", 0, None, None, Outcome(0, None, "Slurm reports FAILED")),
    ("CANCELLED", 0, None, None, Outcome(0, None, "cancelled")),
    ("CANCELLED", None, 15, "timed out after 2s", Outcome(None, 15, "timed out after 2s")),
    ("TIMEOUT", None, 15, None, Outcome(None, 15, "the Slurm time limit was reached")),
    ("NODE_FAIL", 0, None, None, Outcome(0, None, "its Slurm node failed")),
    ("OUT_OF_MEMORY", 0, 9, None, Outcome(0, 9, "it ran out of memory (Slurm)")),
    ("WEIRD", 0, None, None, Outcome(0, None, "Slurm reports WEIRD")),
])
def test_outcomes(state: str, code: int | None, signum: int | None, requested: str | None,
                  expected: Outcome) -> None:
    assert outcome_for(state, code, signum, requested) == expected


def test_squeue_rows() -> None:
    text = ("7|CANCELLED|1792|2026-11-23T10:15:48|localhost|None|\n"
            "8|PENDING|0|N/A||Priority|\n"
            "9|RUNNING|0|2026-11-23T10:15:49|node[1-2]|None|\n"
            "10|FAILED|||x|odd|reason|with pipes|\n"
            "slurm_load_jobs error: whatever\n")
    rows = parse_squeue(text)
    assert sorted(rows) == [7, 8, 9, 10]
    assert rows[7].state == "CANCELLED" and (rows[7].exit_code, rows[7].signal) == (7, None)
    assert rows[7].start is not None and rows[8].start is None
    assert rows[8].reason == "Priority" and rows[8].nodes == ""
    assert rows[9].nodes == "node[1-2]"
    assert rows[10].exit_known is False and rows[10].reason == "odd|reason|with pipes"


def test_sacct_rows() -> None:
    text = ("41|COMPLETED|0:0\n41.batch|COMPLETED|0:0\n42|CANCELLED by 0|0:15\n"
            "43|FAILED|2:0\n44|RUNNING|0:0\n")
    assert parse_sacct(text) == {41: ("COMPLETED", 0, None), 42: ("CANCELLED", None, 15),
                                 43: ("FAILED", 2, None), 44: ("RUNNING", 0, None)}


def test_scontrol_line() -> None:
    line = ("JobId=1 JobName=jobd-a UserId=root(0) JobState=FAILED Reason=NonZeroExitCode "
            "Dependency=(null) Requeue=0 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=3:0 "
            "DerivedExitCode=0:0 RunTime=00:00:01")
    assert parse_scontrol(line) == ("FAILED", 3, None)
    assert parse_scontrol("nothing here") is None


def test_job_id_from_sbatch() -> None:
    assert parse_job_id("123\n") == 123
    assert parse_job_id("124;cluster\n") == 124
    with pytest.raises(SlurmError):
        parse_job_id("Submitted batch job 12\n")


def test_unreachable_errors_are_recognised() -> None:
    assert is_unreachable("slurm_load_jobs error: Unable to contact slurm controller "
                          "(connect failure)")
    assert is_unreachable("sbatch: error: Batch job submission failed: Socket timed out on "
                          "send/recv operation")
    assert not is_unreachable("sbatch: error: Batch job submission failed: Invalid partition "
                              "name specified")


def test_resources_become_sbatch_options() -> None:
    assert resource_options({}, 0) == []
    assert resource_options({"cpus": 4, "memory": "1G", "gpus": 2, "timeout": 90}, 0) == [
        "--cpus-per-task=4", "--mem=1024M", "--gpus=2", "--time=3"]
    assert resource_options({"memory": 1_500_000_000, "gpus": "a100:2"}, 0) == [
        "--mem=1431M", "--gpus=a100:2"]
    assert resource_options({}, 3600) == ["--time=61"]  # the deployment's JOBD_TIMEOUT
    assert time_limit_minutes(2) == 2 and time_limit_minutes(60) == 2


@pytest.mark.parametrize("options", [
    {"cpus": "4 --wrap=rm"}, {"cpus": 0}, {"cpus": True}, {"cpus": 2.5},
    {"memory": "1G;rm"}, {"memory": "lots"}, {"memory": 10}, {"memory": True},
    {"gpus": "a100:2 --x"}, {"gpus": "../x:1"}, {"gpus": 0},
    {"timeout": "soon"}, {"timeout": -1}, {"timeout": float("inf")},
])
def test_unsafe_resources_refused(options: dict) -> None:
    with pytest.raises(OptionError):
        resource_options(options, 0)


@pytest.mark.parametrize("word", ["--output=/etc/x", "-o/etc/x", "-o", "--chdir=/", "-D/",
                                  "--job-name=x", "-Jx", "--export=NONE", "--wrap=rm",
                                  "--comment=x", "--array=1-9", "--parsable"])
def test_extra_options_cannot_replace_jobds(word: str) -> None:
    with pytest.raises(SlurmSetupError):
        check_extra_options([word])


def test_extra_options_allowed() -> None:
    check_extra_options(["--constraint=avx2", "--exclusive", "-pdebug", "--nice=10"])


def test_slurm_settings_parse() -> None:
    config = Config.load({"JOBD_EXECUTOR": "slurm", "JOBD_SLURM_PARTITION": "gpu,cpu",
                          "JOBD_SLURM_EXTRA": "--constraint=avx2 --exclusive",
                          "JOBD_SLURM_UNREACHABLE_DEADLINE": "2h"})
    assert config.slurm_enabled and not Config.load({}).slurm_enabled
    assert config.slurm_partition == "gpu,cpu"
    assert config.slurm_extra == ("--constraint=avx2", "--exclusive")
    assert config.slurm_unreachable_deadline == 7200
    for env in ({"JOBD_EXECUTOR": "cloud"}, {"JOBD_SLURM_PARTITION": "a b"},
                {"JOBD_SLURM_ACCOUNT": "x;rm"}, {"JOBD_SLURM_EXTRA": "--a 'b"},
                {"JOBD_SLURM_EXTRA": "--mem 4G"}, {"JOBD_SLURM_SHARED_CHECK": "maybe"}):
        with pytest.raises(ConfigError, match=next(iter(env))):
            Config.load(env)


MOUNTINFO = """\
22 1 0:21 / / rw,relatime - overlay overlay rw,lowerdir=/x
23 22 0:22 / /tmp rw,nosuid - tmpfs tmpfs rw
24 22 0:23 / /shared rw - nfs4 server:/export rw
25 24 0:24 / /shared/scratch\\040space rw - lustre x rw
"""


def test_mount_lookup() -> None:
    assert mount_of(Path("/shared/jobs"), MOUNTINFO) == ("/shared", "nfs4")
    assert mount_of(Path("/sharedx"), MOUNTINFO) == ("/", "overlay")
    assert mount_of(Path("/shared/scratch space/a"), MOUNTINFO) == ("/shared/scratch space",
                                                                     "lustre")


def test_shared_storage_checks() -> None:
    assert shared_storage_problems(Path("/shared/jobd"), MOUNTINFO) == []
    problems = shared_storage_problems(Path("/tmp/jobd"), MOUNTINFO)
    assert any("under /tmp" in p for p in problems)
    assert any("is on tmpfs" in p for p in problems)
    assert any("is on overlay" in p for p in shared_storage_problems(Path("/data"), MOUNTINFO))
    assert any("is relative" in p
               for p in shared_storage_problems(Path("data"), MOUNTINFO))


def test_batch_script_runs_only_its_own_submission(tmp_path: Path) -> None:
    """The generated script, run by a real sh: quoting holds, a stale token runs nothing."""
    root = tmp_path / "job dir; $(touch pwned)"
    work = root / "work"
    work.mkdir(parents=True)
    (work / "run.sh").write_text('#!/bin/sh\nfor a in "$@"; do echo "[$a]"; done\n')
    os.chmod(work / "run.sh", 0o755)
    token_path = root / "slurm.token"
    script = root / "slurm.sh"
    script.write_text(batch_script("j", "tok1", token_path, work,
                                   ["./run.sh", "a b", "it's", "$HOME", "`id`"]))
    token_path.write_text("tok1\n")
    ran = subprocess.run(["sh", str(script)], capture_output=True, text=True, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == ["[a b]", "[it's]", "[$HOME]", "[`id`]"]
    assert not (tmp_path / "pwned").exists()
    token_path.write_text("tok2\n")  # a newer submission took over
    stale = subprocess.run(["sh", str(script)], capture_output=True, text=True, cwd=tmp_path)
    assert stale.returncode == 0 and stale.stdout == ""
