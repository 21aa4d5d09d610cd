"""Job specs: parsing, every parameter type and constraint, substitution without a shell."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobd.spec import ParamError, Spec, SpecError, load_spec, load_specs

FULL = '''
description = "Reverse sequences"
command = ["python3", "/opt/tool/reverse.py", "{input}", "--min={min_length}", "{{literal}}"]
env = ["OMP_NUM_THREADS"]
timeout = "10m"
priority = 5

[limits]
memory = "2G"
cpu_time = "1h"
nproc = 64

[params.input]
type = "file"
required = true

[params.min_length]
type = "integer"
default = 1
min = 0
max = 100

[params.ratio]
type = "number"
min = 0.5
max = 2.5

[params.fast]
type = "boolean"
default = false

[params.mode]
type = "enum"
choices = ["a", "b"]

[params.label]
type = "string"
pattern = "[a-z]+"
max_length = 8
'''


def write(tmp_path: Path, text: str, name: str = "tool") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def full(tmp_path: Path) -> Spec:
    return load_spec(write(tmp_path, FULL))


def test_parses_everything(tmp_path: Path) -> None:
    spec = full(tmp_path)
    assert spec.name == "tool" and spec.timeout == 600 and spec.priority == 5
    assert spec.limits == {"memory": 2 << 30, "cpu_time": 3600, "nproc": 64}
    assert spec.env == ("OMP_NUM_THREADS",)
    assert set(spec.params) == {"input", "min_length", "ratio", "fast", "mode", "label"}


def test_values_defaults_and_conversion(tmp_path: Path) -> None:
    spec = full(tmp_path)
    values = spec.values({"input": "data/in.fa", "RATIO": "1.5", "fast": "true", "mode": "b"})
    assert values == {"input": "data/in.fa", "min_length": 1, "ratio": 1.5, "fast": True,
                      "mode": "b"}
    assert spec.argv(values) == ["python3", "/opt/tool/reverse.py", "data/in.fa", "--min=1",
                                 "{literal}"]
    env = spec.environment(values)
    assert env["JOBD_PARAM_MIN_LENGTH"] == "1" and env["JOBD_PARAM_FAST"] == "true"
    assert spec.files(values) == ["data/in.fa"]


@pytest.mark.parametrize(("given", "name", "reason"), [
    ({}, "input", "is required"),
    ({"input": "x", "nope": 1}, "nope", "is not a parameter"),
    ({"input": "/etc/passwd"}, "input", "relative path"),
    ({"input": "../x"}, "input", "relative path"),
    ({"input": "x", "min_length": -1}, "min_length", "at least 0"),
    ({"input": "x", "min_length": 101}, "min_length", "at most 100"),
    ({"input": "x", "min_length": 1.5}, "min_length", "integer"),
    ({"input": "x", "min_length": "ten"}, "min_length", "integer"),
    ({"input": "x", "min_length": True}, "min_length", "boolean"),
    ({"input": "x", "ratio": 3}, "ratio", "at most 2.5"),
    ({"input": "x", "ratio": float("nan")}, "ratio", "finite"),
    ({"input": "x", "fast": "maybe"}, "fast", "boolean"),
    ({"input": "x", "mode": "c"}, "mode", "one of a, b"),
    ({"input": "x", "label": "ABC"}, "label", "must match"),
    ({"input": "x", "label": "abcdefghi"}, "label", "at most 8"),
    ({"input": "x", "label": 5}, "label", "must be a string"),
    ({"input": "x", "label": "a\x00"}, "label", "NUL"),
])
def test_bad_values_name_the_parameter(tmp_path: Path, given: dict, name: str,
                                       reason: str) -> None:
    with pytest.raises(ParamError) as caught:
        full(tmp_path).values(given)
    assert caught.value.name == name
    assert reason in str(caught.value)


@given(st.text(max_size=200))
def test_hostile_values_stay_one_argument(value: str) -> None:
    spec = Spec(name="echo", command=("printf", "%s", "{v}"),
                params={"v": __import__("jobd.spec").spec.Param("v", "string")})
    if "\x00" in value:
        with pytest.raises(ParamError):
            spec.values({"v": value})
        return
    argv = spec.argv(spec.values({"v": value}))
    assert argv == ["printf", "%s", value]


def test_no_shell_injection_for_real(tmp_path: Path) -> None:
    canary = tmp_path / "pwned"
    spec = load_spec(write(tmp_path, 'command = ["printf", "%s", "{v}"]\n'
                                     '[params.v]\ntype = "string"\n'))
    for hostile in [f"; touch {canary}", f"$(touch {canary})", f"`touch {canary}`",
                    f"| touch {canary}", "{v}", "'\"\n"]:
        argv = spec.argv(spec.values({"v": hostile}))
        out = subprocess.run(argv, capture_output=True, check=True).stdout.decode()
        assert out == hostile
    assert not canary.exists()


@pytest.mark.parametrize(("text", "line", "reason"), [
    ('command = "ls"\n', 1, "list of strings"),
    ('command = ["ls"]\nbogus = 1\n', 2, "unknown key 'bogus'"),
    ('command = ["ls", "{x}"]\n', 1, "names no parameter"),
    ('command = ["ls", "{"]\n', 1, "unmatched brace"),
    ('command = ["ls"]\n\n[params.n]\ntype = "float"\n', 3, "type must be one of"),
    ('command = ["ls"]\n[params.n]\ntype = "enum"\n', 2, "needs choices"),
    ('command = ["ls"]\n[params.n]\ntype = "integer"\ndefault = "x"\n', 2, "default of"),
    ('command = ["ls"]\n[params.n]\ntype = "string"\npattern = "("\n', 2, "bad pattern"),
    ('command = ["ls"]\n[params."1n"]\n', 2, "must match"),
    ('command = ["ls"]\ntimeout = "soon"\n', 2, "duration"),
    ('command = ["ls"]\n[limits]\nmemory = "lots"\n', 3, "memory"),
    ('command = ["ls"]\n[limits]\ngpu = 1\n', 3, "unknown limit"),
    ('command = ["ls"\n', 1, ""),
    ('shell = true\ncommand = ["ls"]\n', 2, "one string"),
    ('description = "no command"\n', None, "command is required"),
])
def test_broken_specs_name_file_line_and_reason(tmp_path: Path, text: str, line: int | None,
                                                reason: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert caught.value.path == path
    assert caught.value.line == line
    assert reason in str(caught.value)
    assert str(path) in str(caught.value)


def test_load_specs_reads_a_directory(tmp_path: Path) -> None:
    write(tmp_path, FULL, "one")
    write(tmp_path, 'command = ["true"]\n', "two")
    (tmp_path / "notes.txt").write_text("ignored")
    assert sorted(load_specs(tmp_path)) == ["one", "two"]
    write(tmp_path, 'command = 5\n', "three")
    with pytest.raises(SpecError, match=r"three\.toml"):
        load_specs(tmp_path)


def test_shell_spec_passes_values_only_as_environment(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, 'shell = true\ncommand = "echo $JOBD_PARAM_V"\n'
                                     '[params.v]\ntype = "string"\n'))
    values = spec.values({"v": "$(id)"})
    assert spec.argv(values) == ["/bin/sh", "-c", "echo $JOBD_PARAM_V"]
    env = spec.environment(values)
    out = subprocess.run(spec.argv(values), env={"PATH": "/usr/bin:/bin", **env},
                         capture_output=True, check=True).stdout
    assert out == b"$(id)\n"


def test_describe_is_a_json_schema(tmp_path: Path) -> None:
    described = full(tmp_path).describe()
    props = described["parameters"]["properties"]
    assert props["min_length"] == {"type": "integer", "x-jobd-type": "integer", "default": 1,
                                   "minimum": 0, "maximum": 100}
    assert props["mode"]["enum"] == ["a", "b"]
    assert described["parameters"]["required"] == ["input"]
