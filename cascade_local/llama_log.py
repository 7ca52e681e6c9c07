"""llama.cpp logs to stderr on its own. Route its log through one callback, installed once.

Redirecting file descriptors instead breaks where sys.stdout has no fileno (test runners, notebooks).
Messages are kept in a small ring so errors can quote what llama.cpp said (e.g. why a load failed).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections import deque
from functools import cache

RECENT: deque[str] = deque(maxlen=400)
_partial: list[str] = []
_callback = None  # keep a reference: a collected ctypes callback crashes the process


def _echo() -> bool:
    return os.environ.get("CASCADE_LOCAL_LLAMA_LOG", "") not in ("", "0")


@cache
def quiet_llama() -> None:
    """Install the log callback; llama.cpp's messages go to RECENT (and stderr if CASCADE_LOCAL_LLAMA_LOG=1)."""
    global _callback
    import llama_cpp

    @llama_cpp.llama_log_callback
    def on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        piece = text.decode("utf-8", errors="replace") if text else ""
        _partial.append(piece)
        if piece.endswith("\n"):
            line = "".join(_partial).rstrip("\n")
            _partial.clear()
            RECENT.append(line)
            if _echo():
                print(line, file=sys.stderr)

    _callback = on_log
    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))


def recent_lines(contains: str | None = None) -> list[str]:
    return [line for line in RECENT if contains is None or contains in line]
