"""The answer on a terminal: Markdown rendered while it streams, finished blocks printed once."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from rich.console import Console, ConsoleOptions, RenderResult
from rich.segment import Segment
from rich.spinner import Spinner
from rich.text import Text

if TYPE_CHECKING:
    from rich.live import Live



# Control characters a model may emit would move the cursor or clear the screen: shown as U+FFFD instead.
_CONTROL: dict[int, str | None] = {c: "\ufffd" for c in (*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F,
                                                         *range(0x80, 0xA0))}
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


class Lines:
    """Already rendered lines, printed as they are."""

    def __init__(self, lines: list[list[Segment]]):
        self.lines = lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for line in self.lines:
            yield from line
            yield Segment.line()


def screen_tail(lines: list[list[Segment]], console: Console) -> list[list[Segment]]:
    # Rich cannot redraw lines that scrolled off the screen: a live region keeps to the screen's height.
    return lines[-max(1, console.size.height - 2):]



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
        # (text, offset the pending rendering starts at, offset up to which its lines were handed out): one tuple,
        # replaced whole, because rich draws the pending lines from its own thread.
        self.view = ("", 0, 0)
        self._skips: dict[tuple[str, int], int] = {}  # lines already handed out, by (text, width)

    def render(self, text: str, options: ConsoleOptions | None = None) -> list[list[Segment]]:
        from rich.markdown import Markdown

        return self.console.render_lines(Markdown(text), options or self.console.options, pad=False)

    def _skip(self, text: str, options: ConsoleOptions | None) -> int:
        # How many lines of the rendering are already out, counted at the width drawn now: after a resize the
        # same text takes another number of lines, and a count kept from before would repeat or drop some.
        key, skips = (text, (options or self.console.options).max_width), self._skips
        if key not in skips:  # (both threads use it: replaced whole, never changed in place)
            skips = self._skips = {key: len(self.render(text, options))}  # the last count is all that is reused
        return skips[key]

    def feed(self, piece: str) -> list[list[Segment]]:
        """Adds text; returns the lines that became final (usually none)."""
        moved = self.blocks.feed(piece)
        text, start, printed = self.blocks.text, self.view[1], self.view[2]
        if not moved:
            self.view = (text, start, printed)
            return []
        stable = self.blocks.stable
        final = self.render(text[start:stable])[self._skip(text[start:printed], None):]
        self.view = (text, self._printed, stable)
        self._printed = stable
        return final

    def pending(self, options: ConsoleOptions | None = None) -> list[list[Segment]]:
        text, start, printed = self.view
        return self.render(text[start:], options)[self._skip(text[start:printed], options):]


class MarkdownAnswer:
    """The answer on a terminal: final lines printed above a live region that shows the rest (see MarkdownStream)."""

    def __init__(self, console: Console):
        from cascade_local.cli.chat.live_region import fitted_live

        self.stream = MarkdownStream(console)
        self._final = False
        self.version = 0  # changes with the text: the live region redraws only then (or on a resize)
        self.live: Live = fitted_live(console, Spinner("dots", style="dim"))
        self.live.start(refresh=True)

    def reading(self, line: str | None) -> None:
        """Before the answer's first text: how far the prompt has been read, beside the spinner (None: done)."""
        if not self.stream.blocks.text:
            self.live.update(Spinner("dots", Text(line or "", style="dim"), style="dim"), refresh=True)

    def add(self, text: str) -> None:
        first = not self.stream.blocks.text
        self.version += 1
        # The view moves on before the final lines are printed, so no frame shows them twice.
        final = self.stream.feed(terminal_safe(text))
        if final:
            from cascade_local.cli.chat.live_region import fit_line

            # Without their trailing padding: a line the terminal finds wider than rich does wraps less often.
            self.live.console.print(Lines([fit_line(line, 10**9)[0] for line in final]))
        if first:
            self.live.update(self, refresh=True)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = self.stream.pending(options)
        yield Lines(lines if self._final else screen_tail(lines, console))

    def finish(self) -> None:
        """Draws the rest of the answer in full and leaves it on the screen."""
        if not self.stream.blocks.text.strip():
            self.live.transient = True
        self._final = True
        self.live.stop()
