"""Running a short command from inside the daemon (sbatch, squeue, scancel, sacct).

The daemon reaps with `waitpid(-1)` (see `reaper.py`), so `subprocess.run` and asyncio's own
subprocess support would race the reaper for the exit status. Every command jobd runs is
therefore started here and registered with the `Reaper`; its pipes are read by the event loop,
so a slow `squeue` never blocks HTTP requests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from jobd.reaper import Reaper, exit_status

log = logging.getLogger("jobd.command")


class CommandTimeout(RuntimeError):
    """The command did not finish in time; it was killed."""


@dataclass
class CommandResult:
    returncode: int  # the exit code, or 128 + signal number when a signal ended it
    stdout: str
    stderr: str


async def _read_all(loop: asyncio.AbstractEventLoop, pipe: IO[bytes]) -> bytes:
    reader = asyncio.StreamReader()
    protocol = asyncio.StreamReaderProtocol(reader)
    transport, _ = await loop.connect_read_pipe(lambda: protocol, pipe)
    try:
        return await reader.read()
    finally:
        transport.close()


async def run_command(reaper: Reaper, argv: Sequence[str], timeout: float, *,
                      env: Mapping[str, str] | None = None,
                      cwd: Path | None = None) -> CommandResult:
    """Run `argv` (no shell) and collect its output; `CommandTimeout` after `timeout` seconds.

    Raises OSError when the program cannot be started (not installed, not executable).
    """
    loop = asyncio.get_running_loop()
    # Popen and watch() run back to back in the loop thread, so the SIGCHLD handler (which also
    # runs in the loop) cannot reap the child before it is registered.
    popen = subprocess.Popen(
        list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=None if env is None else dict(env), cwd=cwd, close_fds=True,
        start_new_session=True,
    )
    exited = reaper.watch(popen.pid)
    assert popen.stdout is not None and popen.stderr is not None
    stdout, stderr = popen.stdout, popen.stderr

    async def collect() -> tuple[bytes, bytes, int]:
        out, err = await asyncio.gather(_read_all(loop, stdout), _read_all(loop, stderr))
        return out, err, await asyncio.shield(exited)

    try:
        out, err, status = await asyncio.wait_for(collect(), timeout)
    except asyncio.TimeoutError:
        _kill(popen.pid)
        _settle(popen, await exited)
        raise CommandTimeout(f"{Path(argv[0]).name} did not answer within {timeout:g}s") \
            from None
    except asyncio.CancelledError:
        # The caller gave up (daemon stopping): let the command finish on its own; a killed
        # sbatch might or might not have submitted, which is worse than one that completes.
        exited.add_done_callback(lambda f: f.cancelled() or _settle(popen, f.result()))
        raise
    _settle(popen, status)
    code, signum = exit_status(status)
    returncode = code if code is not None else 128 + (signum or 0)
    return CommandResult(returncode, out.decode("utf-8", "replace"),
                         err.decode("utf-8", "replace"))


def _settle(popen: subprocess.Popen, status: int) -> None:
    """Tell Popen the child is reaped, so it never waitpid()s a recycled pid later."""
    code, signum = exit_status(status)
    popen.returncode = code if code is not None else -(signum or 0)


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        log.debug("command %d already gone", pid)
