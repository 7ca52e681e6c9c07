"""Reading what the user types: a line or a \"\"\" block, from prompt_toolkit on a terminal or from a pipe."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cascade_local.cli.chat.commands import BLOCK, slash_completer

if TYPE_CHECKING:
    from prompt_toolkit.key_binding import KeyPressEvent
    from rich.console import Console

PROMPT = ">>> "
CONTINUATION = "... "


def block_is_open(text: str) -> bool:
    """True while `text` is a \"\"\" block whose closing \"\"\" has not been typed yet."""
    body = text.lstrip()
    return body.startswith(BLOCK) and not body[len(BLOCK):].rstrip().endswith(BLOCK)


def interpret(raw: str) -> tuple[str, str]:
    """What the user typed -> ('command', line) | ('message', text) | ('empty', '').

    A \"\"\" block is always a message, with the quotes and the blank first and last lines removed, so that
    a message can start with a slash.
    """
    text = raw.strip()
    if text.startswith(BLOCK):
        body = text[len(BLOCK):]
        body = body[: -len(BLOCK)] if body.rstrip().endswith(BLOCK) else body
        body = body.strip("\n")
        return ("message", body) if body.strip() else ("empty", "")
    if not text:
        return "empty", ""
    return ("command", text) if text.startswith("/") else ("message", raw.strip("\n"))


def read_message(read_line: Callable[[str], str]) -> str:
    """Reads one input: a line, or a whole \"\"\" block, line by line (the prompt is PROMPT, then CONTINUATION).

    An input that ends inside a block sends what was read; the next call then meets the end of input.
    """
    text = read_line(PROMPT)
    while block_is_open(text):
        try:
            text += "\n" + read_line(CONTINUATION)
        except EOFError:
            break
    return text


def _prompted_line(prompt: str) -> str:
    """One line of stdin; the prompt goes to stderr, so that stdout (`chat < script > out.md`) holds only answers."""
    sys.stderr.write(prompt)
    sys.stderr.flush()
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.removesuffix("\n")


def plain_reader() -> Callable[[], str]:
    """Line reading for a pipe or a file: a script. Its errors make the chat's exit code non-zero (see chat.loop)."""
    def read() -> str:
        return read_message(_prompted_line)

    read.scripted = True  # type: ignore[attr-defined]  # see chat.loop.Reader
    return read


def first_then(message: str, read: Callable[[], str], err: Console) -> Callable[[], str]:
    """`chat MODEL MESSAGE`: MESSAGE is the first input (shown after the prompt, as if typed), then `read`'s."""
    pending = [message]

    def chained() -> str:
        if pending:
            err.print(PROMPT + pending[0], highlight=False, markup=False, soft_wrap=True)
            return pending.pop()
        return read()

    for attribute in ("reads_ctrl_c", "scripted"):  # see chat.loop.Reader
        setattr(chained, attribute, getattr(read, attribute, False))
    return chained


def history_file(folder: Path) -> Path | None:
    """`folder/chat_history`, created private (prompts can be private); None when the folder cannot be written."""
    path = folder / "chat_history"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    except OSError:
        return None
    return path


def terminal_reader(history: Path | None) -> Callable[[], str]:
    """prompt_toolkit line editing: history across sessions, completion, and \"\"\" blocks edited as one input."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.filters import Condition
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings
    from prompt_toolkit.output.defaults import create_output

    keys = KeyBindings()

    @keys.add("c-c")
    def _ctrl_c(event: KeyPressEvent) -> None:
        # Typed text: Ctrl-C clears the line. An empty line: the loop hears it (and warns before leaving).
        buffer = event.app.current_buffer
        if buffer.text:
            buffer.reset()
        else:
            event.app.exit(exception=KeyboardInterrupt, style="class:aborting")

    @keys.add("enter", filter=Condition(lambda: block_is_open(session.default_buffer.text)))
    def _enter_in_block(event: KeyPressEvent) -> None:
        # prompt_toolkit's own Enter copies the previous line's indentation onto the new one, which changes
        # what is sent: typed indentation doubles, and a paste without bracketed paste arrives re-indented.
        event.current_buffer.insert_text("\n")

    session: PromptSession[str] = PromptSession(
        history=FileHistory(str(history)) if history else InMemoryHistory(),
        completer=slash_completer(),
        # Enter adds a line while a """ block is open and sends once it is closed.
        multiline=Condition(lambda: block_is_open(session.default_buffer.text)),
        prompt_continuation=CONTINUATION,
        key_bindings=keys,
        # With stdout redirected (`chat > answers.md`) the prompt still goes to the terminal.
        output=create_output(always_prefer_tty=True),
    )
    def read() -> str:
        return session.prompt(PROMPT)

    read.reads_ctrl_c = True  # type: ignore[attr-defined]  # see chat.loop.Reader
    return read
