"""The job state machine and id rules: pure, exhaustive."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobd import job


def test_every_status_has_a_transition_row() -> None:
    assert set(job.TRANSITIONS) == set(job.STATUSES)
    for targets in job.TRANSITIONS.values():
        assert targets <= set(job.STATUSES)


@pytest.mark.parametrize(("current", "new"), list(itertools.product(job.STATUSES, repeat=2)))
def test_check_move_agrees_with_the_table(current: str, new: str) -> None:
    if new in job.TRANSITIONS[current]:
        job.check_move(current, new)
    else:
        with pytest.raises(job.TransitionError):
            job.check_move(current, new)


def test_terminal_jobs_only_restart() -> None:
    for status in job.TERMINAL:
        assert job.TRANSITIONS[status] == {job.QUEUED}


def test_queued_never_jumps_to_success() -> None:
    assert not job.can_move(job.QUEUED, job.SUCCESS)


@pytest.mark.parametrize("good", ["a", "my-job", "A.b_c-1", "0" * 128, "550e8400-e29b-41d4"])
def test_good_ids(good: str) -> None:
    assert job.id_problem(good) is None


@pytest.mark.parametrize("bad", ["", None, 5, ".x", "-x", "_x", "a/b", "../a", "a b", "a\x00",
                                 "0" * 129, "é", "a\n", "a:b"])
def test_bad_ids(bad: object) -> None:
    assert job.id_problem(bad) is not None


@given(st.text(max_size=200))
def test_a_valid_id_is_always_a_plain_directory_name(text: str) -> None:
    if job.is_valid_id(text):
        assert "/" not in text and "\x00" not in text
        assert text not in (".", "..") and not text.startswith((".", "-"))
        assert len(text) <= 128


def test_outcome_messages() -> None:
    assert job.outcome_fields(0, None)["status"] == job.SUCCESS
    failed = job.outcome_fields(1, None)
    assert failed["status"] == job.FAILED
    assert failed["message"] == "could not finish the job, error: exit status 1"
    killed = job.outcome_fields(None, 9)
    assert killed["message"] == "could not finish the job, error: signal: SIGKILL (9)"
    timed = job.outcome_fields(None, 15, reason="timed out after 5s")
    assert timed["status"] == job.FAILED and "timed out after 5s" in timed["message"]
    assert job.outcome_fields(None, 15, reason="cancelled")["status"] == job.CANCELLED
    assert job.outcome_fields(None, None, reason="could not start")["message"] == \
        "could not start"


def test_requeue_gives_up_after_max_attempts() -> None:
    record = job.new_record("x", protocol="classic")
    record["attempt"] = 1
    assert job.requeue_fields(record, 3, "crash")["status"] == job.QUEUED
    record["attempt"] = 3
    gave_up = job.requeue_fields(record, 3, "crash")
    assert gave_up["status"] == job.FAILED and "3 times" in gave_up["message"]


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@given(JSON)
def test_id_problem_takes_any_json_value(value: object) -> None:
    """Whatever a client puts in `id`, the answer is a reason or None, never an exception."""
    problem = job.id_problem(value)
    assert problem is None or isinstance(problem, str)
    if not isinstance(value, str):
        assert problem is not None


@given(st.from_regex(job.ID_PATTERN, fullmatch=True))
def test_a_valid_id_is_one_url_segment_and_one_directory(job_id: str) -> None:
    """Every route that takes `{id}` gets the id unchanged, and it names one directory."""
    from pathlib import PurePosixPath
    from urllib.parse import quote, unquote

    assert job.is_valid_id(job_id)
    assert quote(job_id, safe="") == job_id == unquote(job_id)
    assert PurePosixPath("/data", job_id).parent == PurePosixPath("/data")
    assert not job_id.startswith(".")  # never DATAPATH/.incoming or .trash


def test_generated_ids_are_valid() -> None:
    assert all(job.is_valid_id(job.new_id()) for _ in range(100))
