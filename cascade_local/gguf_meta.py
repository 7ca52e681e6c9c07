"""Reads a GGUF file's metadata (not its weights) without llama.cpp."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cascade_local.errors import ModelLoadError


def read_metadata(path: Path) -> dict[str, Any]:
    """Every key-value pair, decoded (strings as str, arrays as lists)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    except (ValueError, OSError, IndexError, KeyError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is not a readable GGUF file: {exc}") from None
