"""A live region that never leaves stale copies behind, whatever the terminal thinks a character's width is.

rich redraws a live region by moving the cursor up as many rows as it drew lines. A line the terminal finds wider
than rich does (Devanagari spacing marks, emoji with a skin tone: rich and the terminal disagree) wraps onto
an extra row, the cursor goes up too few rows, and every frame leaves a copy behind. A resize that reflows the
region does the same. So the region is drawn with the terminal's auto-wrap off (DECAWM), which makes one line one
row whatever the widths; trailing padding is trimmed and a line too wide by the terminal's count is cut; and
after a resize the rows a line now takes are counted with the terminal's width function.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache
from math import ceil
from typing import TYPE_CHECKING

from rich.live_render import LiveRender
from rich.segment import ControlType, Segment

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
    from rich.control import Control
    from rich.live import Live

ZWJ = "\u200d"


@lru_cache(maxsize=4096)
def char_cells(ch: str) -> int:
    """Cells one code point takes in a terminal that measures as glibc's wcwidth does (xterm, VTE, tmux)."""
    if ch < " " or "\x7f" <= ch < "\xa0":
        return 0
    category = unicodedata.category(ch)
    if category in ("Mn", "Me", "Cf") or "\u1160" <= ch <= "\u11ff":  # marks, format characters, Hangul vowels
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def cells(text: str) -> int:
    """The terminal's width of `text`: code point by code point, a character after a ZWJ drawn in the same cell.

    Terminals differ: those that cluster graphemes (kitty, WezTerm) count "👍🏽" as 2 where this counts 4. This is
    the count of the glibc-based ones, tmux among them; rich's own count is lower still for Devanagari.
    """
    total, joined = 0, False
    for ch in text:
        if joined:
            joined = False
            continue
        if ch == ZWJ:
            joined = True
            continue
        total += char_cells(ch)
    return total


def _escape(code: str) -> Segment:
    # An escape sequence rich has no name for, marked as control so that it takes no cells.
    return Segment(code, None, [(ControlType.BELL,)])


WRAP_OFF, WRAP_ON = _escape("\x1b[?7l"), _escape("\x1b[?7h")


def fit_line(line: list[Segment], width: int) -> tuple[list[Segment], int]:
    """The line without trailing blanks, cut to `width` cells by the terminal's count; and its width."""
    line = list(line)
    while line and not line[-1].control and not line[-1].text.rstrip(" "):
        line.pop()
    if line and not line[-1].control:
        last = line[-1]
        line[-1] = Segment(last.text.rstrip(" "), last.style)
    out: list[Segment] = []
    used = 0
    for segment in line:
        if segment.control:
            out.append(segment)
            continue
        kept: list[str] = []
        joined = False
        for ch in segment.text:
            size = 0 if joined else char_cells(ch)
            joined = ch == ZWJ
            if used + size > width:
                out.append(Segment("".join(kept), segment.style))
                return out, used
            kept.append(ch)
            used += size
        out.append(Segment("".join(kept), segment.style))
    return out, used


class FittedLiveRender(LiveRender):
    """rich's LiveRender, drawn without auto-wrap, that counts the rows its last frame takes now."""

    def __init__(self, renderable: RenderableType, console: Console):
        super().__init__(renderable)
        self.console = console
        self._widths: list[int] = []  # cells of each line of the last frame, as the terminal drew them

    def rows(self) -> int:
        """Rows the last frame takes now: one per line, more where a resize reflowed a line onto several."""
        width = max(1, self.console.size.width)
        return sum(max(1, ceil(cells / width)) for cells in self._widths)

    def position_cursor(self) -> Control:
        if not self._widths:
            return _control("")
        up = self.rows() - 1  # from the last line of the frame to its first, then erase to the screen's end
        return _control("\r" + (f"\x1b[{up}A" if up else "") + "\x1b[J")  # (a count of 0 would still move)

    def restore_cursor(self) -> Control:
        if not self._widths:
            return _control("")
        return _control(f"\r\x1b[{self.rows()}A\x1b[J")

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        # rich's Live.stop sets "visible" for the last frame, which stays on the screen: drawn with auto-wrap on,
        # in full, as printed text is.
        final = self.vertical_overflow == "visible"
        lines = console.render_lines(self.renderable, options, pad=False)
        if not final:
            lines = lines[:max(1, options.size.height)]
        width = options.max_width
        fitted = [fit_line(line, width if not final else 10**9) for line in lines]
        self._widths = [w for _, w in fitted]

        self._shape = (width, len(fitted))
        if not final:
            yield WRAP_OFF
        for index, (line, _) in enumerate(fitted):
            if index:
                yield Segment.line()
            yield from line
        if not final:
            yield WRAP_ON


def _control(code: str) -> Control:
    from rich.control import Control

    control = Control()
    control.segment = _escape(code)
    return control


def fitted_live(console: Console, renderable: RenderableType) -> Live:
    """A rich Live (10 frames a second) whose region is drawn by FittedLiveRender.

    A frame is drawn only when something changed: the renderable's `version` (where it has one), the terminal's
    size (so a resize is redrawn within a tenth of a second), or the last frame. Every frame written races with
    a resize (the terminal may reflow before it reads the frame), so a quiet region is left alone.
    """
    from rich.live import Live

    class FittedLive(Live):
        _drawn: object = None

        def refresh(self) -> None:
            version = getattr(self.renderable, "version", None)
            key = (version, self.console.size, self.vertical_overflow)
            if version is not None and key == self._drawn:
                return
            self._drawn = key
            super().refresh()

    live = FittedLive(renderable, console=console, refresh_per_second=10, redirect_stdout=False,
                      redirect_stderr=False)
    live._live_render = FittedLiveRender(live.get_renderable(), console)  # the one private attribute used
    return live
