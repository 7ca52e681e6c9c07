"""The chat's automatic history: each complete message written to the history database as the chat goes on.

A history that cannot be written (a damaged or read-only database, a full disk) never stops the chat: one line of
warning on stderr, and the chat goes on without logging.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any

from rich.console import Console

from cascade_local.history import ConversationLog, HistoryError, connect, logging_enabled

if TYPE_CHECKING:
    from cascade_local.conversation import TurnSettings
    from cascade_local.engine import Result


class ChatRecorder:
    """Mirrors a chat's messages into a ConversationLog; after the first failure it warns once and stops."""

    def __init__(self, log: ConversationLog, err: Console):
        self.log: ConversationLog | None = log
        self.err = err

    @property
    def conversation_id(self) -> int | None:
        return self.log.id if self.log is not None else None

    def record(self, messages: list[dict[str, Any]], system: str | None, settings: TurnSettings,
               result: Result | None = None) -> None:
        if self.log is None:
            return
        try:
            self.log.sync(messages, system=system, settings=settings, result=result)
        except (sqlite3.Error, HistoryError) as exc:
            warn_no_history(self.err, str(exc))
            self.log = None

    def restart(self) -> None:
        """The next message starts a new logged conversation (/clear, /load): the old one stays as it was."""
        if self.log is not None:
            self.log.restart()


def warn_no_history(err: Console, reason: str) -> None:
    err.print(f"warning: the chat is not being logged: {reason}", style="yellow", highlight=False, markup=False,
              soft_wrap=True)


def open_recorder(err: Console, model: str | None) -> ChatRecorder | None:
    """The recorder of a new chat, or None (after one line of warning) when the history cannot be used.

    None without a warning when the user turned logging off (`[settings] log = false` in models.toml).
    """
    try:
        if not logging_enabled():
            return None
        db = connect()
    except HistoryError as exc:
        warn_no_history(err, str(exc))
        return None
    return ChatRecorder(ConversationLog(db, model=model), err)
