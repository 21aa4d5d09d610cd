"""What a native create request may ask for, validated: entry point, arguments, parameters,
timeout, priority, labels, a Python function to call, the executor.

Pure functions: the native API (JSON bodies) and the multipart form (text fields, see
`from_form`) both end here, so a rule about job options is written once. Every refusal is an
`OptionError` whose message names the field, ready for a 400.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from jobd import auth, job
from jobd.config import parse_duration

#: Every field a create request may carry; anything else is refused, not ignored.
FIELDS = ("id", "input", "entry", "args", "params", "timeout", "priority", "labels", "function",
          "executor", "secret")
DEFAULT_ENTRY = "run.sh"
EXECUTORS = ("local",)

PARAM_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
PARAM_PREFIX = "JOBD_PARAM_"
LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
FUNCTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
MAX_ARGS = 1024
MAX_PARAMS = 256
MAX_LABELS = 64
MAX_LABEL_VALUE = 256
MAX_PRIORITY = 1_000_000
MAX_ENTRY = 1024

# Parameter names that look like credentials: their values are never shown by the API.
SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "PASSWD", "PASSPHRASE", "CREDENTIAL", "PRIVATE",
                "APIKEY", "API_KEY", "ACCESS_KEY")
REDACTED = "<redacted>"

ParamValue = Union[str, int]


class OptionError(ValueError):
    """A create request asks for something jobd does not accept; the message says what."""


@dataclass
class JobRequest:
    """A validated create request (without its input)."""

    job_id: Optional[str] = None
    entry: str = DEFAULT_ENTRY
    args: list[str] = field(default_factory=list)
    params: dict[str, ParamValue] = field(default_factory=dict)
    timeout: Optional[float] = None
    priority: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    function: Optional[str] = None
    executor: str = "local"
    secret: Optional[str] = None

    def options(self) -> dict[str, Any]:
        """What the job record keeps under `options` (what the runner reads)."""
        return {"entry": self.entry, "args": list(self.args), "params": dict(self.params),
                "timeout": self.timeout, "function": self.function}


def parse_request(fields: dict[str, Any], *, executors: tuple[str, ...] = EXECUTORS,
                  ) -> JobRequest:
    """Validate every field of a create request except `input` (the caller streams that)."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        names = ", ".join(repr(name) for name in unknown)
        raise OptionError(f"unknown field{'s' if len(unknown) > 1 else ''} {names} "
                          f"(allowed: {', '.join(FIELDS)})")
    request = JobRequest()
    request.job_id = _job_id(fields.get("id"))
    request.args = _args(fields.get("args"))
    request.params = _params(fields.get("params"))
    request.timeout = _timeout(fields.get("timeout"))
    request.priority = _priority(fields.get("priority"))
    request.labels = _labels(fields.get("labels"))
    request.executor = _executor(fields.get("executor"), executors)
    request.secret = fields.get("secret")
    if request.secret is not None and auth.secret_problem(request.secret):
        raise OptionError(auth.secret_problem(request.secret))
    request.entry, request.function = _entry_and_function(fields.get("entry"),
                                                          fields.get("function"))
    return request


def from_form(texts: dict[str, str]) -> dict[str, Any]:
    """The fields of a multipart form (all text) as the JSON values `parse_request` takes.

    `args`, `params` and `labels` are JSON text (`["-n", "3"]`, `{"N": 3}`); `priority` is an
    integer; `timeout` stays text (a duration such as `90`, `90s` or `5m`); the others are
    plain text. Names are matched case-insensitively, as in a JSON body.
    """
    values: dict[str, Any] = {}
    for name, text in texts.items():
        key = name.lower()
        if key in ("args", "params", "labels"):
            try:
                values[key] = json.loads(text)
            except ValueError as exc:
                raise OptionError(f"field {key!r} must be JSON text: {exc}") from None
        elif key == "priority":
            try:
                values[key] = int(text.strip())
            except ValueError:
                raise OptionError(f"priority must be an integer, not {text!r}") from None
        else:
            values[key] = text
    return values


def shown_params(params: dict[str, ParamValue]) -> dict[str, ParamValue]:
    """Parameters as the API shows them: values of credential-like names are redacted."""
    return {name: REDACTED if is_secret_name(name) else value for name, value in params.items()}


def is_secret_name(name: str) -> bool:
    upper = name.upper()
    return any(word in upper for word in SECRET_WORDS) or upper == "KEY" or \
        upper.endswith("_KEY")


def param_environment(params: dict[str, ParamValue]) -> dict[str, str]:
    """`JOBD_PARAM_<NAME>` variables for the job's environment."""
    return {PARAM_PREFIX + name: str(value) for name, value in params.items()}


# -- the fields -------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "an integer", float: "a number",
            str: "a string", list: "a list", dict: "an object"}.get(type(value), "a value")


def _job_id(value: Any) -> str | None:
    if value is None:
        return None  # the daemon chooses one
    if not isinstance(value, str) or not job.is_valid_id(value):
        raise OptionError(f"id must be {job.ID_RULE}, not {value!r}"[:300])
    return value


def _no_nul(text: str, what: str) -> str:
    if "\x00" in text:
        raise OptionError(f"{what} contains a NUL character")
    return text


def _args(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise OptionError(f"args must be a list of strings, not {_type_name(value)}")
    if len(value) > MAX_ARGS:
        raise OptionError(f"args has {len(value)} items; at most {MAX_ARGS} are allowed")
    for i, arg in enumerate(value):
        if not isinstance(arg, str):
            raise OptionError(f"args[{i}] must be a string, not {_type_name(arg)}")
        _no_nul(arg, f"args[{i}]")
    return list(value)


def _params(value: Any) -> dict[str, ParamValue]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise OptionError(f"params must be an object, not {_type_name(value)}")
    if len(value) > MAX_PARAMS:
        raise OptionError(f"params has {len(value)} entries; at most {MAX_PARAMS} are allowed")
    params: dict[str, ParamValue] = {}
    for name, item in value.items():
        upper = name.upper()
        if not PARAM_NAME.fullmatch(upper):
            raise OptionError(f"parameter name {name!r} is not allowed: names are a letter then "
                              "letters, digits or _, at most 64 characters"[:300])
        if upper in params:
            raise OptionError(f"parameter {upper} is given twice (names ignore case)")
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise OptionError(f"parameter {upper} must be a string or an integer, "
                              f"not {_type_name(item)}")
        if isinstance(item, str):
            _no_nul(item, f"parameter {upper}")
        params[upper] = item
    return params


def _timeout(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise OptionError("timeout must be seconds or a duration such as 90s, 5m or 2h")
    if isinstance(value, str):
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise OptionError(f"timeout: {exc}") from None
    elif isinstance(value, (int, float)):
        seconds = float(value)
    else:
        raise OptionError(f"timeout must be seconds or a duration string, "
                          f"not {_type_name(value)}")
    if not math.isfinite(seconds) or seconds < 0:
        raise OptionError(f"timeout must be zero or more seconds, not {value!r}")
    return seconds or None  # 0: no limit of its own (the daemon's JOBD_TIMEOUT applies)


def _priority(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(f"priority must be an integer, not {_type_name(value)}")
    if abs(value) > MAX_PRIORITY:
        raise OptionError(f"priority must be between {-MAX_PRIORITY} and {MAX_PRIORITY}")
    return value


def _labels(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise OptionError(f"labels must be an object of strings, not {_type_name(value)}")
    if len(value) > MAX_LABELS:
        raise OptionError(f"labels has {len(value)} entries; at most {MAX_LABELS} are allowed")
    for key, text in value.items():
        if not LABEL_KEY.fullmatch(key):
            raise OptionError(f"label key {key!r} is not allowed: 1 to 63 characters from "
                              "A-Z a-z 0-9 . _ / -, starting with a letter or digit"[:300])
        if not isinstance(text, str):
            raise OptionError(f"label {key} must be a string, not {_type_name(text)}")
        if len(text) > MAX_LABEL_VALUE or not text.isprintable():
            raise OptionError(f"label {key}: values are at most {MAX_LABEL_VALUE} printable "
                              "characters")
    return dict(value)


def _executor(value: Any, executors: tuple[str, ...]) -> str:
    if value is None:
        return executors[0]
    if not isinstance(value, str):
        raise OptionError(f"executor must be a string, not {_type_name(value)}")
    if value not in executors:
        raise OptionError(f"executor {value!r} is not configured on this daemon "
                          f"(available: {', '.join(executors)})"[:300])
    return value


def check_entry(entry: str) -> str:
    """A relative path inside the working directory, normalised; OptionError otherwise."""
    _no_nul(entry, "entry")
    if len(entry) > MAX_ENTRY:
        raise OptionError(f"entry is longer than {MAX_ENTRY} characters")
    if entry.startswith("/") or "\\" in entry:
        raise OptionError(f"entry must be a relative path with / separators, not {entry!r}")
    parts = [p for p in entry.split("/") if p not in ("", ".")]
    if not parts:
        raise OptionError("entry must name a file")
    if ".." in parts:
        raise OptionError(f"entry must stay inside the working directory, not {entry!r}")
    if parts[0].startswith("-"):
        raise OptionError(f"entry must not start with '-': {entry!r}")
    return "/".join(parts)


def _entry_and_function(entry: Any, function: Any) -> tuple[str, str | None]:
    if entry is not None and not isinstance(entry, str):
        raise OptionError(f"entry must be a string, not {_type_name(entry)}")
    if function is not None and not isinstance(function, str):
        raise OptionError(f"function must be a string, not {_type_name(function)}")
    if function is None:
        return check_entry(entry if entry is not None else DEFAULT_ENTRY), None
    module, _, name = function.rpartition(":")
    if module:
        module = check_entry(module)
        if entry is not None and check_entry(entry) != module:
            raise OptionError(f"entry {entry!r} and function {function!r} name different files")
        entry = module
    elif entry is None:
        raise OptionError("function needs a Python entry point: give entry (such as tool.py) "
                          "or write the function as tool.py:name")
    entry = check_entry(entry)
    if not entry.lower().endswith(".py"):
        raise OptionError(f"function needs a Python entry point (.py), not {entry!r}")
    if not FUNCTION_NAME.fullmatch(name):
        raise OptionError(f"function {name!r} is not a Python name (such as main or "
                          "Model.run)"[:300])
    return entry, name
