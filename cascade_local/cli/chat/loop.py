"""The read-answer loop that `cascade-local chat` runs."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Protocol

from rich.markup import escape

from cascade_local.cli.chat.commands import parse_slash
from cascade_local.cli.chat.input import interpret
from cascade_local.cli.chat.session import ChatSession
from cascade_local.errors import CascadeError

# A Ctrl-C on an empty prompt only warns; a second one within this many seconds leaves. A Ctrl-C meant to stop
# an answer that had just ended then never ends the chat by surprise.
LEAVE_WINDOW = 2.0
LEAVE_HINT = "Ctrl-C again or Ctrl-D to leave"


class Reader(Protocol):
    """Returns the next input; raises EOFError at the end, KeyboardInterrupt for a Ctrl-C on an empty line.

    A reader with a true `reads_ctrl_c` attribute takes Ctrl-C as a key itself (prompt_toolkit's). One with a
    true `scripted` attribute reads a script (a pipe or a file), whose errors no one may be watching.
    """

    def __call__(self) -> str: ...


def run_chat(session: ChatSession, read: Reader, clock: Callable[[], float] = time.monotonic) -> int:
    """The read-answer loop; returns the exit code: 0 for /exit, end of input (Ctrl-D), and two Ctrl-C in a row.

    Leaving a chat is not a failure, however it is done. But a script (a reader marked `scripted`) in which
    a command or a question failed (an unknown command, a /load that could not read its file) ends with 1,
    so that the shell running it hears. The reader raises KeyboardInterrupt only for a Ctrl-C on an empty
    line (with text typed, Ctrl-C clears the line).
    """
    try:
        with session.interrupts.installed():
            return _chat_loop(session, read, clock)
    finally:
        session.close()  # the Python kernel ends with the chat


def _chat_loop(session: ChatSession, read: Reader, clock: Callable[[], float]) -> int:
    err = session.err
    scripted = getattr(read, "scripted", False)
    failed = False  # a command or a question of a script failed
    warned_at: float | None = None  # when the last Ctrl-C at the prompt warned
    while True:
        try:
            # prompt_toolkit reads Ctrl-C as a key while it runs; a SIGINT just before or after that (an answer
            # had just ended) is dropped rather than raised inside its set-up or tear-down.
            with nullcontext() if getattr(read, "reads_ctrl_c", False) else session.interrupts.armed():
                raw = read()
            kind, text = interpret(raw)
        except EOFError:
            err.print()
            return 1 if failed else 0
        except KeyboardInterrupt:
            now = clock()
            if warned_at is not None and now - warned_at <= LEAVE_WINDOW:
                err.print()
                return 0
            warned_at = now
            err.print(LEAVE_HINT, style="yellow", highlight=False)
            continue
        warned_at = None
        try:
            if kind == "command":
                outcome = session.execute(parse_slash(text))
                if outcome.exit:
                    return 1 if failed else 0
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
            failed = scripted
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
