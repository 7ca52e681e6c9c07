"""`cascade-local cache`: the prompt states kept on disk by `run` (read once, ask many), listed or emptied."""

from __future__ import annotations

import json

import typer

from cascade_local.cli.console import err_console

cache_app = typer.Typer(rich_markup_mode="rich", no_args_is_help=True)


@cache_app.command("list")
def list_(json_out: bool = typer.Option(False, "--json", help="Print a JSON array instead of lines.")) -> None:
    """List the stored prompt states, least recently used first: model id, tokens, size, last use, file."""
    from datetime import datetime

    from cascade_local.cli.run_cmd import write_stdout
    from cascade_local.placement import fmt_bytes
    from cascade_local.prompt_store import default_folder, entries

    found = entries(default_folder())
    if json_out:
        write_stdout(json.dumps([{"model": e.model, "tokens": e.n_tokens, "bytes": e.nbytes, "used": e.used,
                                  "path": str(e.path)} for e in found]) + "\n")
        return
    for e in found:
        used = datetime.fromtimestamp(e.used).strftime("%Y-%m-%d %H:%M")
        write_stdout(f"{e.model}  {e.n_tokens:>8} tokens  {fmt_bytes(e.nbytes):>11}  {used}  {e.path.name}\n")
    total = sum(e.nbytes for e in found)
    err_console.print(f"{len(found)} prompt states, {fmt_bytes(total)} in {default_folder()}", highlight=False,
                      markup=False, soft_wrap=True)


@cache_app.command("clear")
def clear() -> None:
    """Remove every stored prompt state."""
    from cascade_local.placement import fmt_bytes
    from cascade_local.prompt_store import clear as clear_folder
    from cascade_local.prompt_store import default_folder

    count, size = clear_folder(default_folder())
    err_console.print(f"removed {count} prompt states ({fmt_bytes(size)})", highlight=False, markup=False)
