"""Configuration: parsing, precedence, and the README table kept in step."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobd.config import Config, ConfigError, markdown_table, parse_duration, parse_size

ROOT = Path(__file__).resolve().parent.parent


def test_classic_defaults() -> None:
    config = Config.load({})
    assert config.port == 8080
    assert config.datapath == Path("data") and config.db_path == Path("db")
    assert config.host == "0.0.0.0"
    assert config.retention == 2 * 86400


def test_environment_then_flags() -> None:
    config = Config.load({"PORT": "9000", "JOBD_RETENTION": "3h", "DEBUG": "true"},
                         overrides={"port": 9100})
    assert config.port == 9100 and config.retention == 3 * 3600 and config.keeps_workdir


def test_bad_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="JOBD_SLOTS"):
        Config.load({"JOBD_SLOTS": "many"})


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("5m", 300),
                                                ("2h", 7200), ("2d", 172800), ("0.5s", 0.5)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "size"), [("10", 10), ("4K", 4096), ("64M", 64 << 20),
                                            ("4G", 4 << 30), ("1GiB", 1 << 30)])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_readme_table_is_current() -> None:
    readme = (ROOT / "README.md").read_text()
    assert markdown_table() in readme, "README configuration table is stale: " \
        "paste the output of `python -c 'from jobd.config import markdown_table as t; print(t())'`"
