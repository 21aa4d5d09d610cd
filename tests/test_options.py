"""Create options of the native API: pure validation."""

from __future__ import annotations

from typing import Any

import pytest

from jobd.options import (
    DEFAULT_ENTRY,
    OptionError,
    check_entry,
    from_form,
    is_secret_name,
    param_environment,
    parse_request,
    shown_params,
)


def test_defaults() -> None:
    asked = parse_request({})
    assert asked.job_id is None and asked.entry == DEFAULT_ENTRY and asked.args == []
    assert asked.params == {} and asked.timeout is None and asked.priority == 0
    assert asked.labels == {} and asked.function is None and asked.executor == "local"
    assert asked.options() == {"entry": "run.sh", "args": [], "params": {}, "timeout": None,
                               "function": None}


def test_everything_given() -> None:
    asked = parse_request({"id": "a.b-c_1", "entry": "./bin//x.py", "args": ["1", ""],
                           "params": {"n": 3, "Long_Name_2": "v"}, "timeout": "5m",
                           "priority": -3, "labels": {"k.io/x": "v 1"}, "executor": "local"})
    assert asked.job_id == "a.b-c_1" and asked.entry == "bin/x.py"
    assert asked.params == {"N": 3, "LONG_NAME_2": "v"} and asked.timeout == 300.0
    assert asked.priority == -3 and asked.labels == {"k.io/x": "v 1"}


@pytest.mark.parametrize(("timeout", "seconds"), [(90, 90.0), (1.5, 1.5), ("90", 90.0),
                                                   ("2h", 7200.0), (0, None), ("0s", None),
                                                   (None, None)])
def test_timeouts(timeout: Any, seconds: float | None) -> None:
    assert parse_request({"timeout": timeout}).timeout == seconds


@pytest.mark.parametrize(("fields", "message"), [
    ({"x": 1}, "unknown field 'x' (allowed: id, input, entry"),
    ({"b": 1, "a": 2}, "unknown fields 'a', 'b'"),
    ({"params": {"_X": 1}}, "parameter name '_X' is not allowed"),
    ({"params": {"X Y": 1}}, "parameter name 'X Y' is not allowed"),
    ({"params": {"é": 1}}, "parameter name 'é' is not allowed"),
    ({"params": {"X": None}}, "parameter X must be a string or an integer, not null"),
    ({"params": {"X": "a\x00b"}}, "parameter X contains a NUL character"),
    ({"params": {f"P{i}": i for i in range(257)}}, "at most 256 are allowed"),
    ({"args": [None]}, "args[0] must be a string, not null"),
    ({"args": ["\x00"]}, "args[0] contains a NUL character"),
    ({"args": ["a"] * 1025}, "at most 1024 are allowed"),
    ({"timeout": True}, "timeout must be seconds or a duration"),
    ({"timeout": [1]}, "timeout must be seconds or a duration string, not a list"),
    ({"timeout": float("inf")}, "timeout must be zero or more seconds"),
    ({"priority": True}, "priority must be an integer, not a boolean"),
    ({"priority": 10**7}, "priority must be between"),
    ({"labels": {"-x": "v"}}, "label key '-x' is not allowed"),
    ({"labels": {"k": "a\nb"}}, "values are at most 256 printable characters"),
    ({"labels": {"k": "x" * 257}}, "values are at most 256 printable characters"),
    ({"labels": "k=v"}, "labels must be an object of strings, not a string"),
    ({"executor": "slurm"}, "executor 'slurm' is not configured on this daemon"),
    ({"executor": 1}, "executor must be a string"),
    ({"entry": ""}, "entry must name a file"),
    ({"entry": "./"}, "entry must name a file"),
    ({"entry": "a/../b"}, "entry must stay inside the working directory"),
    ({"entry": "a\\b"}, "entry must be a relative path with / separators"),
    ({"entry": "-c"}, "entry must not start with '-'"),
    ({"entry": 5}, "entry must be a string, not an integer"),
    ({"function": "main"}, "function needs a Python entry point: give entry"),
    ({"function": "main", "entry": "run.sh"}, "function needs a Python entry point (.py)"),
    ({"function": "a.py:main", "entry": "b.py"}, "name different files"),
    ({"function": "a.py:1main"}, "function '1main' is not a Python name"),
    ({"function": "a.py:"}, "function '' is not a Python name"),
    ({"function": "a.py:x..y"}, "is not a Python name"),
    ({"id": ""}, "id must be 1 to 128 characters"),
    ({"id": "-a"}, "id must be 1 to 128 characters"),
])
def test_refusals_name_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(OptionError) as caught:
        parse_request(fields)
    assert message in str(caught.value)


def test_function_forms() -> None:
    assert (parse_request({"function": "tool.py:main"}).entry,
            parse_request({"function": "tool.py:main"}).function) == ("tool.py", "main")
    asked = parse_request({"function": "Model.run", "entry": "lib/m.py"})
    assert (asked.entry, asked.function) == ("lib/m.py", "Model.run")
    same = parse_request({"function": "./lib/m.py:f", "entry": "lib/m.py"})
    assert same.entry == "lib/m.py"
    upper = parse_request({"function": "f", "entry": "TOOL.PY"})
    assert upper.entry == "TOOL.PY"


def test_check_entry_normalises() -> None:
    assert check_entry("./a//b/./c.sh") == "a/b/c.sh"


def test_form_fields_become_json_values() -> None:
    values = from_form({"ID": "x", "args": '["-n", "3"]', "params": '{"N": 3}',
                        "labels": '{"k": "v"}', "priority": " 4 ", "timeout": "5m",
                        "entry": "a.py"})
    assert values == {"id": "x", "args": ["-n", "3"], "params": {"N": 3}, "labels": {"k": "v"},
                      "priority": 4, "timeout": "5m", "entry": "a.py"}
    assert parse_request(values).timeout == 300.0
    with pytest.raises(OptionError, match="field 'args' must be JSON text"):
        from_form({"args": "-n 3"})
    with pytest.raises(OptionError, match="priority must be an integer"):
        from_form({"priority": "high"})


@pytest.mark.parametrize(("name", "secret"), [
    ("API_TOKEN", True), ("DB_PASSWORD", True), ("CLIENT_SECRET", True), ("AWS_ACCESS_KEY", True),
    ("SSH_KEY", True), ("KEY", True), ("PRIVATE_PEM", True), ("APIKEY", True),
    ("N", False), ("KEYWORDS", False), ("AUTHOR", False), ("MONKEY_COUNT", False),
])
def test_secret_names(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


def test_shown_params_and_environment() -> None:
    params = {"N": 3, "API_TOKEN": "t0k"}
    assert shown_params(params) == {"N": 3, "API_TOKEN": "<redacted>"}
    assert param_environment(params) == {"JOBD_PARAM_N": "3", "JOBD_PARAM_API_TOKEN": "t0k"}
