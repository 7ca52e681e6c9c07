"""Every chat kept automatically: conversations and their messages in SQLite, under the user's folder.

One file, `$CASCADE_LOCAL_HOME/history.db`, in WAL mode so that two chats (and a `logs` reader) can use it at once.
Each message is written in its own transaction as soon as it is complete, so a chat killed mid-answer loses at most
the partial answer. The schema is versioned (`PRAGMA user_version`) and upgraded step by step by `MIGRATIONS`; a
database written by a newer cascade-local is refused and never altered. Full-text search uses FTS5.

`ConversationLog` mirrors one chat's message list into the database; `HistoryStore` reads and deletes for
`cascade-local logs` and for `chat --continue/--resume`.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cascade_local.errors import CascadeError
from cascade_local.paths import home

if TYPE_CHECKING:
    from cascade_local.conversation import TurnSettings
    from cascade_local.engine import Result

FILE_NAME = "history.db"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 5000  # a second chat writing at the same moment waits, it does not fail


class HistoryError(CascadeError):
    """The history database cannot be used (damaged, read-only, from a newer version) or has no such entry."""

    exit_code = 2


def database_path() -> Path:
    return home() / FILE_NAME


def logging_enabled(config: Path | None = None) -> bool:
    """False when the user's models.toml says `[settings] log = false` (chats are then never logged)."""
    path = config or home() / "models.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return True
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise HistoryError(f"cannot read the [settings] of {path}: {exc}") from None
    value = (data.get("settings") or {}).get("log", True)
    if not isinstance(value, bool):
        raise HistoryError(f"{path}: [settings] log must be true or false")
    return value


# -- schema ------------------------------------------------------------------------------------------------------------

# Each step runs inside the migration's transaction (executescript would commit it), one statement at a time.
_V1 = (
    """CREATE TABLE conversations (
        id INTEGER PRIMARY KEY,
        started TEXT NOT NULL,             -- ISO 8601, UTC
        updated TEXT NOT NULL,
        source TEXT NOT NULL,              -- chat | run
        model TEXT,                        -- the model file's path (or the served model's name)
        system TEXT,
        settings TEXT                      -- JSON: thinking, thinking_budget, max_tokens, sampling
    )""",
    """CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        role TEXT NOT NULL,                -- user | assistant | tool
        content TEXT NOT NULL,
        reasoning TEXT NOT NULL DEFAULT '',
        tool_calls TEXT,                   -- JSON, on an assistant message that called tools
        created TEXT NOT NULL,
        thinking INTEGER,                  -- the thinking mode the answer was asked with
        sampling TEXT,                     -- JSON
        prompt_tokens INTEGER,
        cached_tokens INTEGER,
        completion_tokens INTEGER,
        reasoning_tokens INTEGER,
        prompt_seconds REAL,
        generation_seconds REAL,
        finish_reason TEXT,
        UNIQUE (conversation_id, position)
    )""",
    """CREATE INDEX conversations_updated ON conversations(updated)""",
    """CREATE VIRTUAL TABLE messages_fts USING fts5(content, reasoning, content='messages', content_rowid='id')""",
    """CREATE TRIGGER messages_ai AFTER INSERT ON messages BEGIN
        INSERT INTO messages_fts(rowid, content, reasoning) VALUES (new.id, new.content, new.reasoning);
    END""",
    """CREATE TRIGGER messages_ad AFTER DELETE ON messages BEGIN
        INSERT INTO messages_fts(messages_fts, rowid, content, reasoning)
        VALUES ('delete', old.id, old.content, old.reasoning);
    END""",
)


def _v1(db: sqlite3.Connection) -> None:
    for statement in _V1:
        db.execute(statement)


# MIGRATIONS[i] takes a database from version i to version i + 1.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1]
assert len(MIGRATIONS) == SCHEMA_VERSION


def connect(path: Path | None = None) -> sqlite3.Connection:
    """Opens (creating or upgrading) the database. Raises HistoryError with a one-line reason."""
    path = path or database_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    except (OSError, sqlite3.Error) as exc:
        raise HistoryError(f"cannot open {path}: {exc}") from None
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise HistoryError(f"{path} was written by a newer cascade-local (schema {version}, this one knows "
                               f"{SCHEMA_VERSION}); upgrade cascade-local to use it (it was left unchanged)")
        db.execute("PRAGMA foreign_keys = ON")
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            db.execute("PRAGMA journal_mode = WAL")
        if version < SCHEMA_VERSION:
            db.execute("BEGIN IMMEDIATE")  # two processes creating it at once: one migrates, the other waits
            try:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                for step in range(version, SCHEMA_VERSION):
                    MIGRATIONS[step](db)
                    db.execute(f"PRAGMA user_version = {step + 1}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
    except HistoryError:
        db.close()
        raise
    except sqlite3.Error as exc:
        db.close()
        raise HistoryError(f"cannot use {path}: {exc}") from None
    return db


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def settings_json(settings: TurnSettings) -> str:
    return json.dumps({"thinking": settings.thinking, "thinking_budget": settings.thinking_budget,
                       "max_tokens": settings.max_tokens, "sampling": dataclasses.asdict(settings.sampling)})


# -- writing -----------------------------------------------------------------------------------------------------------

class ConversationLog:
    """Keeps one conversation's rows equal to a chat's message list, one complete message at a time.

    `sync(messages)` writes the messages not yet written and deletes rows the chat dropped (/retry, a failed
    turn); `restart()` makes the next message start a new conversation (/clear, /load). The conversation row is
    created with its first message, so an empty chat leaves nothing behind.
    """

    def __init__(self, db: sqlite3.Connection, *, source: str = "chat", model: str | None = None,
                 conversation_id: int | None = None, written: list[dict[str, Any]] | None = None):
        self.db, self.source, self.model = db, source, model
        self.id = conversation_id
        self._written: list[dict[str, Any]] = list(written or [])

    def restart(self) -> None:
        self.id, self._written = None, []

    def attach(self, conversation_id: int, written: list[dict[str, Any]]) -> None:
        """Goes on with a logged conversation whose rows hold `written` (a resumed chat)."""
        self.id, self._written = conversation_id, [dict(m) for m in written]

    def sync(self, messages: list[dict[str, Any]], *, system: str | None, settings: TurnSettings,
             result: Result | None = None) -> None:
        """Writes what changed. `result` holds the stats of the last message when it is a finished answer."""
        keep = 0
        while keep < min(len(messages), len(self._written)) and messages[keep] == self._written[keep]:
            keep += 1
        if keep == len(messages) == len(self._written):
            return
        with _transaction(self.db):
            now = _now()
            if self.id is None:
                if not messages:
                    return
                self.id = self.db.execute(
                    "INSERT INTO conversations (started, updated, source, model, system, settings) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (now, now, self.source, self.model, system, settings_json(settings))).lastrowid
            self.db.execute("DELETE FROM messages WHERE conversation_id = ? AND position >= ?", (self.id, keep))
            for position in range(keep, len(messages)):
                message = messages[position]
                stats = result if position == len(messages) - 1 and message.get("role") == "assistant" else None
                self._insert(position, message, settings, stats, now)
            self.db.execute("UPDATE conversations SET updated = ?, system = ?, settings = ? WHERE id = ?",
                            (now, system, settings_json(settings), self.id))
        self._written = [dict(m) for m in messages]

    def _insert(self, position: int, m: dict[str, Any], settings: TurnSettings, r: Result | None, now: str) -> None:
        answer = m.get("role") == "assistant"
        calls = m.get("tool_calls")
        self.db.execute(
            "INSERT INTO messages (conversation_id, position, role, content, reasoning, tool_calls, created, "
            "thinking, sampling, prompt_tokens, cached_tokens, completion_tokens, reasoning_tokens, "
            "prompt_seconds, generation_seconds, finish_reason) VALUES (" + ", ".join("?" * 16) + ")",
            (self.id, position, m.get("role", ""), m.get("content") or "", m.get("reasoning_content") or "",
             json.dumps(calls, ensure_ascii=False) if calls else None, now,
             int(settings.thinking) if answer else None,
             json.dumps(dataclasses.asdict(settings.sampling)) if answer else None,
             *((r.prompt_tokens, r.cached_tokens, r.completion_tokens, r.reasoning_tokens, r.prompt_seconds,
                r.generation_seconds, r.finish_reason) if r is not None else (None,) * 7)))


# -- reading -----------------------------------------------------------------------------------------------------------

@dataclass
class Summary:
    """One line of `logs`: a conversation, its first words and how many questions it has."""

    id: int
    started: str
    updated: str
    model: str | None
    first: str
    turns: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class StoredConversation:
    """A logged conversation, as `logs show` prints it and `chat --resume` reloads it."""

    id: int
    started: str
    updated: str
    source: str
    model: str | None
    system: str | None
    settings: dict[str, Any]
    messages: list[dict[str, Any]] = field(default_factory=list)

    def chat_messages(self) -> list[dict[str, Any]]:
        """The messages as the chat template takes them (role, content, reasoning_content, tool_calls)."""
        out = []
        for m in self.messages:
            message = {"role": m["role"], "content": m["content"]}
            if m["role"] == "assistant":  # as the chat holds them: an answer always has its reasoning, maybe ""
                message["reasoning_content"] = m["reasoning"]
            if m["tool_calls"]:
                message["tool_calls"] = m["tool_calls"]
            out.append(message)
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_MESSAGE_COLUMNS = ("role", "content", "reasoning", "tool_calls", "created", "thinking", "sampling", "prompt_tokens",
                    "cached_tokens", "completion_tokens", "reasoning_tokens", "prompt_seconds",
                    "generation_seconds", "finish_reason")


def fts_query(text: str) -> str:
    """The user's words as FTS5 phrases (every word must appear), so quotes and operators are just text."""
    words = text.split()
    if not words:
        raise HistoryError("--search needs some text")
    return " ".join('"' + w.replace('"', '""') + '"' for w in words)


class HistoryStore:
    """Reads and deletes logged conversations."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def summaries(self, limit: int = 20, search: str | None = None) -> list[Summary]:
        """The most recently updated conversations first; with `search`, only those whose messages match."""
        where, args = "", []
        if search is not None:
            where = ("WHERE c.id IN (SELECT m.conversation_id FROM messages_fts f JOIN messages m ON m.id = f.rowid "
                     "WHERE messages_fts MATCH ?)")
            args.append(fts_query(search))
        rows = self._query(
            "SELECT c.id, c.started, c.updated, c.model, "
            "(SELECT content FROM messages WHERE conversation_id = c.id AND role = 'user' ORDER BY position LIMIT 1), "
            "(SELECT count(*) FROM messages WHERE conversation_id = c.id AND role = 'user') "
            f"FROM conversations c {where} ORDER BY c.updated DESC, c.id DESC LIMIT ?", (*args, limit))
        return [Summary(r[0], r[1], r[2], r[3], r[4] or "", r[5]) for r in rows]

    def last_id(self, source: str = "chat") -> int:
        row = self._query("SELECT id FROM conversations WHERE source = ? ORDER BY updated DESC, id DESC LIMIT 1",
                          (source,))
        if not row:
            raise HistoryError("no logged conversation to continue yet")
        return row[0][0]

    def get(self, conversation_id: int) -> StoredConversation:
        rows = self._query("SELECT id, started, updated, source, model, system, settings FROM conversations "
                           "WHERE id = ?", (conversation_id,))
        if not rows:
            raise HistoryError(f"no logged conversation {conversation_id}; `cascade-local logs` lists them")
        c = rows[0]
        found = StoredConversation(c[0], c[1], c[2], c[3], c[4], c[5], json.loads(c[6]) if c[6] else {})
        for r in self._query(f"SELECT {', '.join(_MESSAGE_COLUMNS)} FROM messages WHERE conversation_id = ? "
                             "ORDER BY position", (conversation_id,)):
            m = dict(zip(_MESSAGE_COLUMNS, r, strict=True))
            m["tool_calls"] = json.loads(m["tool_calls"]) if m["tool_calls"] else None
            m["sampling"] = json.loads(m["sampling"]) if m["sampling"] else None
            m["thinking"] = None if m["thinking"] is None else bool(m["thinking"])
            found.messages.append(m)
        return found

    def remove(self, conversation_id: int) -> None:
        try:
            with _transaction(self.db):
                deleted = self.db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,)).rowcount
        except sqlite3.Error as exc:
            raise HistoryError(f"cannot delete conversation {conversation_id}: {exc}") from None
        if not deleted:
            raise HistoryError(f"no logged conversation {conversation_id}; `cascade-local logs` lists them")

    def _query(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise HistoryError(f"cannot read the history: {exc}") from None


def open_store(path: Path | None = None) -> HistoryStore | None:
    """The store for reading, or None when nothing has been logged yet (the database is not created for that)."""
    path = path or database_path()
    return HistoryStore(connect(path)) if path.exists() else None


# -- a conversation as Markdown ----------------------------------------------------------------------------------------

def to_markdown(c: StoredConversation) -> str:
    """The whole conversation for reading: questions as headings, reasoning quoted, tool calls as code blocks."""
    lines = [f"# Conversation {c.id}", "", f"{c.started} · {Path(c.model).name if c.model else 'unknown model'}"]
    if c.system:
        lines += ["", "**System:** " + c.system]
    for m in c.messages:
        if m["role"] == "user":
            lines += ["", "## User", "", m["content"]]
        elif m["role"] == "assistant":
            lines += ["", "## Assistant"]
            if m["reasoning"]:
                lines += ["", *("> " + line if line else ">" for line in m["reasoning"].splitlines())]
            if m["content"]:
                lines += ["", m["content"]]
            for call in m["tool_calls"] or []:
                function = call.get("function", {})
                code = (function.get("arguments") or {}).get("code", json.dumps(function.get("arguments")))
                lines += ["", f"Tool call `{function.get('name')}`:", "", "```python", str(code), "```"]
            if m["completion_tokens"] is not None:
                lines += ["", f"*{m['completion_tokens']} tokens ({m['reasoning_tokens']} thinking), "
                          f"{m['finish_reason']}*"]
        elif m["role"] == "tool":
            lines += ["", "Tool output:", "", "```", m["content"], "```"]
    return "\n".join(lines) + "\n"
