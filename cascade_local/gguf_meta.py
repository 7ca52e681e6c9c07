"""Reads a GGUF file's metadata (not its weights) without llama.cpp."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cascade_local.gguf_info import read_gguf


def read_metadata(path: Path) -> dict[str, Any]:
    """Every key-value pair, decoded in full (strings as str, arrays as lists).

    The file is checked as untrusted input first (see `gguf_info`): a damaged or hostile header raises
    ModelLoadError instead of reaching llama.cpp.
    """
    return read_gguf(path).metadata
