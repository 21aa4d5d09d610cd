"""The command line: `jobd` (or `jobd serve`) starts the daemon."""

from __future__ import annotations

import sys
from typing import Any, Callable

import click

from jobd import __version__
from jobd.config import Config, ConfigError, fields


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


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="jobd")
@click.pass_context
def main(ctx: click.Context) -> None:
    """jobd: runs the jobs clients upload, in the container it ships in.

    With no command, starts the daemon (as `jobd serve`).
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(serve)


@main.command()
@_config_options
def serve(**flags: Any) -> None:
    """Start the daemon. Every setting is a flag and an environment variable."""
    from jobd.server import serve as run_server

    sys.exit(run_server(load_config(flags)))


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
