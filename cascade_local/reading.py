"""How far the reading of a long prompt has got: the line `run` and `chat` show while the engine reads it."""

from __future__ import annotations

import time
from collections.abc import Callable

LONG_PROMPT = 2048  # tokens: a prompt this long shows its reading progress


class ReadingRate:
    """Turns the engine's (tokens done, total) reports into 'reading the prompt: …' with tokens/s and time left.

    The rate counts from the first report: tokens restored from a prompt cache before it were not read, and
    counting them would promise a time left far too short.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._first: tuple[int, float] | None = None

    def line(self, done: int, total: int) -> str:
        now = self._clock()
        if self._first is None:
            self._first = (done, now)
        text = f"reading the prompt: {done:,}/{total:,} tokens"
        read, seconds = done - self._first[0], now - self._first[1]
        if read > 0 and seconds > 0:
            text += f", {read / seconds:,.0f} tokens/s, {(total - done) * seconds / read:,.0f} s left"
        return text
