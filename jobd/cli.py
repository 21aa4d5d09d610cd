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
