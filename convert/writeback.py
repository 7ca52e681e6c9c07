"""Starts writing a growing output file to disk while it is still being written, not all at the final fsync.

Linux keeps written pages dirty in memory until a tenth or so of RAM is dirty, and only then writes them back.
A converter that writes a few GB and fsyncs at the end therefore leaves the disk idle for writes while it reads,
then waits seconds at the end for gigabytes to go out with nothing left to overlap them. Every WINDOW bytes,
this asks the kernel to start writing the last window back (sync_file_range, which does not wait), and lets go
of the window before it (fadvise DONTNEED, by then written): the final fsync finds little left, and an 18 GB
output does not push the rest of the page cache out. Both calls only advise: where they are missing or refuse,
nothing changes but the timing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

from .linux_calls import linux_libc_function

WINDOW = 64 << 20
SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback of the range's dirty pages, without waiting


class Writeback:
    """Call `written(fd, end)` after appending, with the file's new length; it acts once per WINDOW bytes."""

    def __init__(self, window: int = WINDOW):
        self.window = window
        self._started = 0  # writeback asked for everything before this offset
        self._dropped = 0  # and the page cache let go of everything before this one
        self._sync = linux_libc_function("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                         ctypes.c_uint)

    def written(self, fd: int, end: int) -> None:
        if end - self._started < self.window:
            return
        if self._sync is not None:
            self._sync(fd, self._started, end - self._started, SYNC_FILE_RANGE_WRITE)
        if hasattr(os, "posix_fadvise") and self._started > self._dropped:
            # The previous window's writeback was started a window ago: dropping it now rarely has to wait.
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, self._dropped, self._started - self._dropped, os.POSIX_FADV_DONTNEED)
            self._dropped = self._started
        self._started = end
