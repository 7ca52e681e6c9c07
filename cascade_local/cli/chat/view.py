"""One turn on screen: live blocks on a terminal, plain streamed text elsewhere."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from cascade_local.cli.chat.markdown import MarkdownAnswer, is_live, terminal_safe
from cascade_local.cli.chat.stats import turn_stats
from cascade_local.cli.chat.thinking import ThinkingBlock
from cascade_local.reading import LONG_PROMPT, ReadingRate

if TYPE_CHECKING:

    from cascade_local.engine import Event, Result
    from cascade_local.tools import CallRecord, LoopEvent


class TurnView:
    """Shows one turn's events: live on terminals, as plain streamed text elsewhere (each stream on its own).

    On a terminal one live block runs at a time: the reasoning block until the answer starts, then the answer.
    A model may also think when thinking is off, or again after it started answering: each switch closes the
    block in progress and opens one of the other kind.
    """

    def __init__(self, out: Console, err: Console, *, thinking: bool, show_thinking: bool,
                 context: int | None = None):
        self.out, self.err, self.show_thinking = out, err, show_thinking
        self.context = context  # tokens in the context, for the stats line (None: unknown, a server's)
        self._live_out, self._live_err = is_live(out), is_live(err)
        self.thinking: ThinkingBlock | None = None
        self.answer: MarkdownAnswer | None = None
        self._plain_reasoning = False  # reasoning was written to a stderr that is not a terminal, line unfinished
        self._thought_blocks = 0
        self._thinking_mode = thinking
        self._plain_text = False  # answer text written to a plain stdout since the last tool call
        self._reading = ReadingRate()
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

    def _to_answer(self, reasoning_tokens: int | None = None) -> None:
        if self.thinking is not None:
            # The engine's count, when the event carries it: the same number as the stats line's "(N thinking)".
            self.thinking.collapse(reasoning_tokens)
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

    def reading(self, done: int, total: int) -> None:
        """The engine's progress through a long prompt (a document from /read), shown in the live block."""
        if total < LONG_PROMPT:
            return
        line = self._reading.line(done, total) if done < total else None
        block = self.thinking or self.answer
        if block is not None:
            block.reading(line)

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
            self._to_answer(getattr(event, "reasoning_tokens", None))
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
            self.thinking.collapse(result.reasoning_tokens if result is not None and exact else None)
        if self.answer is not None:
            self.answer.finish()
        if not self._live_out:  # plain output: every answer ends its line, as scripts expect
            sys.stdout.write("\n")
            sys.stdout.flush()
        if self._plain_reasoning:  # the reasoning never gave way to an answer: end its line
            self.err.print()
        if interrupted and result is None:  # else the stats line below says "stopped"
            self.err.print("[yellow]stopped[/]")
        if result is not None:
            self.err.print(turn_stats(result, self.context), style="dim", highlight=False, soft_wrap=True)
