"""The reasoning on a terminal: a dim live block that collapses to one summary line."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rich.console import Console, ConsoleOptions, RenderResult
from rich.text import Text

from cascade_local.cli.chat.markdown import Lines, terminal_safe

if TYPE_CHECKING:
    from rich.live import Live



class ThinkingBlock:
    """The reasoning of one turn on a terminal: a dim, labelled live block, collapsed to a summary line."""

    KEEP = 6000  # characters of reasoning kept for display (only the last screenful is ever drawn)

    def __init__(self, console: Console, show: bool):
        from rich.spinner import Spinner

        from cascade_local.cli.chat.live_region import fitted_live

        self.console, self.show = console, show
        self.text, self.pieces = "", 0
        self.started: float | None = None
        self._label = Spinner("dots", Text("thinking…", style="dim italic"), style="dim")
        self.live: Live = fitted_live(console, self)
        self.live.start(refresh=True)

    def reading(self, line: str | None) -> None:
        """Shows how far the prompt has been read in place of 'thinking…' (None: reading is over)."""
        self._label.update(text=Text(line or "thinking…", style="dim italic"))
        self.live.refresh()

    def add(self, text: str) -> None:
        self.started = self.started or time.perf_counter()
        self.pieces += 1
        self.text = (self.text + terminal_safe(text))[-self.KEEP:]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self._label
        if self.show and self.text.strip():
            lines = console.render_lines(Text(self.text.strip(), style="dim"), options, pad=False)
            yield Lines(lines[-max(1, min(12, console.size.height - 4)):])

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



def thought_summary(tokens: int, seconds: float) -> str:
    return f"thought for {tokens} token{'s' if tokens != 1 else ''}, {seconds:.1f} s"
