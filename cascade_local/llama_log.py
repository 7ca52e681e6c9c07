"""llama.cpp logs to stderr on its own. Route its log through one callback, installed once.

Redirecting file descriptors instead breaks where sys.stdout has no fileno (test runners, notebooks).
Messages are kept in a small ring so errors can quote what llama.cpp said (e.g. why a load failed).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections import deque

RECENT: deque[str] = deque(maxlen=400)
_partial: list[str] = []
_callback = None  # keep a reference: a collected ctypes callback crashes the process
# Held while the callback is installed. functools.cache is no lock: the converter's encoder threads used to call
# this together on first use, each made its own callback, and llama.cpp could be left holding one that Python
# had already collected; the next log line then jumped into freed memory.
_install_lock = threading.Lock()


def _echo() -> bool:
    return os.environ.get("CASCADE_LOCAL_LLAMA_LOG", "") not in ("", "0")


def quiet_llama() -> None:
    """Install the log callback, once per process, from any thread; llama.cpp's messages go to RECENT
    (and stderr if CASCADE_LOCAL_LLAMA_LOG=1)."""
    global _callback
    with _install_lock:
        if _callback is None:
            _callback = _install()


def _install() -> object:
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

    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    return on_log


def recent_lines(contains: str | None = None) -> list[str]:
    return [line for line in RECENT if contains is None or contains in line]
