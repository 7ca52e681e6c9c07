"""The automatic chat history: the SQLite store (schema, WAL, migrations, search) and a chat that writes to it."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from conftest import CLI, run_cli

from cascade_local.conversation import TurnSettings
from cascade_local.engine import Result
from cascade_local.history import (
    SCHEMA_VERSION,
    ConversationLog,
    HistoryError,
    HistoryStore,
    connect,
    logging_enabled,
    to_markdown,
)

SETTINGS = TurnSettings()


def _chat(db, *texts):
    """Logs user/assistant pairs through a ConversationLog, as a chat does (question first, then the answer)."""
    log, messages = ConversationLog(db, model="/models/tiny.gguf"), []
    for text in texts:
        messages.append({"role": "user", "content": text})
        log.sync(messages, system=None, settings=SETTINGS)
        messages.append({"role": "assistant", "content": f"answer to {text}", "reasoning_content": "hmm"})
        log.sync(messages, system=None, settings=SETTINGS, result=Result(completion_tokens=7, reasoning_tokens=2,
                                                                        finish_reason="stop"))
    return log, messages


def test_a_new_database_is_versioned_and_in_wal_mode(tmp_path):
    db = connect(tmp_path / "h.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_messages_are_written_as_they_complete_and_read_back(tmp_path):
    db = connect(tmp_path / "h.db")
    log, messages = _chat(db, "first question", "second question")
    stored = HistoryStore(connect(tmp_path / "h.db")).get(log.id)  # another connection sees every message
    assert [m["role"] for m in stored.messages] == ["user", "assistant"] * 2
    assert stored.chat_messages() == messages
    answer = stored.messages[1]
    assert answer["reasoning"] == "hmm" and answer["completion_tokens"] == 7 and answer["finish_reason"] == "stop"
    assert answer["thinking"] is True and answer["sampling"]["temperature"] == SETTINGS.sampling.temperature
    assert stored.model == "/models/tiny.gguf" and stored.settings["thinking"] is True


def test_a_dropped_exchange_is_deleted_and_restart_starts_a_new_conversation(tmp_path):
    db = connect(tmp_path / "h.db")
    log, messages = _chat(db, "one", "two")
    del messages[-2:]  # /retry or a failed turn
    log.sync(messages, system="be brief", settings=SETTINGS)
    store = HistoryStore(db)
    assert [m["content"] for m in store.get(log.id).messages] == ["one", "answer to one"]
    assert store.get(log.id).system == "be brief"
    first = log.id
    log.restart()  # /clear
    log.sync([{"role": "user", "content": "fresh"}], system=None, settings=SETTINGS)
    assert log.id != first and [s.first for s in store.summaries()] == ["fresh", "one"]


def test_list_search_show_and_remove(tmp_path):
    db = connect(tmp_path / "h.db")
    a, _ = _chat(db, "tell me about tokamaks", "and stellarators?")
    b, _ = _chat(db, "a recipe for bread")
    store = HistoryStore(db)
    assert [(s.id, s.turns) for s in store.summaries()] == [(b.id, 1), (a.id, 2)]
    assert [s.id for s in store.summaries(limit=1)] == [b.id]
    assert [s.id for s in store.summaries(search="stellarators")] == [a.id]
    assert [s.id for s in store.summaries(search='bread "OR')] == []  # quotes and operators are plain words
    markdown = to_markdown(store.get(a.id))
    assert "## User\n\ntell me about tokamaks" in markdown and "> hmm" in markdown
    store.remove(a.id)
    assert [s.id for s in store.summaries()] == [b.id]
    assert store.summaries(search="stellarators") == []  # its text left the index too
    with pytest.raises(HistoryError, match="no logged conversation"):
        store.remove(a.id)


def test_a_newer_database_is_refused_and_left_unchanged(tmp_path):
    path = tmp_path / "h.db"
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(HistoryError, match="newer cascade-local"):
        connect(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert not (tmp_path / "h.db-wal").exists()


def test_an_old_database_is_migrated(tmp_path):
    """A version-0 file (empty, as an older cascade-local without history would leave none) is brought up to date."""
    path = tmp_path / "h.db"
    sqlite3.connect(path).close()
    assert connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_corrupted_database_is_a_clear_error(tmp_path):
    path = tmp_path / "h.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(HistoryError, match="file is not a database"):
        connect(path)


def test_the_setting_turns_logging_off(tmp_path):
    config = tmp_path / "models.toml"
    assert logging_enabled(config)
    config.write_text("[settings]\nlog = false\n")
    assert not logging_enabled(config)
    config.write_text("[settings]\nlog = 'no'\n")
    with pytest.raises(HistoryError, match="log must be true or false"):
        logging_enabled(config)


# -- the chat ----------------------------------------------------------------------------------------------------------

def _db(home):
    return HistoryStore(connect(home / "history.db"))


def test_a_chat_is_logged_and_continued(tiny_gguf, private_home):
    model = str(tiny_gguf("q8_0"))
    first = run_cli("chat", model, "--max-tokens", "4", "--temperature", "0",
                    input="/stats\nHello\n/think off\nAgain\n/stats\n")
    assert first.returncode == 0, first.stderr
    [summary] = _db(private_home).summaries()
    assert "history: nothing logged yet" in first.stderr
    assert f"history: conversation {summary.id} (cascade-local logs show {summary.id})" in first.stderr
    assert summary.turns == 2 and summary.first == "Hello" and summary.model == model
    second = run_cli("chat", model, "--max-tokens", "4", "--temperature", "0", "--continue", input="Third\nFourth\n")
    assert second.returncode == 0, second.stderr
    assert f"conversation {summary.id} (2 questions, 4 messages) · thinking off" in second.stderr
    # The reloaded history is evaluated once, by the first question; the next one reuses it.
    reused = [int(n) for n in re.findall(r"prompt \d+ \((\d+) reused\)", second.stderr)]
    assert reused[0] == 0 and reused[1] > 0, second.stderr
    stored = _db(private_home).get(summary.id)
    assert [m["content"] for m in stored.messages if m["role"] == "user"] == ["Hello", "Again", "Third", "Fourth"]
    assert stored.messages[-1]["thinking"] is False  # the resumed chat kept its thinking mode


def test_no_log_and_the_setting_keep_nothing(tiny_gguf, private_home):
    model = str(tiny_gguf("q8_0"))
    unlogged = run_cli("chat", model, "--max-tokens", "2", "--no-log", input="Hello\n/stats\n")
    assert unlogged.returncode == 0 and "history: off" in unlogged.stderr
    private_home.mkdir(exist_ok=True)
    (private_home / "models.toml").write_text("[settings]\nlog = false\n")
    assert run_cli("chat", model, "--max-tokens", "2", input="Hello\n").returncode == 0
    assert not (private_home / "history.db").exists()


@pytest.mark.parametrize("damage", ["corrupted", "newer"])
def test_a_chat_with_a_broken_database_warns_once_and_goes_on(tiny_gguf, private_home, damage):
    private_home.mkdir(exist_ok=True)
    path = private_home / "history.db"
    if damage == "corrupted":
        path.write_bytes(b"garbage" * 1000)
    else:
        raw = sqlite3.connect(path)
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        raw.close()
    before = path.read_bytes()
    result = run_cli("chat", str(tiny_gguf("q8_0")), "--max-tokens", "3", input="Hello\nAgain\n")
    assert result.returncode == 0 and result.stdout.count("\n") == 2, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "not being logged" in line]
    assert len(warnings) == 1 and "Traceback" not in result.stderr
    assert path.read_bytes() == before


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="root without setpriv")
def test_a_chat_with_a_read_only_database_warns_once_and_goes_on(tiny_gguf):
    """The database file is read-only for the user running the chat. Root ignores file modes, so under root the
    chat runs as `nobody` (setpriv drops every capability), in a folder it may write (the file stays root's)."""
    import tempfile

    as_root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix="cascade-ro-"))  # outside pytest's private (0700) folder
    try:
        base.chmod(0o755)
        model = base / "tiny.gguf"
        shutil.copy(tiny_gguf("q8_0"), model)
        model.chmod(0o644)
        home = base / "home"
        home.mkdir()
        connect(home / "history.db").close()
        (home / "history.db").chmod(0o444)
        if as_root:
            os.chown(home, 65534, 65534)
        before = (home / "history.db").read_bytes()
        drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if as_root else []
        if drop and subprocess.run([*drop, *CLI, "--version"], capture_output=True, cwd=base).returncode != 0:
            # A checkout in a folder only root may enter (mktemp -d makes 0700 ones): nobody cannot run it.
            pytest.skip("user nobody cannot read this checkout, so the chat cannot run as nobody")
        result = subprocess.run([*drop, *CLI, "chat", str(model), "--max-tokens", "3"], input="Hello\nAgain\n",
                                capture_output=True, text=True, timeout=120, cwd=base,
                                env={**os.environ, "CASCADE_LOCAL_HOME": str(home), "HOME": str(home)})
        assert result.returncode == 0 and result.stdout.count("\n") == 2, result.stderr
        warnings = [line for line in result.stderr.splitlines() if "not being logged" in line]
        assert len(warnings) == 1 and "readonly" in warnings[0] and "Traceback" not in result.stderr
        assert (home / "history.db").read_bytes() == before
    finally:
        shutil.rmtree(base)


def test_run_is_logged_only_with_log(tiny_gguf, private_home):
    model = str(tiny_gguf("q8_0"))
    plain = run_cli("run", model, "Hello", "--no-think", "--max-tokens", "4", "--temperature", "0")
    assert plain.returncode == 0 and not (private_home / "history.db").exists()
    logged = run_cli("run", model, "Hello", "--no-think", "--max-tokens", "4", "--temperature", "0", "--log",
                     "--system", "Be brief.")
    assert logged.returncode == 0, logged.stderr
    [summary] = _db(private_home).summaries()
    stored = _db(private_home).get(summary.id)
    assert stored.source == "run" and stored.system == "Be brief." and stored.model == model
    assert [m["role"] for m in stored.messages] == ["user", "assistant"]
    assert stored.messages[1]["content"] == logged.stdout.strip() and stored.messages[1]["completion_tokens"] == 4
    with pytest.raises(HistoryError, match="no logged conversation to continue"):
        _db(private_home).last_id()  # chat --continue goes on with chats, not with run's exchanges


def test_load_id_in_a_chat_goes_on_with_a_logged_conversation(tiny_gguf, private_home):
    model = str(tiny_gguf("q8_0"))
    assert run_cli("chat", model, "--max-tokens", "3", "--no-think", input="Old question\n").returncode == 0
    [old] = _db(private_home).summaries()
    chat = run_cli("chat", model, "--max-tokens", "3", "--no-think", input=f"New chat\n/load {old.id}\nOn top\n")
    assert chat.returncode == 0, chat.stderr
    assert f"conversation {old.id} (1 question, 2 messages)" in chat.stderr
    users = [[m["content"] for m in _db(private_home).get(s.id).messages if m["role"] == "user"]
             for s in _db(private_home).summaries()]
    assert sorted(users) == [["New chat"], ["Old question", "On top"]]
