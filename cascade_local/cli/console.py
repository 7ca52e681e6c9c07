"""Consoles: decoration and progress go to stderr; stdout carries only the payload."""

from __future__ import annotations

from rich.console import Console

# Rich drops colour and animation by itself when the stream is not a terminal (and honours NO_COLOR).
err_console = Console(stderr=True)
out_console = Console()
