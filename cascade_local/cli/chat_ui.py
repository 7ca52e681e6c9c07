"""The terminal chat: slash commands, multi-line input, and the live rendering of reasoning and answer.

Parsing (`parse_slash`, `interpret`, `block_is_open`) and the Markdown block splitter are pure functions, tested
on their own. `ChatSession` holds the state and runs commands and turns; `run_chat` is the read-answer loop that
`cascade-local chat` drives with a reader: prompt_toolkit's on a terminal, plain line reading from a pipe.

On a terminal the answer is rendered as Markdown while it arrives and the reasoning streams in a dim block that
collapses to one line when the answer starts. When stdout (or stderr) is not a terminal the same stream is written
as plain text, byte for byte what the model said, so scripts keep working.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rich.console import Console, ConsoleOptions, RenderResult
from rich.markup import escape
from rich.segment import Segment
from rich.text import Text

from cascade_local.errors import CascadeError

if TYPE_CHECKING:
    from prompt_toolkit.completion import CompleteEvent, Completion
    from prompt_toolkit.document import Document
    from rich.live import Live

    from cascade_local.conversation import Conversation, TurnSettings
    from cascade_local.engine import Event, Result
    from cascade_local.placement import Plan
    from cascade_local.sampling import SamplingParams
    from cascade_local.tools import Answer, CallRecord, LoopEvent, Tool, ToolCall

PROMPT = ">>> "
CONTINUATION = "... "
BLOCK = '"""'

# name -> (arguments, what it does). The order is the order of /help.
COMMANDS: dict[str, tuple[str, str]] = {
    "/think": ("on|off", "answer with reasoning first, or directly"),
    "/thinking": ("show|hide", "stream the reasoning, or show only its one-line summary"),
    "/budget": ("N|off", "close the reasoning after N tokens"),
    "/tools": ("on|off", "let the model run Python while it reasons (asks before each call unless --yes)"),
    "/system": ("[TEXT]", "set the system prompt (no text: remove it)"),
    "/clear": ("", "forget the conversation (the system prompt stays)"),
    "/retry": ("", "ask the last question again"),
    "/save": ("FILE [--force]", "save the conversation as JSON (--force overwrites)"),
    "/load": ("FILE", "continue a saved conversation, with its settings"),
    "/stats": ("", "tokens and speed: last answer, session, memory, placement"),
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
             "in the conversation); Ctrl-C or Ctrl-D at the prompt leaves the chat.")


# -- slash commands -------------------------------------------------------------------------------------------------

class SlashError(CascadeError):
    """A slash command that is unknown or has a bad argument; the chat goes on."""


@dataclass(frozen=True)
class Command:
    """A parsed slash command: `value` is its argument, already typed (bool, int, Path, str or None)."""

    name: str
    value: Any = None
    force: bool = False


def _usage(name: str) -> SlashError:
    return SlashError(f"usage: {name} {COMMANDS[name][0]}".rstrip())


def parse_slash(line: str) -> Command:
    """'/budget 512' -> Command('/budget', 512). Raises SlashError saying what was expected."""
    name, _, arg = line.strip().partition(" ")
    name = ALIASES.get(name.lower(), name.lower())
    arg = arg.strip()
    if name not in COMMANDS:
        raise SlashError(f"unknown command {name}; /help lists them (to send a message that starts with /, "
                         f'wrap it in {BLOCK})')
    if name in TOGGLES:
        on, off = TOGGLES[name]
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
        return Command(name, arg or None)
    if name in ("/save", "/load"):
        try:
            words = shlex.split(arg)
        except ValueError as exc:  # an unclosed quote
            raise SlashError(f"{name}: {exc}") from None
        force = name == "/save" and "--force" in words
        paths = [w for w in words if not (force and w == "--force")]
        if len(paths) != 1:
            hint = " (quote a name that has spaces)" if len(paths) > 1 else ""
            raise SlashError(f"{_usage(name)}{hint}")
        return Command(name, Path(paths[0]).expanduser(), force=force)
    if arg:
        raise SlashError(f"{name} takes no argument")
    return Command(name)


def help_text() -> str:
    width = max(len(f"{n} {a}") for n, (a, _) in COMMANDS.items())
    rows = [f"  {f'{n} {a}'.rstrip():<{width}}  {what}" for n, (a, what) in COMMANDS.items()]
    return "\n".join(["Commands:", *rows, KEYS_HELP])


# -- multi-line input -----------------------------------------------------------------------------------------------

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


def plain_reader() -> Callable[[], str]:
    """Line reading for a pipe or a file: input() as before, prompts and all, so scripts see what they always saw."""
    return lambda: read_message(input)


def slash_completer() -> Any:
    """Completes slash commands and their fixed arguments at the start of the line, and file names for /save, /load."""
    from prompt_toolkit.completion import Completer, PathCompleter, WordCompleter

    phrases = [*COMMANDS, "/budget off", *(f"{n} {a}" for n, words in TOGGLES.items() for a in words)]
    # sentence=True: the whole line so far is the prefix, so only a line that starts with / is completed.
    words = WordCompleter(sorted(phrases), sentence=True)
    paths = PathCompleter(expanduser=True)

    class SlashCompleter(Completer):
        def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterator[Completion]:
            from prompt_toolkit.document import Document as Doc

            text = document.text_before_cursor
            for name in ("/save ", "/load "):
                if text.startswith(name):
                    yield from paths.get_completions(Doc(text[len(name):].lstrip()), complete_event)
                    return
            if text.startswith("/"):
                yield from words.get_completions(document, complete_event)

    return SlashCompleter()


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
    from prompt_toolkit.output.defaults import create_output

    session: PromptSession[str] = PromptSession(
        history=FileHistory(str(history)) if history else InMemoryHistory(),
        completer=slash_completer(),
        # Enter adds a line while a """ block is open and sends once it is closed.
        multiline=Condition(lambda: block_is_open(session.default_buffer.text)),
        prompt_continuation=CONTINUATION,
        # With stdout redirected (`chat > answers.md`) the prompt still goes to the terminal.
        output=create_output(always_prefer_tty=True),
    )
    return lambda: session.prompt(PROMPT)


# -- text on a terminal ---------------------------------------------------------------------------------------------

# Control characters a model may emit would move the cursor or clear the screen: shown as U+FFFD instead.
_CONTROL = {c: "\ufffd" for c in (*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F, *range(0x80, 0xA0))}
_CONTROL[0x0D] = None  # \r: a model's \r\n is just a line end


def terminal_safe(text: str) -> str:
    return text.translate(_CONTROL)


def is_live(console: Console) -> bool:
    """Whether to draw live on this console: a real terminal (not FORCE_COLOR on a pipe), and not TERM=dumb."""
    isatty = getattr(console.file, "isatty", None)
    return bool(isatty and isatty()) and not console.is_dumb_terminal


_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")


class MarkdownBlocks:
    """Streamed Markdown text and how much of it is made of finished blocks (`stable`, an offset).

    A block is finished when a blank line outside a code fence is followed by a line that starts at the margin:
    nothing typed later can change how the text before it renders (an indented line could still continue a
    list item, so it does not count).
    """

    def __init__(self) -> None:
        self.text = ""
        self.stable = 0
        self._scanned = 0  # offset of the first line not yet looked at
        self._fence: str | None = None  # the open fence's marker
        self._blank = False

    def feed(self, piece: str) -> bool:
        """Adds text; returns whether `stable` moved."""
        self.text += piece
        moved = False
        while (end := self.text.find("\n", self._scanned)) != -1:
            start, line = self._scanned, self.text[self._scanned:end]
            self._scanned = end + 1
            if not line.strip():
                self._blank = True
                continue
            if self._blank and self._fence is None and not line[0].isspace():
                self.stable, moved = start, True
            self._blank = False
            fence = _FENCE.match(line)
            if fence and self._fence is None:
                self._fence = fence.group(1)
            elif (fence and self._fence and fence.group(1)[0] == self._fence[0]
                  and len(fence.group(1)) >= len(self._fence) and not fence.group(2).strip()):
                self._fence = None
        return moved


class _Lines:
    """Already rendered lines, printed as they are."""

    def __init__(self, lines: list[list[Segment]]):
        self.lines = lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for line in self.lines:
            yield from line
            yield Segment.line()


def _tail(lines: list[list[Segment]], console: Console) -> list[list[Segment]]:
    # Rich cannot redraw lines that scrolled off the screen: a live region keeps to the screen's height.
    return lines[-max(1, console.size.height - 2):]


class ThinkingBlock:
    """The reasoning of one turn on a terminal: a dim, labelled live block, collapsed to a summary line."""

    KEEP = 6000  # characters of reasoning kept for display (only the last screenful is ever drawn)

    def __init__(self, console: Console, show: bool):
        from rich.live import Live
        from rich.spinner import Spinner

        self.console, self.show = console, show
        self.text, self.pieces = "", 0
        self.started: float | None = None
        self._label = Spinner("dots", Text("thinking…", style="dim italic"), style="dim")
        self.live: Live = Live(self, console=console, refresh_per_second=10, redirect_stdout=False,
                               redirect_stderr=False)
        self.live.start(refresh=True)

    def add(self, text: str) -> None:
        self.started = self.started or time.perf_counter()
        self.pieces += 1
        self.text = (self.text + terminal_safe(text))[-self.KEEP:]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self._label
        if self.show and self.text.strip():
            lines = console.render_lines(Text(self.text.strip(), style="dim"), options, pad=False)
            yield _Lines(lines[-max(1, min(12, console.size.height - 4)):])

    def collapse(self, tokens: int | None = None) -> None:
        """Replaces the block by 'thought for N tokens, S s' (or by nothing when there was no reasoning).

        `tokens` is the engine's count when the turn is over; while the answer streams, the pieces received
        stand in for it (one per token, except where a multi-byte character or the closing tag was split).
        """
        if not self.live.is_started:
            return
        count = tokens if tokens is not None else self.pieces
        if not count:
            self.live.transient = True
        else:
            seconds = time.perf_counter() - (self.started or time.perf_counter())
            self.live.update(Text(thought_summary(count, seconds), style="dim"))
        self.live.stop()


class MarkdownStream:
    """A streamed Markdown text rendered in two parts: lines that are final, and the lines still changing.

    Re-rendering the whole answer for every frame would cost more the longer it gets, and rich cannot redraw
    what has scrolled off the screen. So the lines of finished blocks (`MarkdownBlocks.stable`) are handed out
    once, to be printed for good, and only the block being written is rendered again. That rendering starts at
    the previous finished chunk, so the spacing between blocks is what a rendering of the whole text has:
    the final lines and the pending ones, put together, are exactly that rendering.
    """

    def __init__(self, console: Console):
        self.console = console
        self.blocks = MarkdownBlocks()
        self._printed = 0  # offset up to which the text's lines have been handed out
        # (text, offset the pending rendering starts at, lines of that rendering already handed out): one tuple,
        # replaced whole, because rich draws the pending lines from its own thread.
        self.view = ("", 0, 0)

    def render(self, text: str, options: ConsoleOptions | None = None) -> list[list[Segment]]:
        from rich.markdown import Markdown

        return self.console.render_lines(Markdown(text), options or self.console.options, pad=False)

    def feed(self, piece: str) -> list[list[Segment]]:
        """Adds text; returns the lines that became final (usually none)."""
        moved = self.blocks.feed(piece)
        text, start, skip = self.blocks.text, self.view[1], self.view[2]
        if not moved:
            self.view = (text, start, skip)
            return []
        stable = self.blocks.stable
        final = self.render(text[start:stable])[skip:]
        self.view = (text, self._printed, len(self.render(text[self._printed:stable])))
        self._printed = stable
        return final

    def pending(self, options: ConsoleOptions | None = None) -> list[list[Segment]]:
        text, start, skip = self.view
        return self.render(text[start:], options)[skip:]


class MarkdownAnswer:
    """The answer on a terminal: final lines printed above a live region that shows the rest (see MarkdownStream)."""

    def __init__(self, console: Console):
        from rich.live import Live
        from rich.spinner import Spinner

        self.stream = MarkdownStream(console)
        self._final = False
        self.live: Live = Live(Spinner("dots", style="dim"), console=console, refresh_per_second=10,
                               redirect_stdout=False, redirect_stderr=False)
        self.live.start(refresh=True)

    def add(self, text: str) -> None:
        first = not self.stream.blocks.text
        # The view moves on before the final lines are printed, so no frame shows them twice.
        final = self.stream.feed(terminal_safe(text))
        if final:
            self.live.console.print(_Lines(final))
        if first:
            self.live.update(self, refresh=True)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = self.stream.pending(options)
        yield _Lines(lines if self._final else _tail(lines, console))

    def finish(self) -> None:
        """Draws the rest of the answer in full and leaves it on the screen."""
        if not self.stream.blocks.text.strip():
            self.live.transient = True
        self._final = True
        self.live.stop()


def thought_summary(tokens: int, seconds: float) -> str:
    return f"thought for {tokens} token{'s' if tokens != 1 else ''}, {seconds:.1f} s"


def turn_stats(r: Result) -> str:
    line = (f"{r.completion_tokens} tokens ({r.reasoning_tokens} thinking), {r.generation_tokens_per_second:.1f} "
            f"tok/s, prompt {r.prompt_tokens} ({r.cached_tokens} reused)")
    return line + (", cut at the token limit" if r.finish_reason == "length" else "")


class TurnView:
    """Shows one turn's events: live on terminals, as plain streamed text elsewhere (each stream on its own).

    On a terminal one live block runs at a time: the reasoning block until the answer starts, then the answer.
    A model may also think when thinking is off, or again after it started answering: each switch closes the
    block in progress and opens one of the other kind.
    """

    def __init__(self, out: Console, err: Console, *, thinking: bool, show_thinking: bool):
        self.out, self.err, self.show_thinking = out, err, show_thinking
        self._live_out, self._live_err = is_live(out), is_live(err)
        self.thinking: ThinkingBlock | None = None
        self.answer: MarkdownAnswer | None = None
        self._plain_reasoning = False  # reasoning was written to a stderr that is not a terminal, line unfinished
        self._thought_blocks = 0
        self._thinking_mode = thinking
        self._plain_text = False  # answer text written to a plain stdout since the last tool call
        if thinking:
            self._to_reasoning()
        else:
            self._to_answer()

    def _to_reasoning(self) -> None:
        if self.answer is not None:
            self.answer.finish()
            self.answer = None
        if self.thinking is None and self._live_err:
            self.thinking = ThinkingBlock(self.err, self.show_thinking)
            self._thought_blocks += 1

    def _to_answer(self) -> None:
        if self.thinking is not None:
            self.thinking.collapse()
            self.thinking = None
        if self._plain_reasoning:  # the answer starts on its own line
            self.err.print()
            self._plain_reasoning = False
        if self.answer is None and self._live_out:
            self.answer = MarkdownAnswer(self.out)

    def _end_blocks(self) -> None:
        """Closes the live block in progress (a tool call is shown between blocks)."""
        if self.thinking is not None:
            self.thinking.collapse()
            self.thinking = None
        if self.answer is not None:
            self.answer.finish()
            self.answer = None
        if self._plain_reasoning:
            self.err.print()
            self._plain_reasoning = False

    def tool_call(self, call: CallRecord) -> None:
        """The code the model wants to run: a highlighted panel on a terminal, plain text on stderr elsewhere."""
        self._end_blocks()
        name = call.name or "unknown tool"
        if self._live_out:
            from rich.panel import Panel
            from rich.syntax import Syntax

            code = Syntax(terminal_safe(call.code), "python", theme="ansi_dark", background_color="default",
                          word_wrap=True)
            self.out.print(Panel(code, title=escape(name), title_align="left", border_style="cyan"))
        else:
            if self._plain_text:  # the answer so far ends its line before the call is shown
                sys.stdout.write("\n")
                sys.stdout.flush()
                self._plain_text = False
            self.err.print(f"[tool call {name}]\n{call.code}", highlight=False, markup=False, soft_wrap=True)

    def tool_result(self, call: CallRecord) -> None:
        """What the call printed (as the tool returned it, truncated there), dim."""
        if self._live_out:
            from rich.panel import Panel

            body = Text(terminal_safe(call.output), style="dim")
            self.out.print(Panel(body, title="output", title_align="left", border_style="dim"))
        else:
            self.err.print(f"[tool output]\n{call.output}", style="dim", highlight=False, markup=False,
                           soft_wrap=True)
        if self._thinking_mode:  # the model goes on thinking
            self._to_reasoning()

    def feed(self, event: Event | LoopEvent) -> None:
        call = getattr(event, "call", None)  # a ToolLoop event's call record
        if event.kind == "tool_call" and call is not None:
            self.tool_call(call)
        elif event.kind == "tool_result" and call is not None:
            self.tool_result(call)
        elif event.kind == "reasoning":
            self._to_reasoning()
            if self.thinking is not None:
                self.thinking.add(event.text)
            elif self.show_thinking:
                self.err.print(event.text, style="dim", end="", highlight=False, markup=False)
                self._plain_reasoning = True
        elif event.kind == "content":
            self._to_answer()
            if self.answer is not None:
                self.answer.add(event.text)
            else:
                sys.stdout.write(event.text)
                sys.stdout.flush()
                self._plain_text = self._plain_text or bool(event.text)

    def close(self, result: Result | None, interrupted: bool) -> None:
        """Ends the live blocks, then says how the turn ended (on an error too, before its message)."""
        if self.thinking is not None:
            # The engine's count is exact; it is this block's alone when the turn had one reasoning block.
            exact = result is not None and self._thought_blocks == 1
            self.thinking.collapse(result.reasoning_tokens if exact else None)
        if self.answer is not None:
            self.answer.finish()
        if not self._live_out:  # plain output: every answer ends its line, as scripts expect
            sys.stdout.write("\n")
            sys.stdout.flush()
        if self._plain_reasoning:  # the reasoning never gave way to an answer: end its line
            self.err.print()
        if interrupted:
            self.err.print("[yellow]stopped[/]")
        if result is not None:
            self.err.print(turn_stats(result), style="dim", highlight=False, soft_wrap=True)


# -- tools ----------------------------------------------------------------------------------------------------------

def ask_to_run(err: Console, read: Callable[[], str] = input) -> Callable[[ToolCall], bool]:
    """The confirmation before each call: 'Run this code? [y/N]' on stderr, answered by the next input line.

    On a terminal that is the user typing; from a pipe it is the next line of the script. "y" or "yes" runs the
    call; anything else (the end of input too) declines it, and the loop tells the model so.
    """

    def confirm(call: ToolCall) -> bool:
        err.print("Run this code? [y/N] ", end="", highlight=False, markup=False)
        try:
            reply = read()
        except EOFError:
            err.print()
            return False
        if not sys.stdin.isatty():  # a piped answer is not echoed: show it, so the log reads as a dialogue
            err.print(reply, highlight=False, markup=False)
        return reply.strip().lower() in ("y", "yes")

    return confirm


def answer_result(answer: Answer) -> Result:
    """A tool turn's stats as one Result: the rounds' counts added up; the finish of the last round."""
    from cascade_local.engine import Result

    rounds = answer.rounds
    last = rounds[-1] if rounds else Result()
    return Result(content=answer.content, reasoning=answer.reasoning,
                  prompt_tokens=sum(r.prompt_tokens for r in rounds),
                  cached_tokens=sum(r.cached_tokens for r in rounds),
                  completion_tokens=sum(r.completion_tokens for r in rounds),
                  reasoning_tokens=sum(r.reasoning_tokens for r in rounds),
                  finish_reason=last.finish_reason if answer.finish_reason == "max_calls" else answer.finish_reason,
                  budget_closed=any(r.budget_closed for r in rounds),
                  prompt_seconds=sum(r.prompt_seconds for r in rounds),
                  generation_seconds=sum(r.generation_seconds for r in rounds))


def _exchange(call: CallRecord, part: dict[str, str]) -> list[dict[str, Any]]:
    """The messages one call adds to the history (as the loop writes them), rebuilt from the streamed text."""
    assistant: dict[str, Any] = {"role": "assistant", "content": part["content"].strip(),
                                 "reasoning_content": part["reasoning"].strip()}
    if call.name is not None:
        assistant["tool_calls"] = [{"type": "function", "function": {"name": call.name,
                                                                     "arguments": dict(call.arguments)}}]
    return [assistant, {"role": "tool", "content": call.output}]


# -- the session ----------------------------------------------------------------------------------------------------

@dataclass
class Totals:
    """Counts over the answers of a session that finished (an interrupted answer reports no result)."""

    answers: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generation_seconds: float = 0.0

    def add(self, r: Result) -> None:
        self.answers += 1
        self.completion_tokens += r.completion_tokens
        self.reasoning_tokens += r.reasoning_tokens
        self.prompt_tokens += r.prompt_tokens
        self.cached_tokens += r.cached_tokens
        self.generation_seconds += r.generation_seconds


def process_rss() -> tuple[int, str] | None:
    """(bytes, what) for this process: the resident set on Linux, else the peak that getrusage reports."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"), "resident"
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024), "peak resident"


def stats_text(last: Result | None, totals: Totals, plan: Plan | None) -> str:
    from cascade_local.placement import fmt_bytes

    rows = [f"last answer: {turn_stats(last)}" if last else "last answer: none finished yet"]
    rate = totals.completion_tokens / totals.generation_seconds if totals.generation_seconds else 0.0
    evaluated = totals.prompt_tokens - totals.cached_tokens
    rows.append(f"session: {totals.answers} answers, {totals.completion_tokens} tokens generated "
                f"({totals.reasoning_tokens} thinking) at {rate:.1f} tok/s, {evaluated} prompt tokens evaluated "
                f"({totals.cached_tokens} reused)")
    rss = process_rss()
    rows.append(f"memory: {fmt_bytes(rss[0])} {rss[1]} (this process)" if rss else "memory: unknown")
    if plan is not None:
        rows.append(f"placement: {plan.verdict}")
    return "\n".join(rows)


def _count(n: int) -> str:
    for unit, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def model_text(path: Path, metadata: dict[str, Any], n_ctx: int | None = None) -> str:
    from cascade_local.gguf_info import human_bytes, printable, read_gguf

    params = sum(t.n_elements for t in read_gguf(path).tensors)
    recipe = metadata.get("cascade_local.recipe")
    recipe = printable(recipe) if isinstance(recipe, str) else "not recorded (not converted by cascade-local)"

    def shown(key: str) -> str:
        value = metadata.get(key)
        return printable(value) if isinstance(value, str) else "unknown"

    rows = [f"file: {path} ({human_bytes(path.stat().st_size)})",
            f"name: {shown('general.name')}",
            f"architecture: {shown('general.architecture')}",
            f"parameters: {_count(params)}",
            f"recipe: {recipe}"]
    if n_ctx:
        rows.append(f"context: {n_ctx} tokens")
    return "\n".join(rows)


@dataclass
class Outcome:
    """What a command did: a message to show, a question to ask the model, or the end of the chat."""

    message: str | None = None
    ask: str | None = None
    exit: bool = False


@dataclass
class ChatSession:
    """A chat's state: the conversation, the next turn's settings, display choices and session totals.

    `sampling(thinking)` gives the sampling for a mode (the user's flags over the model's recommendation):
    switching thinking on or off switches to that mode's sampling.
    """

    conversation: Conversation
    settings: TurnSettings
    sampling: Callable[[bool], SamplingParams]
    show_thinking: bool = True
    plan: Plan | None = None
    out: Console = field(default_factory=Console)
    err: Console = field(default_factory=lambda: Console(stderr=True))
    totals: Totals = field(default_factory=Totals)
    # Tools: `tools` are the tool objects (None until tools are first switched on), `tools_on` whether the next
    # turns use them, `yes` runs every call without asking, else `confirm(call)` is asked before each one.
    tools: list[Tool] | None = None
    tools_on: bool = False
    yes: bool = False
    confirm: Callable[[ToolCall], bool] | None = None

    def enable_tools(self, names: str = "python") -> None:
        """Makes the tools (the kernel starts at the first call); the next turns use them."""
        from cascade_local.tools import make_tools

        if not hasattr(self.conversation, "engine") or not hasattr(getattr(self.conversation, "model", None),
                                                                   "template"):
            raise SlashError("tools need the local engine and its chat template (not --endpoint)")
        if self.tools is None:
            self.tools = make_tools(names)
        self.tools_on = True

    def close_tools(self) -> None:
        """Shuts the Python kernel down (a later call starts a fresh one)."""
        for tool in self.tools or []:
            tool.close()

    def close(self) -> None:
        """The end of the chat: no kernel outlives it."""
        self.close_tools()

    def execute(self, command: Command) -> Outcome:
        """Runs a slash command. Domain errors (a bad file for /load...) propagate, for the loop to show."""
        from cascade_local import transcript

        name, value, settings, chat = command.name, command.value, self.settings, self.conversation
        if name == "/exit":
            return Outcome(exit=True)
        if name == "/help":
            return Outcome(help_text())
        if name == "/think":
            settings.thinking, settings.sampling = value, self.sampling(value)
            return Outcome(f"thinking {'on' if value else 'off'}")
        if name == "/thinking":
            self.show_thinking = value
            return Outcome("reasoning shown" if value else "reasoning hidden (only its summary is shown)")
        if name == "/tools":
            if value:
                self.enable_tools()
                names = ", ".join(t.schema["function"]["name"] for t in self.tools or [])
                how = "every call runs without asking" if self.yes else "you confirm each call"
                return Outcome(f"tools on: {names} ({how})")
            self.tools_on = False
            self.close_tools()
            return Outcome("tools off (the Python kernel was shut down)")
        if name == "/budget":
            settings.thinking_budget = value
            return Outcome(f"thinking budget {value if value else 'off'}")
        if name == "/system":
            chat.system = value
            return Outcome("system prompt set" if value else "system prompt removed")
        if name == "/clear":
            chat.clear()
            self.close_tools()
            return Outcome("conversation cleared")
        if name == "/retry":
            previous = self._retry_tool_turn() if any(m.get("role") == "tool" for m in chat.messages[-3:]) else None
            previous = previous if previous is not None else chat.retry_last()
            return Outcome(ask=previous) if previous is not None else Outcome("nothing to retry yet")
        if name == "/save":
            path = transcript.save(chat, settings, value, force=command.force)
            return Outcome(f"saved {len(chat.messages)} messages to {path}")
        if name == "/load":
            transcript.load(chat, settings, value)
            chat.last = None
            return Outcome(f"loaded {len(chat.messages)} messages from {value} · thinking "
                           f"{'on' if settings.thinking else 'off'}")
        if name == "/stats":
            return Outcome(stats_text(chat.last, self.totals, self.plan))
        if name == "/model":
            model = chat.model
            return Outcome(model_text(model.path, model.metadata, getattr(chat.engine, "n_ctx", None)))
        raise SlashError(f"{name} is not implemented")  # COMMANDS and this method disagree

    def _retry_tool_turn(self) -> str | None:
        """Drops a last exchange that had tool calls (the question and everything after it); returns the question."""
        messages = self.conversation.messages
        for i in range(len(messages) - 1, -1, -1):
            if messages[i].get("role") == "user":
                text = messages[i]["content"]
                del messages[i:]
                return text
        return None

    def turn(self, text: str) -> Result | None:
        """Asks the model; shows the answer as it streams. Ctrl-C stops it, and what was said stays."""
        if self.tools_on and self.tools:
            return self._tool_turn(text)
        view = TurnView(self.out, self.err, thinking=self.settings.thinking, show_thinking=self.show_thinking)
        result, interrupted = None, False
        try:
            events = self.conversation.reply(text, self.settings)
            with closing(events):  # closed at once, so the partial answer joins the history before we go on
                for event in events:
                    view.feed(event)
            result = self.conversation.last
        except KeyboardInterrupt:
            interrupted = True
        finally:
            view.close(result, interrupted)
        if result is not None:
            self.totals.add(result)
        return result

    def _tool_turn(self, text: str) -> Result | None:
        """A turn through the ToolLoop: calls shown as they run; the calls and the answer join the history."""
        from cascade_local.tools import ToolLoop

        chat, settings = self.conversation, self.settings
        chat.messages.append({"role": "user", "content": text})
        history = ([{"role": "system", "content": chat.system}] if chat.system else []) + list(chat.messages)
        loop = ToolLoop(chat.engine, list(self.tools or []), thinking=settings.thinking, sampling=settings.sampling,
                        max_tokens=settings.max_tokens, budget=settings.thinking_budget,
                        confirm=self.confirm or ask_to_run(self.err), yes=self.yes)
        view = TurnView(self.out, self.err, thinking=settings.thinking, show_thinking=self.show_thinking)
        answer: Answer | None = None
        result, interrupted = None, False
        exchanges: list[dict[str, Any]] = []  # the calls so far, for an interrupted turn
        part = {"reasoning": "", "content": ""}  # the text of the round in progress
        try:
            events = loop.stream(history)
            with closing(events):
                for event in events:
                    if event.kind == "done":
                        answer = event.answer
                        break
                    if event.kind in part:
                        part[event.kind] += event.text
                    elif event.kind == "tool_result" and event.call is not None:
                        exchanges += _exchange(event.call, part)
                        part = {"reasoning": "", "content": ""}
                    view.feed(event)
            if answer is not None:
                exchanges = answer.messages[len(history):]
                result = answer_result(answer)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            view.close(result, interrupted)
            if answer is not None or interrupted:
                final = {"role": "assistant", "content": part["content"].strip(),
                         "reasoning_content": part["reasoning"].strip()}
                chat.messages.extend([*exchanges, final])
            chat.last = result
        if result is not None:
            self.totals.add(result)
        return result

    def drop_failed(self, text: str) -> None:
        """Removes the exchange of a turn that failed (its question, and any empty answer) from the history."""
        messages, asked = self.conversation.messages, {"role": "user", "content": text}
        if len(messages) >= 2 and messages[-1]["role"] == "assistant" and messages[-2] == asked:
            del messages[-2:]
        elif messages and messages[-1] == asked:
            messages.pop()

    def banner(self) -> str:
        name = Path(self.conversation.model.path).name
        tools = f"tools {'on, every call runs' if self.yes else 'on, each call asks'} · " if self.tools_on else ""
        return (f"[bold]{escape(name)}[/] · thinking {'on' if self.settings.thinking else 'off'} · {tools}"
                f"/help lists commands · {BLOCK} for multi-line · Ctrl-C stops an answer, Ctrl-D leaves")


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
