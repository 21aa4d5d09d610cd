"""`python -m jobd` and the zipapp entry point."""

from __future__ import annotations

import importlib.util
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
            uvicorn_without_its_command_line()
            from jobd.server import serve

            try:
                sys.exit(serve(config))
            except KeyboardInterrupt:  # before the server handles SIGINT: as the CLI says it
                sys.exit("Aborted!")
    from jobd.cli import main as command_line

    command_line()


def uvicorn_without_its_command_line() -> None:
    """Import uvicorn's package without running its `__init__`, which imports uvicorn's own
    command line (`uvicorn.main`: its click command, and multiprocessing and the reloaders for
    `--workers` and `--reload`) only to re-export `run` and `main`. The daemon builds its
    Config and Server itself (server.py), so that is about 0.5 MiB of an idle daemon for
    nothing (bench/RESULTS.md). uvicorn's own modules import `Config` from the package
    (`uvicorn.lifespan.on`): it is set. Nothing changes once uvicorn is imported."""
    if "uvicorn" in sys.modules:
        return
    spec = importlib.util.find_spec("uvicorn")
    if spec is None or spec.loader is None:
        return  # not installed: the import in server.py says so
    package = importlib.util.module_from_spec(spec)
    sys.modules["uvicorn"] = package
    from uvicorn.config import Config

    package.Config = Config  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
