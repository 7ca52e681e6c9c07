"""Ctrl-C around native calls that call back into Python.

llama.cpp runs Python inside its own functions (the log callback, a load's progress callback). A
KeyboardInterrupt raised in a ctypes callback cannot cross the C frames: ctypes prints "Exception
ignored" and the native call goes on. Inside `deferred_interrupt()`, SIGINT only sets a flag, which
callbacks read to ask llama.cpp to stop; the interrupt is raised in Python when the block ends.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class InterruptFlag:
    """Set when SIGINT arrived inside the block. Reading it is all a callback may do: it never raises."""

    requested: bool = False


@contextmanager
def deferred_interrupt(flag: InterruptFlag | None = None) -> Iterator[InterruptFlag]:
    """Holds SIGINT back for the duration of the block, then hands it to the previous handler.

    With Python's default handler that is a KeyboardInterrupt where the block ends. Outside the main
    thread (which alone receives signals), or where SIGINT is ignored, nothing changes. `flag` lets a
    callback made before the block read the same flag.
    """
    flag = flag or InterruptFlag()
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous in (signal.SIG_IGN, None):
        yield flag
        return

    def hold(signum: int, frame: FrameType | None) -> None:
        flag.requested = True

    signal.signal(signal.SIGINT, hold)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
        if flag.requested:
            signal.raise_signal(signal.SIGINT)  # now handled as usual, in Python, outside any callback
