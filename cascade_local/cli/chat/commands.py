"""Slash commands: the table of commands, their parsing into typed values, /help, and Tab completion."""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cascade_local.errors import CascadeError

if TYPE_CHECKING:
    from prompt_toolkit.completion import CompleteEvent, Completion
    from prompt_toolkit.document import Document



BLOCK = '"""'


# name -> (arguments, what it does). The order is the order of /help.
COMMANDS: dict[str, tuple[str, str]] = {
    "/think": ("[on|off]", "answer with reasoning first, or directly (no argument: show which)"),
    "/thinking": ("[show|hide]", "stream the reasoning, or show only its one-line summary"),
    "/budget": ("N|off", "close the reasoning after N tokens"),
    "/tools": ("[on|off]", "let the model run Python while it reasons (asks before each call unless --yes)"),
    "/system": ("[TEXT|off]", "set the system prompt, or remove it (no text: show it)"),
    "/settings": ("", "show the settings of the next turn: thinking, budget, tokens, sampling, system prompt"),
    "/read": ("FILE", "put a text file before your next message (a long one is read once: its state is kept on "
              "disk, so asking about it again, here or with run -f, starts at once)"),
    "/clear": ("", "forget the conversation (the system prompt stays)"),
    "/retry": ("", "ask the last question again"),
    "/save": ("FILE [--force]", "save the conversation as JSON (--force overwrites)"),
    "/load": ("FILE|ID [--settings]", "continue a saved conversation, or logged conversation ID (--settings: "
              "take the file's settings and system prompt too)"),
    "/stats": ("", "tokens and speed: last answer, session, memory, placement; the logged conversation's id"),
    "/model": ("", "model file, architecture, parameters, quantization recipe"),
    "/help": ("", "this list"),
    "/exit": ("", "leave the chat (Ctrl-D too)"),
}
ALIASES = {"/quit": "/exit", "/bye": "/exit", "/?": "/help"}
# name -> (true word, false word)
TOGGLES = {"/think": ("on", "off"), "/thinking": ("show", "hide"), "/tools": ("on", "off")}

KEYS_HELP = (f"Multi-line: a line starting with {BLOCK} opens a block; a line ending with {BLOCK} closes and "
             "sends it.\n"
             "Tab completes commands, Up/Down recall earlier inputs. Ctrl-C stops an answer (what was said stays "
             "in the conversation); at the prompt Ctrl-C clears the line, and on an empty line twice in a row "
             "leaves the chat, as Ctrl-D or /exit do.")


# -- slash commands -------------------------------------------------------------------------------------------------

class SlashError(CascadeError):
    """A slash command that is unknown or has a bad argument; the chat goes on."""


@dataclass(frozen=True)
class Command:
    """A parsed slash command: `value` is its argument, already typed (bool, int, Path, str or None)."""

    name: str
    value: Any = None
    force: bool = False
    with_settings: bool = False  # /load FILE --settings


def _usage(name: str) -> SlashError:
    return SlashError(f"usage: {name} {COMMANDS[name][0]}".rstrip())


def parse_slash(line: str) -> Command:
    """'/budget 512' -> Command('/budget', 512). Raises SlashError saying what was expected."""
    name, _, arg = line.strip().partition(" ")
    name = ALIASES.get(name.lower(), name.lower())
    arg = arg.strip()
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, [*COMMANDS, *ALIASES], n=1, cutoff=0.75)
        guess = f"did you mean {ALIASES.get(close[0], close[0])}? " if close else ""
        raise SlashError(f"unknown command {name}; {guess}/help lists them (to send a message that starts with /, "
                         f'wrap it in {BLOCK})')
    if name in TOGGLES:
        on, off = TOGGLES[name]
        if not arg:
            return Command(name, None)  # show the current value
        if arg.lower() not in (on, off):
            raise _usage(name)
        return Command(name, arg.lower() == on)
    if name == "/budget":
        if arg.lower() == "off":
            return Command(name, None)
        if not arg.isdigit() or int(arg) < 1:
            raise _usage(name)
        return Command(name, int(arg))
    if name == "/system":
        # None shows the prompt, "" removes it.
        return Command(name, "" if arg.lower() == "off" else arg or None)
    if name in ("/save", "/load"):
        try:
            words = shlex.split(arg)
        except ValueError as exc:  # an unclosed quote
            raise SlashError(f"{name}: {exc}") from None
        force = name == "/save" and "--force" in words
        with_settings = name == "/load" and "--settings" in words
        paths = [w for w in words if not (force and w == "--force") and not (with_settings and w == "--settings")]
        if len(paths) != 1:
            hint = " (quote a name that has spaces)" if len(paths) > 1 else ""
            raise SlashError(f"{_usage(name)}{hint}")
        return Command(name, Path(paths[0]).expanduser(), force=force, with_settings=with_settings)
    if name == "/read":
        try:
            words = shlex.split(arg)
        except ValueError as exc:
            raise SlashError(f"{name}: {exc}") from None
        if len(words) != 1:
            raise SlashError(f"{_usage(name)}{' (quote a name that has spaces)' if len(words) > 1 else ''}")
        return Command(name, Path(words[0]).expanduser())
    if arg:
        raise SlashError(f"{name} takes no argument")
    return Command(name)


def help_text(columns: int = 100) -> str:
    """The commands and keys, wrapped at word boundaries to `columns` (the terminal would break words)."""
    import textwrap

    width = max(len(f"{n} {a}") for n, (a, _) in COMMANDS.items())
    indent = " " * (width + 4)
    rows = [textwrap.fill(what, max(columns, width + 24), initial_indent=f"  {f'{n} {a}'.rstrip():<{width}}  ",
                          subsequent_indent=indent) for n, (a, what) in COMMANDS.items()]
    keys = [textwrap.fill(line, max(columns, 40)) for line in KEYS_HELP.split("\n")]
    return "\n".join(["Commands:", *rows, *keys])


def slash_completer() -> Any:
    """Completes slash commands and their fixed arguments at the start of the line, and file names after them."""
    from prompt_toolkit.completion import Completer, PathCompleter, WordCompleter

    phrases = [*COMMANDS, "/budget off", *(f"{n} {a}" for n, words in TOGGLES.items() for a in words)]
    # sentence=True: the whole line so far is the prefix, so only a line that starts with / is completed.
    words = WordCompleter(sorted(phrases), sentence=True)
    paths = PathCompleter(expanduser=True)

    class SlashCompleter(Completer):
        def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterator[Completion]:
            from prompt_toolkit.document import Document as Doc

            text = document.text_before_cursor
            for name in ("/save ", "/load ", "/read "):
                if text.startswith(name):
                    yield from paths.get_completions(Doc(text[len(name):].lstrip()), complete_event)
                    return
            if text.startswith("/"):
                yield from words.get_completions(document, complete_event)

    return SlashCompleter()
