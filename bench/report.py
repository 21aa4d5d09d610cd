"""What a scenario returns, and the dated section appended to bench/RESULTS.md."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"


@dataclass
class Row:
    """One figure: jobd's value, the reference measured in the same run, the target."""

    figure: str
    value: str
    peer: str = ""
    ratio: str = ""
    target: str = ""
    met: bool | None = None

    def cells(self) -> list[str]:
        met = {True: "yes", False: "**no**", None: ""}[self.met]
        return [self.figure, self.value, self.peer, self.ratio, self.target, met]


@dataclass
class Section:
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *args: object, **kwargs: object) -> Row:
        row = Row(*args, **kwargs)  # type: ignore[arg-type]
        self.rows.append(row)
        return row

    def markdown(self) -> str:
        out = [f"### {self.title}", ""]
        if self.rows:
            out += ["| figure | jobd | reference (same run) | ratio | target | met |",
                    "|---|---|---|---|---|---|"]
            out += ["| " + " | ".join(c.replace("|", "\\|") for c in r.cells()) + " |"
                    for r in self.rows]
            out.append("")
        out += [f"- {note}" for note in self.notes]
        if self.notes:
            out.append("")
        return "\n".join(out)


def _first(path: str, key: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError as exc:
        return f"unknown ({exc.strerror})"
    return "unknown"


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def machine() -> dict[str, str]:
    """What the figures depend on; the daemon runs under the python3 on PATH."""
    from bench.daemon import python

    zipapp_python = subprocess.run([python(), "--version"], capture_output=True, text=True,
                                   check=False)
    return {
        "CPU": _first("/proc/cpuinfo", "model name"),
        "cores": str(os.cpu_count()),
        "RAM": _first("/proc/meminfo", "MemTotal"),
        "kernel": platform.release(),
        "python (daemon)": f"{zipapp_python.stdout.strip() or zipapp_python.stderr.strip()}"
                           f" ({python()}, what python3 on PATH resolves to)",
        "python (bench)": sys.version.split()[0],
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def render(sections: list[Section], *, mode: str, seconds: float, info: dict[str, str]) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    dirty = " (with uncommitted changes)" if _git("status", "--porcelain", "--", "jobd") else ""
    out = [f"## {stamp}: {mode} run, jobd {_git('rev-parse', '--short', 'HEAD')}{dirty}", ""]
    out += [f"- {k}: {v}" for k, v in info.items()]
    out += [f"- suite took {seconds:.0f} s", ""]
    for section in sections:
        out.append(section.markdown())
    return "\n".join(out).rstrip() + "\n"


def append(text: str, path: Path = RESULTS) -> None:
    with open(path, "a") as f:
        f.write("\n" + text)
