"""Where a Ctrl-C may interrupt the chat: at the prompt and while an answer streams, nowhere else.

A Ctrl-C meant to stop an answer often arrives just after the answer ended, while the live display is being
closed or the finished message is being written to the log. An exception raised there would leave a live
display running or a write half done, so outside the armed sections a press is counted and dropped.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class Interrupts:
    """Turns SIGINT into KeyboardInterrupt only inside `armed()`; `dropped` counts the presses ignored elsewhere."""

    def __init__(self) -> None:
        self._armed = False
        self.dropped = 0

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self._armed:
            raise KeyboardInterrupt
        self.dropped += 1

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Handles SIGINT for the duration (Python allows that on the main thread only; elsewhere: no change)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    @contextmanager
    def armed(self) -> Iterator[None]:
        """Inside: a Ctrl-C raises KeyboardInterrupt, as Python's default handler does."""
        previous, self._armed = self._armed, True
        try:
            yield
        finally:
            self._armed = previous
