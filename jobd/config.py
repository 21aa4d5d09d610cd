"""The one configuration object.

Every setting is declared once, as a field of `Config` with its environment variable, parser and
help text in the field's metadata. The command-line flags, the README table and `jobd serve
--help` are all generated from these declarations, so they cannot drift apart.

The classic jobd variables keep their names and meaning (`PORT`, `DATAPATH`, `DB_PATH`,
`DEBUG`); everything else is `JOBD_*`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_duration(text: str) -> float:
    """Seconds from `90`, `90s`, `5m`, `2h` or `2d`."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text.lower())
    if not match:
        raise ValueError(f"expected a duration such as 90s, 5m, 2h or 2d, got {text!r}")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(text: str) -> int:
    """Bytes from `1048576`, `512K`, `64M`, `4G` (binary units; a trailing `B`/`iB` is allowed)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise ValueError(f"expected a size such as 512K, 64M or 4G, got {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def parse_floor(text: str) -> tuple[int, float]:
    """A free-space floor: bytes (`1G`) or a percentage of the filesystem (`5%`)."""
    stripped = text.strip()
    if stripped.endswith("%"):
        try:
            percent = float(stripped[:-1])
        except ValueError:
            raise ValueError(f"expected a size such as 1G or a percentage such as 5%, "
                             f"got {text!r}") from None
        if not 0 <= percent < 100:
            raise ValueError(f"a percentage must be from 0 to 100, got {text!r}")
        return 0, percent
    return parse_size(stripped), 0.0


def parse_uid_range(text: str) -> tuple[int, int]:
    """`20000-29999` as (first, last); both unprivileged (not 0)."""
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"expected a range such as 20000-29999, got {text!r}")
    first, last = int(match.group(1)), int(match.group(2))
    if first < 1 or last < first or last > 0xFFFFFFFE:
        raise ValueError(f"expected 1 <= first <= last < 4294967295, got {text!r}")
    return first, last


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def parse_executor(text: str) -> str:
    value = text.strip().lower()
    if value not in ("local", "slurm"):
        raise ValueError(f"expected local or slurm, got {text!r}")
    return value


def parse_shared_check(text: str) -> str:
    value = text.strip().lower()
    if value not in ("fail", "warn", "off"):
        raise ValueError(f"expected fail, warn or off, got {text!r}")
    return value


_SLURM_NAMES = re.compile(r"[A-Za-z0-9_.+-]{1,64}(,[A-Za-z0-9_.+-]{1,64}){0,31}")


def parse_slurm_names(text: str) -> str:
    """A Slurm partition, account or QoS name (or a comma list): nothing sbatch could misread."""
    value = text.strip()
    if value and not _SLURM_NAMES.fullmatch(value):
        raise ValueError(f"expected names of letters, digits and . _ + - (comma separated), "
                         f"got {text!r}")
    return value


def parse_options(text: str) -> tuple[str, ...]:
    """Command-line options written as a shell would split them (`--a=1 --b "x y"`)."""
    try:
        words = tuple(shlex.split(text))
    except ValueError as exc:
        raise ValueError(f"cannot split {text!r}: {exc}") from exc
    for word in words:
        if not word.startswith("-") or "\n" in word or "\0" in word:
            raise ValueError(f"expected options starting with '-', got {word!r}")
    return words


def parse_optional_path(text: str) -> Path | None:
    """A path, or None for an empty value (so `VAR=` means unset)."""
    return Path(text) if text.strip() else None


def parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")
        return value
    return parse


def setting(default: Any, env: str, help: str, parse: Callable[[str], Any] = str, *,
            shown: str | None = None) -> Any:
    """Declare one setting: a dataclass field carrying its variable, parser and help."""
    return field(default=default, metadata={
        "env": env, "help": help, "parse": parse,
        "shown": shown if shown is not None else _show(default),
    })


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


@dataclass(frozen=True)
class Config:
    """Everything jobd can be told, with the classic defaults."""

    host: str = setting("0.0.0.0", "JOBD_HOST", "Address to listen on (jobd lives in a container, "
                        "so all interfaces by default).")
    port: int = setting(8080, "PORT", "TCP port to listen on (classic variable).", int)
    datapath: Path = setting(Path("data"), "DATAPATH", "Directory for job inputs, working "
                             "directories, logs and results (classic variable).", Path,
                             shown="./data")
    db_path: Path = setting(Path("db"), "DB_PATH", "Directory of the TinyDB job database "
                            "(classic variable).", Path, shown="./db")
    debug: bool = setting(False, "DEBUG", "Keep each job's working directory after it is "
                          "packed (classic variable); also logs at debug level.", parse_bool)
    keep_workdir: bool = setting(False, "JOBD_KEEP_WORKDIR", "Keep working directories after "
                                 "packing (single files are otherwise served from the result "
                                 "zip).", parse_bool)
    slots: int = setting(0, "JOBD_SLOTS", "Jobs that run at once; 0 means the number of CPUs.",
                         int, shown="0 (CPUs)")
    poll_interval: float = setting(1.0, "JOBD_POLL_INTERVAL", "Seconds between safety polls "
                                   "for QUEUED jobs (new uploads start at once anyway).",
                                   parse_duration, shown="1s")
    retention: float = setting(172800.0, "JOBD_RETENTION", "Finished jobs and their files are "
                               "deleted this long after they finish (0 keeps them forever).",
                               parse_duration, shown="2d")
    retention_interval: float = setting(3600.0, "JOBD_RETENTION_INTERVAL", "How often the "
                                        "retention sweep runs.", parse_duration, shown="1h")
    timeout: float = setting(0.0, "JOBD_TIMEOUT", "Default wall-clock limit of a job (0: none); "
                             "on expiry SIGTERM, then SIGKILL after the kill grace, FAILED.",
                             parse_duration, shown="0")
    kill_grace: float = setting(5.0, "JOBD_KILL_GRACE", "Seconds between SIGTERM and SIGKILL "
                                "when a job is cancelled or times out.", parse_duration, shown="5s")
    shutdown_grace: float = setting(6.0, "JOBD_SHUTDOWN_GRACE", "On SIGTERM, seconds running "
                                    "jobs get to stop before they are killed and requeued "
                                    "(with the HTTP drain, well inside Docker's 10 s).",
                                    parse_duration, shown="6s")
    max_attempts: int = setting(3, "JOBD_MAX_ATTEMPTS", "Starts per job before a job that keeps "
                                "being interrupted by crashes is marked FAILED.", int)
    zip_level: int = setting(1, "JOBD_ZIP_LEVEL", "Deflate level of result zips, 0 (store) to 9.",
                             int)
    fsync: bool = setting(True, "JOBD_FSYNC", "fsync inputs and database writes before a job "
                          "is acknowledged (turn off only for throwaway test daemons).",
                          parse_bool)
    max_body: int = setting(8 << 30, "JOBD_MAX_BODY", "Largest request body accepted (413 "
                            "beyond).", parse_size, shown="8G")
    max_unpacked: int = setting(4 << 30, "JOBD_MAX_UNPACKED", "Largest total unpacked size of "
                                "one job's input archive.", parse_size, shown="4G")
    max_entries: int = setting(100_000, "JOBD_MAX_ENTRIES", "Most entries in one input archive.",
                               int)
    max_ratio: int = setting(200, "JOBD_MAX_RATIO", "Highest compression ratio of an input "
                             "archive (zip bomb guard).", int)
    # -- security (SECURITY.md): who may call, over what, and what one request may cost --------
    tokens_file: Path | None = setting(None, "JOBD_TOKENS_FILE", "Bearer tokens of the clients "
                                       "(TOML, or `name:role:sha256[:expires]` lines), stored "
                                       "hashed; turns authentication on. `JOBD_TOKEN_<NAME>` "
                                       "variables add more.", parse_optional_path,
                                       shown="none")
    tls_cert: Path | None = setting(None, "JOBD_TLS_CERT", "PEM certificate (chain) to serve "
                                    "HTTPS with; needs JOBD_TLS_KEY.", parse_optional_path,
                                    shown="none")
    tls_key: Path | None = setting(None, "JOBD_TLS_KEY", "PEM private key of JOBD_TLS_CERT.",
                                   parse_optional_path, shown="none")
    tls_client_ca: Path | None = setting(None, "JOBD_TLS_CLIENT_CA", "PEM CA certificate(s) "
                                         "client certificates must be signed by (mutual TLS); "
                                         "the subject's CN names the client. Turns "
                                         "authentication on.", parse_optional_path,
                                         shown="none")
    tls_client_cert: str = setting("required", "JOBD_TLS_CLIENT_CERT", "With "
                                   "JOBD_TLS_CLIENT_CA: `required` (no TLS handshake without a "
                                   "valid certificate) or `optional` (clients without one use "
                                   "a bearer token; /health needs neither).",
                                   parse_choice("required", "optional"))
    tls_admins: tuple = setting((), "JOBD_TLS_ADMINS", "Certificate CNs that get the admin "
                                "role (comma list); other certificates are regular clients.",
                                parse_list, shown="none")
    max_url: int = setting(8 << 10, "JOBD_MAX_URL", "Longest request target (path and query) "
                           "accepted (414 beyond).", parse_size, shown="8K")
    max_header: int = setting(16 << 10, "JOBD_MAX_HEADER", "Largest request line plus headers "
                              "accepted (431 beyond).", parse_size, shown="16K")
    header_timeout: float = setting(30.0, "JOBD_HEADER_TIMEOUT", "Seconds a client gets to "
                                    "send a request's line and headers (408 and disconnected "
                                    "beyond).", parse_duration, shown="30s")
    body_timeout: float = setting(60.0, "JOBD_BODY_TIMEOUT", "Longest wait for the next piece "
                                  "of an upload body (408 beyond).", parse_duration,
                                  shown="60s")
    min_body_rate: int = setting(1 << 10, "JOBD_MIN_BODY_RATE", "Bytes per second an upload "
                                 "must average once JOBD_BODY_TIMEOUT has passed (408 below; "
                                 "0: no minimum).", parse_size, shown="1K")
    pass_env: tuple = setting(("LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV",
                               "CONDA_*", "R_LIBS*", "JAVA_HOME", "PERL5LIB", "OMP_NUM_THREADS"),
                              "JOBD_PASS_ENV", "Daemon environment variables passed to jobs "
                              "(comma list, `*` as a suffix wildcard) on top of the minimal set "
                              "PATH, LANG, LC_ALL, TZ.", parse_list)
    specs_dir: str = setting("", "JOBD_SPECS_DIR", "Directory of job spec TOML files (named "
                             "job templates); empty: no specs.", shown="")
    locked: bool = setting(False, "JOBD_LOCKED", "Locked-down mode: refuse every "
                           "client-supplied run.sh (403) and run only job specs.", parse_bool)
    max_queue: int = setting(0, "JOBD_MAX_QUEUE", "Most jobs waiting QUEUED; beyond, uploads "
                             "get 429 with Retry-After (0: no cap).", int)
    min_free: tuple = setting((100 << 20, 0.0), "JOBD_MIN_FREE", "Free space kept under DATAPATH, "
                              "as a size or a percentage (`5%`); below it uploads get 507 and "
                              "the retention sweep runs at once.", parse_floor, shown="100M")
    run_as: str = setting("", "JOBD_RUN_AS", "When jobd is root: the user every job runs as, "
                          "a name or `uid[:gid]` (empty: one uid per job from JOBD_UID_RANGE).")
    uid_range: tuple = setting((20000, 29999), "JOBD_UID_RANGE", "When jobd is root and "
                               "JOBD_RUN_AS is empty: each running job gets its own uid (and "
                               "gid) from this range.", parse_uid_range, shown="20000-29999")
    allow_root: bool = setting(False, "JOBD_ALLOW_ROOT", "Let jobs run as root when jobd is "
                               "root and JOBD_RUN_AS is empty (or `root`).", parse_bool)
    limit_memory: int = setting(0, "JOBD_LIMIT_MEMORY", "Memory of a job (0: none): "
                                "RLIMIT_DATA, and memory.max of its cgroup when available.",
                                parse_size, shown="0")
    limit_cpu_time: float = setting(0.0, "JOBD_LIMIT_CPU_TIME", "CPU time of each process of a "
                                    "job (0: none): RLIMIT_CPU, SIGXCPU when reached.",
                                    parse_duration, shown="0")
    limit_cpus: float = setting(0.0, "JOBD_LIMIT_CPUS", "CPUs a job may keep busy, e.g. 1.5 "
                                "(0: no cap): cgroup cpu.max only.", float, shown="0")
    limit_nofile: int = setting(0, "JOBD_LIMIT_NOFILE", "Open files per process (0: jobd's "
                                "own limit): RLIMIT_NOFILE.", int)
    limit_nproc: int = setting(0, "JOBD_LIMIT_NPROC", "Processes of a job (0: none): cgroup "
                               "pids.max, and RLIMIT_NPROC (counted per uid).", int)
    limit_fsize: int = setting(0, "JOBD_LIMIT_FSIZE", "Largest file a job may write (0: none): "
                               "RLIMIT_FSIZE, SIGXFSZ when reached.", parse_size, shown="0")
    limit_io: int = setting(0, "JOBD_LIMIT_IO", "Bytes per second a job may read and write on "
                            "DATAPATH's disk (0: none): cgroup io.max only.", parse_size,
                            shown="0")
    cgroup: str = setting("auto", "JOBD_CGROUP", "`auto`: per-job cgroups under jobd's own "
                          "cgroup v2 when it is delegated and writable; `off`; or the path of a "
                          "writable cgroup v2 directory to put them in.")
    log_level: str = setting("info", "JOBD_LOG_LEVEL", "debug, info, warning or error.")
    access_log: bool = setting(True, "JOBD_ACCESS_LOG", "Log one line per HTTP request.",
                               parse_bool)
    fast_path: bool = setting(True, "JOBD_FAST_PATH", "Answer job status reads (`GET "
                              "/api/get/{id}`, `GET /api/v1/jobs/{id}`) in the connection "
                              "layer, without the HTTP parser and middleware: same answers, "
                              "several times the rate (ARCHITECTURE.md).", parse_bool)
    executor: str = setting("local", "JOBD_EXECUTOR", "Where jobs run unless they choose: "
                            "`local` (this machine) or `slurm` (implies JOBD_SLURM).",
                            parse_executor)
    slurm: bool = setting(False, "JOBD_SLURM", "Enable the Slurm executor: jobs that ask for it "
                          "(classic `slurml: true`) go to the cluster of `SLURM_CONF` through "
                          "sbatch, squeue and scancel on PATH.", parse_bool)
    slurm_partition: str = setting("", "JOBD_SLURM_PARTITION", "Partition of every Slurm job "
                                   "(sbatch --partition); empty: the cluster's default.",
                                   parse_slurm_names, shown="(none)")
    slurm_account: str = setting("", "JOBD_SLURM_ACCOUNT", "Account charged for Slurm jobs "
                                 "(sbatch --account); empty: the user's default.",
                                 parse_slurm_names, shown="(none)")
    slurm_qos: str = setting("", "JOBD_SLURM_QOS", "Quality of service of Slurm jobs (sbatch "
                             "--qos); empty: the default.", parse_slurm_names, shown="(none)")
    slurm_extra: tuple = setting((), "JOBD_SLURM_EXTRA", "More sbatch options for every Slurm "
                                 "job, split like a shell (`--constraint=avx2 --exclusive`); the "
                                 "options jobd sets itself are refused.", parse_options,
                                 shown="(none)")
    slurm_poll_interval: float = setting(2.0, "JOBD_SLURM_POLL_INTERVAL", "Seconds between "
                                         "status polls of the active Slurm jobs (one squeue "
                                         "for all of them).", parse_duration, shown="2s")
    slurm_command_timeout: float = setting(60.0, "JOBD_SLURM_COMMAND_TIMEOUT", "Seconds a "
                                           "Slurm command may take before the controller "
                                           "counts as unreachable.", parse_duration,
                                           shown="60s")
    slurm_unreachable_deadline: float = setting(86400.0, "JOBD_SLURM_UNREACHABLE_DEADLINE",
                                                "How long Slurm jobs keep their state while "
                                                "slurmctld cannot be reached before they are "
                                                "marked FAILED (0: never).", parse_duration,
                                                shown="1d")
    slurm_shared_check: str = setting("fail", "JOBD_SLURM_SHARED_CHECK", "At start, when "
                                      "DATAPATH does not look shared with the compute nodes "
                                      "(relative, under /tmp, on tmpfs or overlay): `fail`, "
                                      "`warn` or `off`.", parse_shared_check)

    @property
    def effective_slots(self) -> int:
        return self.slots if self.slots > 0 else (os.cpu_count() or 1)

    @property
    def slurm_enabled(self) -> bool:
        return self.slurm or self.executor == "slurm"

    @property
    def keeps_workdir(self) -> bool:
        return self.keep_workdir or self.debug

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None,
             overrides: Mapping[str, Any] | None = None) -> Config:
        """Defaults, then environment variables, then flags (`overrides`, already parsed)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for spec in fields():
            raw = environ.get(spec.env)
            if raw is not None:
                try:
                    values[spec.name] = spec.parse(raw)
                except ValueError as exc:
                    raise ConfigError(f"{spec.env}: {exc}") from exc
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls(**values)


@dataclass(frozen=True)
class FieldSpec:
    name: str
    env: str
    flag: str
    help: str
    parse: Callable[[str], Any]
    shown: str
    default: Any


def fields() -> Iterator[FieldSpec]:
    """The declared settings, in order: what the flags and the README table are made from."""
    for f in dataclasses.fields(Config):
        yield FieldSpec(
            name=f.name, env=f.metadata["env"], flag="--" + f.name.replace("_", "-"),
            help=f.metadata["help"], parse=f.metadata["parse"], shown=f.metadata["shown"],
            default=f.default,
        )


def markdown_table() -> str:
    """The configuration table of the README (a test keeps the README in step)."""
    rows = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for spec in fields():
        rows.append(f"| `{spec.env}` | `{spec.flag}` | `{spec.shown}` | {spec.help} |")
    return "\n".join(rows)
