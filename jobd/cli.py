"""The command line: `jobd` (or `jobd serve`) starts the daemon; the other commands are
clients of a daemon's native API (`jobd submit`, `jobd list`, ...).

The commands are thin: HTTP, packing and exit codes live in jobd/client.py.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import click

from jobd import __version__, client
from jobd.client import TERMINAL
from jobd.config import Config, ConfigError, fields, parse_duration
from jobd.job import STATUSES, id_problem
from jobd.pack import base64_size
from jobd.progress import Progress, human_size

EXIT_CODES_HELP = "\b\nExit codes of the client commands:\n" + "\n".join(
    f"  {code:<6} {meaning.replace('`', '')}" for code, meaning in client.EXIT_CODE_TABLE)


def _config_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """One flag per setting, generated from the Config declarations."""
    for spec in reversed(list(fields())):
        command = click.option(
            spec.flag, spec.name, default=None, metavar="VALUE",
            help=f"{spec.help} [env {spec.env}; default {spec.shown}]",
        )(command)
    return command


def load_config(flags: dict[str, Any]) -> Config:
    """Environment first, then flags; a bad value stops with the variable's name."""
    parsed: dict[str, Any] = {}
    specs = {spec.name: spec for spec in fields()}
    try:
        for name, raw in flags.items():
            if raw is not None:
                try:
                    parsed[name] = specs[name].parse(raw)
                except ValueError as exc:
                    raise ConfigError(f"{specs[name].flag}: {exc}") from exc
        return Config.load(overrides=parsed)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=EXIT_CODES_HELP)
@click.version_option(__version__, "--version", prog_name="jobd")
@click.pass_context
def main(ctx: click.Context) -> None:
    """jobd: runs the jobs clients upload, in the container it ships in.

    With no command, starts the daemon (as `jobd serve`). The other commands talk to a
    running daemon at --url (or JOBD_URL); `jobd COMMAND --help` shows each.
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(serve)


@main.command()
@_config_options
def serve(**flags: Any) -> None:
    """Start the daemon. Every setting is a flag and an environment variable."""
    from jobd.server import serve as run_server

    sys.exit(run_server(load_config(flags)))


# ---------------------------------------------------------------------------
# Client commands: thin wrappers over jobd.client (the HTTP side lives there).


def _client_command(func: Callable[..., Any]) -> Callable[..., Any]:
    """--url for every client command; ClientError becomes a message and its exit code."""

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            func(*args, **kwargs)
        except client.ClientError as exc:
            if isinstance(exc, client.HTTPError) and exc.status == 401 \
                    and not os.environ.get("JOBD_TOKEN"):
                click.echo(f"Error: {exc} (JOBD_TOKEN is not set)", err=True)
            else:
                click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(client.EXIT_INTERRUPTED)
        except BrokenPipeError:
            # `jobd logs ID | head`: the reader is gone, which is not an error.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(client.EXIT_OK)

    return click.option(
        "--url", envvar="JOBD_URL", default=client.DEFAULT_URL, show_default=True,
        show_envvar=True, help="Base URL of the daemon. The token, when the daemon wants one, "
        "is read from JOBD_TOKEN (sent as Authorization: Bearer).",
    )(run)


def _connect(url: str) -> client.Client:
    return client.Client(url, os.environ.get("JOBD_TOKEN"))


def _pairs(values: tuple[str, ...], what: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.UsageError(f"{what} must be NAME=VALUE, not {item!r}")
        pairs[key] = value
    return pairs


def _param_value(text: str) -> str | int:
    """An integer when it is one (parameters are strings or integers), else the text."""
    try:
        number = int(text)
    except ValueError:
        return text
    return number if str(number) == text else text  # "007" stays text


def _duration(text: str, flag: str) -> float:
    """A DURATION option's seconds; a bad one is a usage error (exit 2) naming the flag."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise click.UsageError(f"{flag}: {exc}") from exc


def _statuses(values: tuple[str, ...]) -> list[str]:
    found = [s.strip().upper() for v in values for s in v.split(",") if s.strip()]
    for status in found:
        if status not in STATUSES:
            raise click.UsageError(f"unknown status {status!r}; one of {', '.join(STATUSES)}")
    return found


def _download_unpacked(api: client.Client, job_id: str, dest: Path) -> None:
    """The job's working directory as a zip, unpacked into `dest` (checked empty before)."""
    with tempfile.TemporaryDirectory(prefix="jobd-download-") as tmp:
        zip_path = Path(tmp) / "result.zip"
        with api.archive(job_id, "zip") as answer, open(zip_path, "wb") as out, \
                Progress("downloading", answer.length) as meter:
            client.save_stream(answer, out, meter)
        client.unpack(zip_path, dest)


def _finished_line(record: dict[str, Any]) -> str:
    return f"{record.get('id')}: {record.get('status')}: {record.get('message') or ''}".rstrip(
        ": ")


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--spec", help="Run the daemon's job spec of this name (PATHS: optional files "
              "for it; --param gives its parameter values).")
@click.option("--id", "job_id", help="Job id (1-128 of A-Z a-z 0-9 . _ -); the daemon makes "
              "one up when absent.")
@click.option("--entry", help="Script to run instead of run.sh.")
@click.option("--arg", "args", multiple=True, metavar="ARG",
              help="Argument for the entry script (repeatable, in order).")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
              help="A job parameter (repeatable), given to the job as $JOBD_PARAM_NAME; "
              "digits are sent as an integer, anything else as text.")
@click.option("--timeout", metavar="DURATION", help="Wall-clock limit of the job: 90s, 5m, 2h.")
@click.option("--priority", type=int, help="Higher runs first.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="A label to find the job by (repeatable).")
@click.option("--wait", is_flag=True, help="Wait until the job ends; exit with its code.")
@click.option("-f", "--follow", is_flag=True, help="Print the job's log live (implies --wait).")
@click.option("-o", "--output", type=click.Path(path_type=Path), metavar="DIR",
              help="Unpack the finished job's directory into DIR (new or empty; implies "
              "--wait).")
@_client_command
def submit(*, paths: tuple[Path, ...], spec: str | None, job_id: str | None, entry: str | None,
           args: tuple[str, ...], params: tuple[str, ...], timeout: str | None,
           priority: int | None, labels: tuple[str, ...], wait: bool, follow: bool,
           output: Path | None, url: str) -> None:
    """Submit a job: a directory, a zip, or files, with run.sh at the top.

    A directory is sent with its content at the top; a zip as it is; several files (or
    directories) each under its own name. Zipping and upload stream through a temporary file,
    so the size does not matter. Prints the job id on stdout (with --follow, the job's log
    goes there instead and the id to stderr).

    \b
      jobd submit ./job --wait -o result/
      jobd submit run.sh input.fasta --label project=x --follow
      jobd submit --spec reverse --param input=in.fasta in.fasta --wait
    """
    if spec is None and not paths:
        raise click.UsageError("give the job's files (or --spec NAME)")
    if spec is not None and (entry is not None or args):
        raise click.UsageError("--entry and --arg do not apply to a spec job")
    fields: dict[str, Any] = {}
    if job_id is not None:
        problem = id_problem(job_id)
        if problem:
            raise click.UsageError(f"--id: {problem}")
        fields["id"] = job_id
    if entry is not None:
        fields["entry"] = entry
    if args:
        fields["args"] = list(args)
    if params:
        fields["params"] = {k: _param_value(v) for k, v in _pairs(params, "--param").items()}
    if timeout is not None:
        fields["timeout"] = _duration(timeout, "--timeout")
    if priority is not None:
        fields["priority"] = priority
    if labels:
        fields["labels"] = _pairs(labels, "--label")
    if output is not None:
        client.check_output_dir(output)
    api = _connect(url)
    inputs = list(paths)
    with tempfile.TemporaryDirectory(prefix="jobd-submit-") as tmp:
        if not inputs:
            record = api.submit(None, fields, spec=spec)
        elif client.payload_kind(inputs) == "zip":
            zip_path = inputs[0]
        else:
            zip_path = Path(tmp) / "input.zip"
            try:
                client.build_zip(inputs, zip_path)
            except OSError as exc:  # the temporary directory: full, or not writable
                raise client.LocalError(f"cannot write {zip_path}: {exc.strerror or exc}") \
                    from exc
        if inputs:
            with Progress("uploading", base64_size(zip_path.stat().st_size)) as meter:
                record = api.submit(zip_path, fields, progress=meter, spec=spec)
    job = str(record["id"])
    if follow:
        click.echo(f"submitted {job}", err=True)
        record = api.follow(job, click.get_binary_stream("stdout"))
    else:
        click.echo(job)
        if not (wait or output is not None):
            return
        record = api.wait(job)
    if output is not None:
        _download_unpacked(api, job, output)
    click.echo(_finished_line(record), err=True)
    sys.exit(client.job_exit_code(record))


@main.command(name="specs")
@click.option("--json", "as_json", is_flag=True, help="The specs as JSON.")
@_client_command
def list_specs(as_json: bool, url: str) -> None:
    """List the job specs the daemon offers, with their parameters."""
    specs = _connect(url).specs()
    if as_json:
        click.echo(json.dumps(specs, indent=2))
        return
    for spec in specs:
        schema = spec["parameters"]
        required = set(schema.get("required") or ())
        params = ", ".join(
            f"{name}{'*' if name in required else ''}:{p.get('x-jobd-type', p.get('type'))}"
            for name, p in schema["properties"].items())
        click.echo(f"{spec['name']}\t{params}\t{spec['description']}")


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="The job as JSON.")
@_client_command
def status(job_id: str, as_json: bool, url: str) -> None:
    """Show one job.

    \b
      jobd status my-job
      jobd status my-job --json | jq -r .status
    """
    record = _connect(url).get(job_id)
    if as_json:
        click.echo(json.dumps(record, indent=2))
        return
    rows = [("id", record.get("id")), ("status", record.get("status")),
            ("message", record.get("message")), ("created", record.get("created")),
            ("started", record.get("started")), ("finished", record.get("finished")),
            ("duration", client.duration_text(record.get("duration"))
             if record.get("duration") is not None else None),
            ("exit code", record.get("exit_code")), ("signal", record.get("signal")),
            ("attempt", record.get("attempt")), ("priority", record.get("priority")),
            ("labels", ", ".join(f"{k}={v}" for k, v in (record.get("labels") or {}).items())),
            ("entry", record.get("entry")),
            ("args", " ".join(record.get("args") or [])),
            ("params", json.dumps(record["params"]) if record.get("params") else None),
            ("timeout", record.get("timeout")), ("executor", record.get("executor")),
            ("input", human_size(record["input_size"])
             if isinstance(record.get("input_size"), int) else None),
            ("output", human_size(record["output_size"])
             if isinstance(record.get("output_size"), int) else None)]
    shown = [(k, v) for k, v in rows if v not in (None, "")]
    width = max(len(k) for k, _ in shown) + 1
    for key, value in shown:
        click.echo(f"{key + ':':<{width}} {value}")


def _age(record: dict[str, Any], now: float) -> str:
    created = client.parse_time(record.get("created"))
    return "-" if created is None else client.duration_text(max(0.0, now - created))


def _exit_text(record: dict[str, Any]) -> str:
    if record.get("exit_code") is not None:
        return str(record["exit_code"])
    if record.get("signal") is not None:
        name = str(record["signal"])
        return name if name.startswith("SIG") else f"signal {name}"
    return "-"


@main.command(name="list")
@click.option("--status", "statuses", multiple=True, metavar="STATUS[,STATUS]",
              help="Only these statuses (repeatable or comma-separated).")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="Only jobs with this label (repeatable: all must match).")
@click.option("--limit", type=click.IntRange(min=0), default=50, show_default=True,
              help="Most jobs shown, newest first; 0 for all (pages are fetched as needed).")
@click.option("--json", "as_json", is_flag=True, help="A JSON array of the jobs, for scripts.")
@_client_command
def list_jobs(statuses: tuple[str, ...], labels: tuple[str, ...], limit: int, as_json: bool,
              url: str) -> None:
    """List jobs, newest first, as a table (or JSON).

    \b
      jobd list --status RUNNING,QUEUED
      jobd list --label project=x --limit 0 --json | jq -r '.[].id'
    """
    _pairs(labels, "--label")
    jobs = _connect(url).jobs(statuses=_statuses(statuses) or None, labels=list(labels),
                             limit=limit or None)
    if as_json:
        click.echo(json.dumps(list(jobs), indent=2))
        return
    now = time.time()
    rows = [("ID", "STATUS", "AGE", "DURATION", "EXIT", "LABELS")]
    for record in jobs:
        rows.append((str(record.get("id")), str(record.get("status")), _age(record, now),
                     client.duration_text(record.get("duration")), _exit_text(record),
                     ",".join(f"{k}={v}" for k, v in (record.get("labels") or {}).items())))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]
        click.echo("  ".join(cells).rstrip())


@main.command()
@click.argument("job_id")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the job ends.")
@_client_command
def logs(job_id: str, follow: bool, url: str) -> None:
    """Print a job's log (stdout and stderr of run.sh).

    \b
      jobd logs my-job -f
    """
    api = _connect(url)
    out = click.get_binary_stream("stdout")
    if follow:
        api.follow(job_id, out)
        return
    with api.logs(job_id) as answer:
        for data in answer.chunks():
            out.write(data)
    out.flush()


def _each(job_ids: tuple[str, ...], action: Callable[[str], None]) -> None:
    """Every id is tried; the exit code is the last failure's."""
    failed: client.ClientError | None = None
    for job_id in job_ids:
        try:
            action(job_id)
        except client.HTTPError as exc:
            click.echo(f"Error: {job_id}: {exc}", err=True)
            failed = exc
    if failed is not None:
        sys.exit(failed.exit_code)


@main.command()
@click.argument("job_ids", nargs=-1, required=True)
@_client_command
def cancel(job_ids: tuple[str, ...], url: str) -> None:
    """Cancel jobs (a finished job stays as it is).

    \b
      jobd cancel my-job
    """
    api = _connect(url)

    def one(job_id: str) -> None:
        answer = api.cancel(job_id)
        record = answer.get("job") or {}
        note = "" if answer.get("changed", True) else " (already finished)"
        click.echo(f"{job_id}: {record.get('status', '?')}{note}")

    _each(job_ids, one)


@main.command()
@click.argument("job_ids", nargs=-1, required=True)
@_client_command
def restart(job_ids: tuple[str, ...], url: str) -> None:
    """Run finished jobs again from their original input.

    \b
      jobd restart my-job
    """
    api = _connect(url)
    _each(job_ids, lambda job_id: click.echo(f"{job_id}: {api.restart(job_id).get('status')}"))


@main.command()
@click.argument("job_ids", nargs=-1, required=True)
@_client_command
def delete(job_ids: tuple[str, ...], url: str) -> None:
    """Delete jobs and their files (a running job must be cancelled first).

    \b
      jobd delete my-job
    """
    api = _connect(url)

    def one(job_id: str) -> None:
        api.delete(job_id)
        click.echo(f"deleted {job_id}")

    _each(job_ids, one)


@main.command()
@click.argument("job_id")
@click.option("-o", "--output", metavar="FILE|DIR", help="Where to: a file, `-` for stdout, or "
              "an existing or /-ended directory to unpack into (it must be empty). Default: "
              "ID.zip (or ID.tar.gz) here.")
@click.option("--format", "fmt", type=click.Choice(["zip", "tar.gz"]), default="zip",
              show_default=True, help="Archive format.")
@_client_command
def download(job_id: str, output: str | None, fmt: str, url: str) -> None:
    """Download a job's working directory (a live snapshot while it runs).

    \b
      jobd download my-job                  # my-job.zip
      jobd download my-job -o result/       # unpacked
      jobd download my-job --format tar.gz -o - | tar xz
    """
    api = _connect(url)
    if output is not None and output != "-" and (output.endswith("/") or Path(output).is_dir()):
        dest_dir = Path(output)
        client.check_output_dir(dest_dir)
        _download_unpacked(api, job_id, dest_dir)
        return
    with api.archive(job_id, fmt) as answer:
        if output == "-":
            client.save_stream(answer, click.get_binary_stream("stdout"))
            return
        target = Path(output or f"{job_id}.{fmt}")
        partial = target.with_name(f".{target.name}.part")
        try:
            with open(partial, "wb") as out, Progress("downloading", answer.length) as meter:
                client.save_stream(answer, out, meter)
            os.replace(partial, target)
        except OSError as exc:
            raise client.LocalError(f"{target}: {exc.strerror or exc}") from exc
        finally:
            if partial.exists():
                partial.unlink()
    click.echo(str(target), err=True)


@main.command()
@click.option("--older-than", "older_than", required=True, metavar="DURATION",
              help="Finished at least this long ago: 90s, 30m, 12h, 2d.")
@click.option("--status", "statuses", multiple=True, metavar="STATUS[,STATUS]",
              help="Only these final statuses (default SUCCESS, FAILED and CANCELLED).")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="Only jobs with this label (repeatable).")
@click.option("--dry-run", is_flag=True, help="Only print what would be deleted.")
@_client_command
def clean(older_than: str, statuses: tuple[str, ...], labels: tuple[str, ...], dry_run: bool,
          url: str) -> None:
    """Delete finished jobs older than an age (running and queued jobs are never touched).

    \b
      jobd clean --older-than 2d
      jobd clean --older-than 1h --status FAILED --dry-run
    """
    age = _duration(older_than, "--older-than")
    wanted = _statuses(statuses) or sorted(TERMINAL)
    active = [s for s in wanted if s not in TERMINAL]
    if active:
        raise click.UsageError(f"clean only deletes finished jobs, not {', '.join(active)}")
    _pairs(labels, "--label")
    api = _connect(url)
    cutoff = time.time() - age
    doomed = [str(record["id"]) for record in api.jobs(statuses=wanted, labels=list(labels))
              if record.get("status") in TERMINAL
              and (client.parse_time(record.get("finished") or record.get("created"))
                   or cutoff) < cutoff]
    if dry_run:
        for job_id in doomed:
            click.echo(f"would delete {job_id}")
        return
    deleted = 0

    def one(job_id: str) -> None:
        nonlocal deleted
        try:
            api.delete(job_id)
        except client.HTTPError as exc:
            if exc.status != 404:  # gone already (the retention sweep): what we wanted
                raise
        deleted += 1
        click.echo(f"deleted {job_id}")

    try:
        _each(tuple(doomed), one)
    finally:
        click.echo(f"{deleted} job(s) deleted", err=True)


@main.command("hash-token")
@click.argument("token", required=False)
def hash_token(token: str | None) -> None:
    """Print the SHA-256 of a token, as a tokens file or JOBD_TOKEN_<NAME> holds it.

    The token is read from standard input when not given (so it stays out of the shell
    history); surrounding whitespace is ignored.
    """
    from jobd.auth import hash_token as digest_of

    text = token if token is not None else sys.stdin.readline()
    text = text.strip()
    if not text:
        raise click.UsageError("no token given (argument or one line on standard input)")
    click.echo(digest_of(text))


@main.command("new-token")
@click.argument("client")
@click.option("--role", type=click.Choice(["client", "admin"]), default="client",
              show_default=True, help="admin sees and manages every job.")
@click.option("--expires", default=None, metavar="TIME",
              help="RFC 3339 time or date after which the token stops working.")
def new_token(client: str, role: str, expires: str | None) -> None:
    """Make a random token for CLIENT: prints the token, then the tokens-file line.

    Give the token to the client (it is not stored anywhere); add the line (it holds only
    the hash) to JOBD_TOKENS_FILE.
    """
    from jobd.auth import hash_token as digest_of
    from jobd.auth import new_token as make
    from jobd.auth import parse_token_lines

    token = make()
    line = f"{client}:{role}:{digest_of(token)}" + (f":{expires}" if expires else "")
    try:
        parse_token_lines(line, "new-token")
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(token)
    click.echo(line)
