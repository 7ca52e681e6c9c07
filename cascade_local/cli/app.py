"""The `cascade-local` command: a thin layer over the library. Errors are translated here, once."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any

import click
import typer

from cascade_local import __version__
from cascade_local.errors import CascadeError

app = typer.Typer(
    name="cascade-local",
    help="Run NVIDIA Nemotron-Cascade-2-30B-A3B on your own desktop.",
    no_args_is_help=True,
    add_completion=True,
    # Tracebacks never show local variables: prompts and paths can be private.
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        print(f"cascade-local {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Run NVIDIA Nemotron-Cascade-2-30B-A3B on your own desktop."""


# Each command's module, imported only when needed: `cascade-local run ...` imports run_cmd alone, while
# `cascade-local --help` (which lists every command with its summary) imports them all.
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("convert_cmd", "convert"), "chat": ("chat_cmd", "chat"), "info": ("info_cmd", "info"),
    "plan": ("plan_cmd", "plan"), "run": ("run_cmd", "run"), "batch": ("batch_cmd", "batch"),
    "pull": ("models_cmd", "pull"), "list": ("models_cmd", "list_"), "rm": ("models_cmd", "rm"),
    "doctor": ("doctor_cmd", "doctor"), "eval": ("eval_cmd", "eval_"), "serve": ("serve_cmd", "serve"),
    "logs": ("logs_cmd", "logs_app"), "rpc-server": ("rpc_cmd", "rpc_server"), "cache": ("cache_cmd", "cache_app"),
}
GROUP_HELP = {"cache": "List or clear the prompt states run keeps on disk."}


def _invoked(argv: list[str]) -> str | None:
    """The command named on the command line, if it is the first argument after the program's own options."""
    words = [a for a in argv[1:2] if not a.startswith("-")]
    return words[0] if words and words[0] in COMMANDS else None


def _register(only: str | None = None) -> None:
    import importlib

    from cascade_local.cli import help_style

    help_style.apply()
    for name, (module_name, attribute) in COMMANDS.items():
        if only is not None and name != only:
            continue
        target = getattr(importlib.import_module(f"cascade_local.cli.{module_name}"), attribute)
        help_style.unwrap_commands(target)
        if isinstance(target, typer.Typer):
            if name in GROUP_HELP:
                app.add_typer(target, name=name, help=GROUP_HELP[name])
            else:
                app.add_typer(target, name=name)
        else:
            app.command(name)(target)


def _stdout_gone() -> bool:
    if type(sys.stdout).__name__ == "PacifyFlushWrapper":
        return True
    try:
        now, null = os.fstat(sys.stdout.fileno()), os.stat(os.devnull)
    except (OSError, ValueError):
        return True
    return (now.st_rdev, now.st_ino) == (null.st_rdev, null.st_ino) and not _STARTED_ON_DEVNULL


def _silence_stdout() -> None:
    # After a closed pipe, point stdout at /dev/null so the interpreter's final flush stays quiet.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _say_interrupted() -> None:
    from cascade_local.cli.console import err_console

    err_console.print("interrupted; nothing half-written was left behind", style="yellow")


def run_guarded(fn: Callable[[], Any]) -> int:
    """Run a command body; map domain errors to one line on stderr and their exit code."""
    from rich.markup import escape

    from cascade_local.cli.console import err_console

    try:
        return int(fn() or 0)
    except CascadeError as exc:
        try:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        except KeyboardInterrupt:  # Ctrl-C while the error is reported (often its cause, delivered late): still 130
            _say_interrupted()
            return 130
        return exc.exit_code
    except KeyboardInterrupt:
        _say_interrupted()
        return 130
    except BrokenPipeError:
        # `| head -1` closed our stdout: end quietly, and keep Python from complaining at exit.
        _silence_stdout()
        return 0


def _invoke() -> int:
    """Click in non-standalone mode, so that its exits and errors come back here to be mapped."""
    # Typer >= 0.2x raises the exceptions of its own vendored click (typer.Exit, typer.Abort, and
    # TyperException subclasses for bad options), not click's: both are mapped.
    try:
        result = app(standalone_mode=False)
    except SystemExit as exc:
        # Rich and click answer a closed stdout (`| head -1`) by pointing it at /dev/null (or wrapping
        # it) and exiting 1; a reader that stopped reading is not an error here.
        if exc.code == 1 and _stdout_gone():
            _silence_stdout()
            return 0
        raise
    except (click.exceptions.Exit, typer.Exit) as exc:
        return exc.exit_code
    except (click.exceptions.Abort, typer.Abort):  # Ctrl-D / Ctrl-C inside a click prompt
        _say_interrupted()
        return 130
    except (click.ClickException, getattr(typer, "TyperException", click.ClickException)) as exc:
        show = getattr(exc, "show", None)
        if show is not None:
            show()
        else:
            print(f"Error: {exc}", file=sys.stderr)
        return 1  # usage errors are 1; 2 is kept for model and load errors
    if result == 130:  # typer turns Ctrl-C into Exit(130), which non-standalone mode returns
        _say_interrupted()
    return result if isinstance(result, int) else 0


_STARTED_ON_DEVNULL = False


def main() -> None:
    global _STARTED_ON_DEVNULL
    try:
        first, null = os.fstat(sys.stdout.fileno()), os.stat(os.devnull)
        _STARTED_ON_DEVNULL = (first.st_rdev, first.st_ino) == (null.st_rdev, null.st_ino)
    except (OSError, ValueError):
        pass
    try:
        _register(_invoked(sys.argv))
        code = run_guarded(_invoke)
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _silence_stdout()
    except KeyboardInterrupt:  # Ctrl-C outside the command's body (start-up, the last flush): no traceback
        with contextlib.suppress(KeyboardInterrupt):
            _say_interrupted()
        code = 130
    sys.exit(code)
