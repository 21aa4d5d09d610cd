"""`python -m jobd` and the zipapp entry point."""

from __future__ import annotations

import sys


def main() -> None:
    """`jobd`: with no arguments, the daemon starts at once from the environment; anything
    else goes to the command line (jobd/cli.py).

    The daemon alone does not import the command line (click's tree of every command and
    flag, the HTTP client): that keeps an idle daemon's memory down. A setting that does not
    parse goes the command line's way too, which reports it as `jobd serve` does.
    """
    if len(sys.argv) <= 1:
        from jobd.config import Config, ConfigError

        try:
            config: Config | None = Config.load()
        except ConfigError:
            config = None  # the command line reports it, with its usage line
        if config is not None:
            from jobd.server import serve

            try:
                sys.exit(serve(config))
            except KeyboardInterrupt:  # before the server handles SIGINT: as the CLI says it
                sys.exit("Aborted!")
    from jobd.cli import main as command_line

    command_line()


if __name__ == "__main__":
    main()
