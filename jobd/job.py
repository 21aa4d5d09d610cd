"""The job record, its statuses and the transitions between them.

Pure functions only: every rule about what may happen to a job lives here, so the protocols
(classic, orchestrator, native) and the scheduler share one state machine that can be tested
exhaustively without a server.
"""

from __future__ import annotations

import re
import signal as _signal
import time
import uuid
from typing import Any

QUEUED = "QUEUED"
PREPARED = "PREPARED"  # handed to an executor that has not started it yet (Slurm pending)
RUNNING = "RUNNING"
SUCCESS = "SUCCESS"
FAILED = "FAILED"
CANCELLED = "CANCELLED"

STATUSES = (QUEUED, PREPARED, RUNNING, SUCCESS, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCESS, FAILED, CANCELLED})
ACTIVE = frozenset({PREPARED, RUNNING})

# Allowed transitions. Terminal jobs go back to QUEUED only through an explicit restart;
# active jobs go back to QUEUED when the daemon stops or crashes under them.
TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({PREPARED, RUNNING, FAILED, CANCELLED}),
    PREPARED: frozenset({RUNNING, QUEUED, SUCCESS, FAILED, CANCELLED}),
    RUNNING: frozenset({QUEUED, SUCCESS, FAILED, CANCELLED}),
    SUCCESS: frozenset({QUEUED}),
    FAILED: frozenset({QUEUED}),
    CANCELLED: frozenset({QUEUED}),
}

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ID_RULE = ("1 to 128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit")


class TransitionError(ValueError):
    """A status change the state machine does not allow."""


def can_move(current: str, new: str) -> bool:
    return new in TRANSITIONS.get(current, frozenset())


def check_move(current: str, new: str) -> None:
    if not can_move(current, new):
        raise TransitionError(f"a {current} job cannot become {new}")


def is_terminal(status: str) -> bool:
    return status in TERMINAL


def id_problem(job_id: Any) -> str | None:
    """Why `job_id` is not acceptable, or None. Ids become directory names, so be strict."""
    if job_id is None or job_id == "":
        return "job id is required"
    if not isinstance(job_id, str):
        return "job id must be a string"
    if not ID_PATTERN.fullmatch(job_id):
        return f"job id must be {ID_RULE}"
    return None


def is_valid_id(job_id: Any) -> bool:
    return id_problem(job_id) is None


def new_id() -> str:
    return uuid.uuid4().hex


def new_record(job_id: str, *, protocol: str, executor: str = "local", priority: int = 0,
               labels: dict[str, str] | None = None, options: dict[str, Any] | None = None,
               input_size: int = 0, owner: str | None = None, now: float | None = None,
               ) -> dict[str, Any]:
    """A fresh QUEUED record; the store adds `seq`."""
    now = time.time() if now is None else now
    return {
        "id": job_id, "status": QUEUED, "message": "job queued",
        "created": now, "queued": now, "started": None, "finished": None, "updated": now,
        "exit_code": None, "signal": None, "attempt": 0, "priority": priority,
        "labels": dict(labels or {}), "executor": executor, "protocol": protocol,
        "options": dict(options or {}), "input_size": input_size, "output_size": None,
        "owner": owner, "slurm_id": None,
    }


# options[INVALID] marks a submission refused for its content but recorded (FAILED) anyway.
INVALID = "invalid"


def is_invalid(record: dict[str, Any]) -> bool:
    return bool((record.get("options") or {}).get(INVALID))


def signal_name(signum: int) -> str:
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def outcome_fields(exit_code: int | None, signum: int | None, *, reason: str | None = None,
                   now: float | None = None) -> dict[str, Any]:
    """The record changes for a finished process: SUCCESS on exit 0, FAILED otherwise.

    `reason` (cancelled, timed out, memory limit, ...) explains a kill the daemon caused; the
    messages keep the classic jobd wording ("could not finish the job, error: exit status 1").
    """
    now = time.time() if now is None else now
    changes: dict[str, Any] = {"finished": now, "exit_code": exit_code, "signal": signum}
    if reason == "cancelled":
        changes.update(status=CANCELLED, message="job cancelled")
    elif exit_code is None and signum is None:
        changes.update(status=FAILED, message=reason or "job ended without an exit status")
    elif exit_code == 0 and reason is None:
        changes.update(status=SUCCESS, message="job finished successfully")
    else:
        if signum is not None:
            detail = f"signal: {signal_name(signum)} ({signum})"
        else:
            detail = f"exit status {exit_code}"
        if reason:
            message = f"could not finish the job: {reason} ({detail})"
        else:
            message = f"could not finish the job, error: {detail}"
        changes.update(status=FAILED, message=message)
    return changes


def requeue_fields(record: dict[str, Any], max_attempts: int, why: str,
                   now: float | None = None) -> dict[str, Any]:
    """Changes for an active job whose run was interrupted (daemon stop or crash).

    It goes back to QUEUED for a fresh start from its input, unless it has used up its
    attempts: a job that crashes the daemon every time must not do so forever.
    """
    now = time.time() if now is None else now
    attempts = int(record.get("attempt") or 0)
    if attempts >= max_attempts:
        return {"status": FAILED, "finished": now,
                "message": f"job failed: interrupted {attempts} times ({why}), giving up"}
    return {"status": QUEUED, "started": None, "queued": now, "message": f"job requeued: {why}"}


def restart_fields(now: float | None = None) -> dict[str, Any]:
    """Changes that send a finished job round again from its original input."""
    now = time.time() if now is None else now
    return {"status": QUEUED, "message": "job restarted", "started": None, "finished": None,
            "exit_code": None, "signal": None, "output_size": None, "attempt": 0,
            "queued": now, "updated": now}
