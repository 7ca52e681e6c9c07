"""Linux system calls Python's os module lacks, through ctypes (which lets go of the GIL during each call)."""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Any


@functools.cache
def linux_libc_function(name: str, *argtypes: Any) -> Any:
    """libc's `name` returning int, or None off Linux or where this libc lacks it (the callers only advise)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn
