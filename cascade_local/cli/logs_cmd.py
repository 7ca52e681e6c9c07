"""`cascade-local logs`: the chat history, listed, searched, shown, deleted."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import typer

from cascade_local.cli.console import err_console

logs_app = typer.Typer(rich_markup_mode="rich")

FIRST_WORDS = 60  # characters of the first question shown in the list


def _local(stamp: str) -> str:
    """An ISO UTC time as local 'YYYY-MM-DD HH:MM'."""
    try:
        return datetime.fromisoformat(stamp).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return stamp


def _first_words(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= FIRST_WORDS else line[: FIRST_WORDS - 1] + "…"


@logs_app.callback(invoke_without_command=True)
def logs(
    ctx: typer.Context,
    n: int = typer.Option(20, "-n", min=1, help="How many conversations, most recent first."),
    search: str | None = typer.Option(None, "--search", metavar="TEXT", help="Only conversations whose messages "
                                      "(or reasoning) contain every word of TEXT (SQLite full-text search)."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON array instead of the table."),
) -> None:
    """List logged chats: id, date, model, questions, first words.

    Every chat is kept in $CASCADE_LOCAL_HOME/history.db unless --no-log (or
    \\[settings] log = false in models.toml). `logs show ID` prints one as
    Markdown (--json: as data), `logs rm ID` deletes one, `logs path` prints
    where the database is. `chat --resume ID` goes on with one.

    Example: cascade-local logs -n 5 --search "prime numbers"
    """
    from cascade_local.cli.run_cmd import write_stdout

    if ctx.invoked_subcommand is not None:
        return
    from cascade_local.history import open_store

    store = open_store()
    rows = store.summaries(limit=n, search=search) if store is not None else []
    if json_out:
        write_stdout(json.dumps([r.to_dict() for r in rows], ensure_ascii=False) + "\n")
        return
    if not rows:
        err_console.print("no logged conversations" + (f" match {search!r}" if search is not None else ""),
                          style="dim", highlight=False, markup=False)
        return
    models = [Path(r.model).name if r.model else "?" for r in rows]
    width = max(5, *(len(m) for m in models))
    lines = [f"{'id':>5}  {'date':<16}  {'model':<{width}}  {'turns':>5}  first words"]
    lines += [f"{r.id:>5}  {_local(r.started):<16}  {m:<{width}}  {r.turns:>5}  {_first_words(r.first)}"
              for r, m in zip(rows, models, strict=True)]
    write_stdout("\n".join(lines) + "\n")


@logs_app.command("show")
def show(
    conversation_id: int = typer.Argument(..., metavar="ID", help="The conversation's id (from cascade-local logs)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object: the conversation, its settings, "
                                  "and every message with its reasoning, tool calls, token counts and timings."),
) -> None:
    """Print one logged conversation as Markdown (--json: as data).

    Example: cascade-local logs show 12 --json
    """
    from cascade_local.cli.run_cmd import write_stdout
    from cascade_local.history import HistoryError, open_store, to_markdown

    store = open_store()
    if store is None:
        raise HistoryError(f"no logged conversation {conversation_id}; nothing has been logged yet")
    found = store.get(conversation_id)
    write_stdout(json.dumps(found.to_dict(), ensure_ascii=False) + "\n" if json_out else to_markdown(found))


@logs_app.command("rm")
def rm(conversation_id: int = typer.Argument(..., metavar="ID", help="The conversation to delete.")) -> None:
    """Delete one logged conversation.

    Example: cascade-local logs rm 12
    """
    from cascade_local.history import HistoryError, open_store

    store = open_store()
    if store is None:
        raise HistoryError(f"no logged conversation {conversation_id}; nothing has been logged yet")
    store.remove(conversation_id)
    err_console.print(f"removed conversation {conversation_id}", highlight=False)


@logs_app.command("path")
def path() -> None:
    """Print where the history database is (it may not exist yet).

    Example: cascade-local logs path
    """
    from cascade_local.cli.run_cmd import write_stdout
    from cascade_local.history import database_path

    write_stdout(f"{database_path()}\n")
