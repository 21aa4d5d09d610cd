"""run_command: short commands started through the Reaper, output read by the event loop."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from jobd.command import CommandTimeout, run_command
from jobd.reaper import Reaper


async def _with_reaper(adopt_orphans: bool, body):  # type: ignore[no-untyped-def]
    reaper = Reaper(adopt_orphans=adopt_orphans)
    reaper.start()
    try:
        return await body(reaper)
    finally:
        await reaper.stop()


def test_output_and_exit_code() -> None:
    async def body(reaper: Reaper) -> None:
        result = await run_command(reaper, ["sh", "-c", "echo out; echo err >&2; exit 4"], 10)
        assert (result.returncode, result.stdout, result.stderr) == (4, "out\n", "err\n")
        killed = await run_command(reaper, ["sh", "-c", "kill -9 $$"], 10)
        assert killed.returncode == 128 + 9
        big = await run_command(reaper, ["sh", "-c", "head -c 3000000 /dev/zero"], 10)
        assert len(big.stdout) == 3_000_000

    asyncio.run(_with_reaper(False, body))


def test_environment_and_directory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async def body(reaper: Reaper) -> None:
        result = await run_command(reaper, ["sh", "-c", "echo $ONLY; pwd"], 10,
                                   env={"ONLY": "this", "PATH": os.environ["PATH"]},
                                   cwd=tmp_path)
        assert result.stdout.splitlines() == ["this", str(tmp_path)]

    asyncio.run(_with_reaper(False, body))


def test_timeout_kills_the_command() -> None:
    async def body(reaper: Reaper) -> None:
        started = time.monotonic()
        with pytest.raises(CommandTimeout, match=r"did not answer within 0\.5s"):
            await run_command(reaper, ["sh", "-c", "sleep 30"], 0.5)
        assert time.monotonic() - started < 10

    asyncio.run(_with_reaper(False, body))


def test_many_at_once() -> None:
    """Every status reaches its own command. (The daemon's waitpid(-1) reaper is exercised by
    the Slurm black-box tests: the zipapp runs every sbatch and squeue through this helper.)"""
    async def body(reaper: Reaper) -> None:
        results = await asyncio.gather(*(
            run_command(reaper, ["sh", "-c", f"exit {i % 7}"], 20) for i in range(40)))
        assert [r.returncode for r in results] == [i % 7 for i in range(40)]

    asyncio.run(_with_reaper(False, body))


def test_missing_program_raises_oserror() -> None:
    async def body(reaper: Reaper) -> None:
        with pytest.raises(FileNotFoundError):
            await run_command(reaper, ["/nonexistent/squeue"], 5)

    asyncio.run(_with_reaper(False, body))
