"""How --help reads: one spelling for arguments, no type shown on flags, paragraphs that wrap to the terminal.

Typer 0.2x writes required arguments as `{src}` and optional ones as `[MODEL]` in usage lines, shows `<bool>` on
every flag (--help included), and keeps a docstring's line breaks, so a paragraph wrapped at 120 columns in the
source breaks mid-sentence on a terminal of another width. Typer has no setting for any of these: the two
display methods are replaced here (once, at start-up), and docstrings are unwrapped before Typer reads them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


def unwrap(doc: str | None) -> str | None:
    """The docstring with each paragraph on one line (paragraphs are separated by blank lines)."""
    if not doc:
        return doc
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines() if line.strip()) for p in paragraphs)


def unwrap_commands(target: Callable[..., Any] | Any) -> None:
    """Unwraps the docstring of a command function, or of every command and callback of a Typer sub-app."""
    import typer

    if isinstance(target, typer.Typer):
        for info in target.registered_commands:
            if info.callback is not None:
                info.callback.__doc__ = unwrap(info.callback.__doc__)
        callback = target.registered_callback.callback if target.registered_callback else None
        if callback is not None:
            callback.__doc__ = unwrap(callback.__doc__)
    else:
        target.__doc__ = unwrap(target.__doc__)


def apply() -> None:
    """Usage lines: required arguments as NAME, optional ones as [NAME]; flags show no type."""
    from typer.core import TyperArgument, TyperOption

    if getattr(TyperOption, "_cascade_local_style", False):
        return
    shown_type = TyperOption.display_type_rich

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag else shown_type(self, ctx)

    def usage_name(self: TyperArgument) -> str:
        name = self.display_name_raw.upper()
        name = name if self.required else f"[{name}]"
        return name + ("..." if self.nargs != 1 else "")

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]
    if hasattr(TyperArgument, "_usage_display_name"):
        TyperArgument._usage_display_name = usage_name  # type: ignore[method-assign]
    TyperOption._cascade_local_style = True  # type: ignore[attr-defined]
