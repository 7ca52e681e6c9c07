"""The read-answer loop that `cascade-local chat` runs."""

from __future__ import annotations

from typing import Protocol

from rich.markup import escape

from cascade_local.cli.chat.commands import parse_slash
from cascade_local.cli.chat.input import interpret
from cascade_local.cli.chat.session import ChatSession
from cascade_local.errors import CascadeError


class Reader(Protocol):
    def __call__(self) -> str: ...


def run_chat(session: ChatSession, read: Reader) -> int:
    """The read-answer loop; returns the exit code: 0 for /exit, end of input, and Ctrl-C or Ctrl-D at the prompt.

    Leaving a chat is not a failure, however it is done, so a script that wraps the chat sees 0.
    """
    try:
        return _chat_loop(session, read)
    finally:
        session.close()  # the Python kernel ends with the chat


def _chat_loop(session: ChatSession, read: Reader) -> int:
    err = session.err
    while True:
        try:
            kind, text = interpret(read())
        except (EOFError, KeyboardInterrupt):
            err.print()
            return 0
        try:
            if kind == "command":
                outcome = session.execute(parse_slash(text))
                if outcome.exit:
                    return 0
                if outcome.message:
                    err.print(outcome.message, highlight=False, markup=False, soft_wrap=True)
                kind, text = ("message", outcome.ask) if outcome.ask is not None else ("empty", "")
            if kind == "message":
                try:
                    session.turn(text)
                except CascadeError:
                    session.drop_failed(text)  # the question was not answered: it leaves no trace
                    raise
        except CascadeError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
