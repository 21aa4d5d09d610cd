"""Job specs: named, typed job templates that the operator bakes into the image.

A spec is a TOML file in `JOBD_SPECS_DIR`; its file name (without `.toml`) is its name. Clients
start a job by naming a spec and giving parameter values, so in production nobody needs to upload
code. Example:

    description = "Reverse the sequences of a FASTA file"
    command = ["python3", "/opt/tool/reverse.py", "{input}", "--min={min_length}"]
    env = ["OMP_NUM_THREADS"]          # daemon variables the command may see
    timeout = "10m"
    priority = 0
    executor = "local"

    [limits]
    memory = "2G"

    [params.input]
    type = "file"                      # a file uploaded alongside, by its relative path
    required = true

    [params.min_length]
    type = "integer"
    default = 1
    min = 0
    max = 100000

The command is an argument list and never goes through a shell unless the spec says
`shell = true` (then `command` is one string and values reach it only as environment variables,
never substituted into the text). `{name}` in an argument is replaced by the parameter's value
(`{{` and `}}` are literal braces); every value also reaches the command as `JOBD_PARAM_<NAME>`.
Everything here is pure, so it is tested without a server.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from jobd.config import ConfigError, parse_duration, parse_size

TYPES = ("string", "integer", "number", "boolean", "enum", "file")
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
SPEC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_SPEC_KEYS = {"description", "command", "shell", "env", "timeout", "priority", "executor",
              "limits", "params", "workdir"}
_PARAM_KEYS = {"type", "description", "default", "required", "min", "max", "pattern",
               "max_length", "choices", "arg"}
_LIMIT_PARSERS = {"memory": parse_size, "fsize": parse_size, "cpu_time": parse_duration,
                  "nofile": int, "nproc": int}
_WORKDIR_POLICIES = ("fresh", "inputs")


class SpecError(ConfigError):
    """A spec file that cannot be used: names the file, the line and the reason.

    A ConfigError: a broken spec in JOBD_SPECS_DIR keeps the daemon from starting.
    """

    def __init__(self, path: Path, line: int | None, reason: str) -> None:
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"broken job spec {where}: {reason}")
        self.path, self.line, self.reason = path, line, reason


class ParamError(ValueError):
    """A parameter value that the spec does not accept; names the parameter."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"parameter '{name}': {reason}")
        self.name, self.reason = name, reason


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    description: str = ""
    default: Any = None
    required: bool = False
    min: float | None = None
    max: float | None = None
    pattern: str | None = None
    max_length: int | None = None
    choices: tuple[str, ...] = ()

    @property
    def env_name(self) -> str:
        return "JOBD_PARAM_" + self.name.upper()

    def check(self, value: Any) -> Any:
        """The value converted to the parameter's type, or ParamError."""
        if self.type == "boolean":
            return _boolean(self.name, value)
        if self.type in ("integer", "number"):
            number = _number(self.name, value, integer=self.type == "integer")
            if self.min is not None and number < self.min:
                raise ParamError(self.name, f"must be at least {_show(self.min)}")
            if self.max is not None and number > self.max:
                raise ParamError(self.name, f"must be at most {_show(self.max)}")
            return number
        if not isinstance(value, str):
            raise ParamError(self.name, f"must be a {self.type}, not {_kind(value)}")
        if "\x00" in value:
            raise ParamError(self.name, "must not contain NUL bytes")
        if self.max_length is not None and len(value) > self.max_length:
            raise ParamError(self.name, f"must be at most {self.max_length} characters")
        if self.type == "enum" and value not in self.choices:
            raise ParamError(self.name, "must be one of " + ", ".join(self.choices))
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise ParamError(self.name, f"must match {self.pattern}")
        if self.type == "file":
            return _relative_file(self.name, value)
        return value

    def schema(self) -> dict[str, Any]:
        """JSON Schema of the parameter, for clients that build forms."""
        kind = {"string": "string", "enum": "string", "file": "string", "integer": "integer",
                "number": "number", "boolean": "boolean"}[self.type]
        schema: dict[str, Any] = {"type": kind, "x-jobd-type": self.type}
        if self.description:
            schema["description"] = self.description
        if self.default is not None:
            schema["default"] = self.default
        if self.min is not None:
            schema["minimum"] = self.min
        if self.max is not None:
            schema["maximum"] = self.max
        if self.pattern is not None:
            schema["pattern"] = self.pattern
        if self.max_length is not None:
            schema["maxLength"] = self.max_length
        if self.choices:
            schema["enum"] = list(self.choices)
        return schema


@dataclass(frozen=True)
class Spec:
    name: str
    command: tuple[str, ...] | str
    description: str = ""
    shell: bool = False
    env: tuple[str, ...] = ()
    timeout: float | None = None
    priority: int = 0
    executor: str = "local"
    limits: dict[str, int | float] = field(default_factory=dict)
    params: dict[str, Param] = field(default_factory=dict)
    workdir: str = "fresh"

    def values(self, given: dict[str, Any]) -> dict[str, Any]:
        """Checked values for every parameter: given, else default; ParamError names the first
        unknown, missing or invalid one."""
        lowered = {str(k).lower(): (k, v) for k, v in given.items()}
        known = {name.lower() for name in self.params}
        for key, (original, _) in lowered.items():
            if key not in known:
                raise ParamError(str(original), f"is not a parameter of spec '{self.name}'")
        result: dict[str, Any] = {}
        for name, param in self.params.items():
            if name.lower() in lowered:
                result[name] = param.check(lowered[name.lower()][1])
            elif param.default is not None:
                result[name] = param.default
            elif param.required:
                raise ParamError(name, "is required")
        return result

    def argv(self, values: dict[str, Any]) -> list[str]:
        """The command with `{name}` placeholders replaced: an argument list, no shell."""
        if isinstance(self.command, str):
            return ["/bin/sh", "-c", self.command]
        return [_substitute(arg, values) for arg in self.command]

    def environment(self, values: dict[str, Any]) -> dict[str, str]:
        """`JOBD_PARAM_<NAME>` for every value."""
        return {self.params[name].env_name: _text(value) for name, value in values.items()}

    def files(self, values: dict[str, Any]) -> list[str]:
        """Working-directory paths that `file` parameters name (they must exist)."""
        return [values[n] for n, p in self.params.items() if p.type == "file" and n in values]

    def describe(self) -> dict[str, Any]:
        """What the API lists: the spec and a JSON Schema of its parameters."""
        required = [n for n, p in self.params.items() if p.required and p.default is None]
        return {
            "name": self.name, "description": self.description,
            "timeout": self.timeout, "priority": self.priority, "executor": self.executor,
            "parameters": {"type": "object", "additionalProperties": False,
                           "properties": {n: p.schema() for n, p in self.params.items()},
                           "required": required},
        }


def load_specs(directory: Path) -> dict[str, Spec]:
    """Every `*.toml` spec in `directory`; the first broken one raises SpecError."""
    specs: dict[str, Spec] = {}
    if not directory.is_dir():
        raise SpecError(directory, None, "not a directory")
    for path in sorted(directory.glob("*.toml")):
        spec = load_spec(path)
        specs[spec.name] = spec
    return specs


def load_spec(path: Path) -> Spec:
    # The TOML parser only when there are specs to read: keeps an idle daemon's memory down.
    if sys.version_info >= (3, 11):
        import tomllib  # novermin: 3.11+, by the check above
    else:  # Python 3.9 and 3.10: the same parser, as a pure-Python package
        import tomli as tomllib

    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"line (\d+)", str(exc))
        line = int(found.group(1)) if found else None
        if line is None and "end of document" in str(exc):
            line = max(1, len(text.splitlines()))
        raise SpecError(path, line, str(exc)) from exc
    name = path.name[: -len(".toml")]
    if not SPEC_NAME.fullmatch(name):
        raise SpecError(path, None, "the file name must be 1 to 64 characters from "
                        "A-Z a-z 0-9 . _ - before .toml")
    try:
        return _build(name, data)
    except _Problem as problem:
        raise SpecError(path, _line_of(text, problem.keys), problem.reason) from None


class _Problem(Exception):
    """A semantic error, with the TOML keys that locate it."""

    def __init__(self, keys: tuple[str, ...], reason: str) -> None:
        super().__init__(reason)
        self.keys, self.reason = keys, reason


def _build(name: str, data: dict[str, Any]) -> Spec:
    unknown = sorted(set(data) - _SPEC_KEYS)
    if unknown:
        raise _Problem((unknown[0],), f"unknown key '{unknown[0]}'")
    shell = data.get("shell", False)
    if not isinstance(shell, bool):
        raise _Problem(("shell",), "shell must be true or false")
    command = data.get("command")
    if command is None:
        raise _Problem((), "command is required")
    if shell:
        if not isinstance(command, str) or not command.strip():
            raise _Problem(("command",), "with shell = true, command must be one string")
    elif (not isinstance(command, list) or not command
          or not all(isinstance(a, str) for a in command)):
        raise _Problem(("command",), "command must be a non-empty list of strings "
                       "(or set shell = true)")
    params = _params(data.get("params", {}))
    if not shell:
        for arg in command:
            for placeholder in _placeholders(arg):
                if placeholder not in params:
                    raise _Problem(("command",), f"'{{{placeholder}}}' names no parameter")
        command = tuple(command)
    env = data.get("env", [])
    if not isinstance(env, list) or not all(isinstance(e, str) and e for e in env):
        raise _Problem(("env",), "env must be a list of variable names")
    timeout = data.get("timeout")
    if timeout is not None:
        timeout = _duration(("timeout",), timeout)
    priority = data.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise _Problem(("priority",), "priority must be an integer")
    executor = data.get("executor", "local")
    if executor not in ("local", "slurm"):
        raise _Problem(("executor",), "executor must be local or slurm")
    workdir = data.get("workdir", "fresh")
    if workdir not in _WORKDIR_POLICIES:
        raise _Problem(("workdir",), "workdir must be one of " + ", ".join(_WORKDIR_POLICIES))
    return Spec(name=name, command=command, description=str(data.get("description", "")),
                shell=shell, env=tuple(env), timeout=timeout, priority=priority,
                executor=executor, limits=_limits(data.get("limits", {})), params=params,
                workdir=workdir)


def _params(table: Any) -> dict[str, Param]:
    if not isinstance(table, dict):
        raise _Problem(("params",), "params must be a table of tables")
    params: dict[str, Param] = {}
    seen: set[str] = set()
    for name, spec in table.items():
        where = ("params", name)
        if not NAME.fullmatch(name):
            raise _Problem(where, f"parameter name '{name}' must match {NAME.pattern}")
        if name.lower() in seen:
            raise _Problem(where, f"parameter '{name}' is defined twice (names ignore case)")
        seen.add(name.lower())
        if not isinstance(spec, dict):
            raise _Problem(where, f"parameter '{name}' must be a table")
        unknown = sorted(set(spec) - _PARAM_KEYS)
        if unknown:
            raise _Problem(where, f"parameter '{name}': unknown key '{unknown[0]}'")
        kind = spec.get("type", "string")
        if kind not in TYPES:
            raise _Problem(where, f"parameter '{name}': type must be one of {', '.join(TYPES)}")
        choices = spec.get("choices", [])
        if kind == "enum" and (not isinstance(choices, list) or not choices
                               or not all(isinstance(c, str) for c in choices)):
            raise _Problem(where, f"parameter '{name}': an enum needs choices, a list of strings")
        pattern = spec.get("pattern")
        if pattern is not None:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as exc:
                raise _Problem(where, f"parameter '{name}': bad pattern: {exc}") from None
        required = spec.get("required", False)
        if not isinstance(required, bool):
            raise _Problem(where, f"parameter '{name}': required must be true or false")
        for key in ("min", "max"):
            if key in spec and (isinstance(spec[key], bool)
                                or not isinstance(spec[key], (int, float))):
                raise _Problem(where, f"parameter '{name}': {key} must be a number")
        max_length = spec.get("max_length")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 0):
            raise _Problem(where, f"parameter '{name}': max_length must be a positive integer")
        param = Param(name=name, type=kind, description=str(spec.get("description", "")),
                      required=required, min=spec.get("min"), max=spec.get("max"),
                      pattern=pattern, max_length=max_length, choices=tuple(choices))
        if "default" in spec:
            try:
                param = dataclasses.replace(param, default=param.check(spec["default"]))
            except ParamError as exc:
                raise _Problem(where, f"default of {exc}") from None
        params[name] = param
    return params


def _limits(table: Any) -> dict[str, int | float]:
    if not isinstance(table, dict):
        raise _Problem(("limits",), "limits must be a table")
    limits: dict[str, int | float] = {}
    for key, value in table.items():
        parser = _LIMIT_PARSERS.get(key)
        if parser is None:
            raise _Problem(("limits", key), f"unknown limit '{key}' (known: "
                           + ", ".join(sorted(_LIMIT_PARSERS)) + ")")
        try:
            limits[key] = parser(str(value))
        except ValueError as exc:
            raise _Problem(("limits", key), f"limit '{key}': {exc}") from None
    return limits


def _duration(keys: tuple[str, ...], value: Any) -> float:
    if isinstance(value, bool):
        raise _Problem(keys, "a duration must be seconds or a string such as 10m")
    try:
        seconds = float(value) if isinstance(value, (int, float)) else parse_duration(str(value))
    except ValueError as exc:
        raise _Problem(keys, str(exc)) from None
    if seconds <= 0:
        raise _Problem(keys, "a duration must be positive")
    return seconds


def _line_of(text: str, keys: tuple[str, ...]) -> int | None:
    """The line where the offending key (or its table header) is written."""
    if not keys:
        return None
    lines = text.splitlines()
    quoted = [r"[\"']?" + re.escape(k) + r"[\"']?" for k in keys]
    header = re.compile(r"\s*\[\s*" + r"\s*\.\s*".join(quoted) + r"\s*\]")
    for number, line in enumerate(lines, 1):
        if header.match(line):
            return number
    assignment = re.compile(r"\s*" + re.escape(keys[-1]) + r"\s*=")
    for number, line in enumerate(lines, 1):
        if assignment.match(line):
            return number
    return None


def _placeholders(arg: str) -> list[str]:
    found = []
    for match in _PLACEHOLDER.finditer(arg):
        token = match.group(0)
        if token in ("{{", "}}"):
            continue
        if match.group(1) is None:
            raise _Problem(("command",), f"unmatched brace in argument {arg!r} "
                           "(write {{ or }} for a literal brace)")
        found.append(match.group(1))
    return found


def _substitute(arg: str, values: dict[str, Any]) -> str:
    def replace(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "{{":
            return "{"
        if token == "}}":
            return "}"
        name = match.group(1)
        return _text(values[name]) if name in values else ""
    return _PLACEHOLDER.sub(replace, arg)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ParamError(name, f"must be a boolean, not {_kind(value)}")


def _number(name: str, value: Any, *, integer: bool) -> int | float:
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool):
        raise ParamError(name, f"must be {kind}, not a boolean")
    if isinstance(value, str):
        try:
            value = int(value) if integer else float(value)
        except ValueError:
            raise ParamError(name, f"must be {kind}, not {value!r}") from None
    if integer and isinstance(value, float) and value.is_integer():
        value = int(value)
    if integer and not isinstance(value, int):
        raise ParamError(name, f"must be {kind}")
    if not isinstance(value, (int, float)) or (isinstance(value, float)
                                               and not math.isfinite(value)):
        raise ParamError(name, "must be a finite number")
    return value


def _relative_file(name: str, value: str) -> str:
    path = PurePosixPath(value)
    if not value or path.is_absolute() or ".." in path.parts or "\\" in value:
        raise ParamError(name, "must be a relative path inside the job's files")
    return str(path)


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _show(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)
