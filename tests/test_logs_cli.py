"""`cascade-local logs` as a user runs it: real processes, pipes, a real database in a private home."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import CLI, run_cli

from cascade_local.conversation import TurnSettings
from cascade_local.engine import Result
from cascade_local.history import ConversationLog, connect

ANSWER = Result(completion_tokens=9, reasoning_tokens=3, prompt_tokens=20, generation_seconds=0.5, finish_reason="stop")


@pytest.fixture
def logged(private_home):
    """Two conversations, the second with a tool call and its output."""
    db = connect(private_home / "history.db")
    first = ConversationLog(db, model="/models/tiny-q8.gguf")
    first.sync([{"role": "user", "content": "What is a tokamak?"},
                {"role": "assistant", "content": "A **magnetic** confinement device.", "reasoning_content": "Fusion."}],
               system="Be brief.", settings=TurnSettings(), result=ANSWER)
    second = ConversationLog(db, model="/models/tiny-q8.gguf")
    call = [{"type": "function", "function": {"name": "stateful_python_code_exec", "arguments": {"code": "2**10"}}}]
    second.sync([{"role": "user", "content": "Compute 2 to the 10th"},
                 {"role": "assistant", "content": "", "reasoning_content": "Use Python.", "tool_calls": call},
                 {"role": "tool", "content": "1024"},
                 {"role": "assistant", "content": "It is 1024."}],
                system=None, settings=TurnSettings(thinking=False), result=ANSWER)
    db.close()
    return first.id, second.id


def test_every_logs_command_has_help_with_an_example():
    for command in ([], ["show"], ["rm"], ["path"]):
        result = run_cli("logs", *command, "--help")
        flat = " ".join(result.stdout.split())
        assert result.returncode == 0 and f"Example: cascade-local logs {' '.join(command)}".strip() in flat, command


def test_list_search_and_json(logged):
    first, second = logged
    listed = run_cli("logs")
    assert listed.returncode == 0 and listed.stderr == ""
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["id", "date", "model", "turns", "first", "words"]
    assert [row.split()[0] for row in rows] == [str(second), str(first)]
    assert rows[1].split()[3:] == ["tiny-q8.gguf", "1", "What", "is", "a", "tokamak?"]
    assert [r["id"] for r in json.loads(run_cli("logs", "--json", "-n", "1").stdout)] == [second]
    found = json.loads(run_cli("logs", "--search", "confinement", "--json").stdout)
    assert [r["id"] for r in found] == [first] and found[0]["first"] == "What is a tokamak?"
    none = run_cli("logs", "--search", "stellarator")
    assert none.returncode == 0 and none.stdout == "" and "no logged conversations match" in none.stderr


def test_show_as_markdown_and_json(logged):
    first, second = logged
    markdown = run_cli("logs", "show", str(first))
    assert markdown.returncode == 0
    assert markdown.stdout.startswith(f"# Conversation {first}\n")
    assert "**System:** Be brief.\n\n## User\n\nWhat is a tokamak?\n\n## Assistant\n\n> Fusion.\n\n" \
           "A **magnetic** confinement device.\n\n*9 tokens (3 thinking), stop*\n" in markdown.stdout
    tools = run_cli("logs", "show", str(second)).stdout
    assert "Tool call `stateful_python_code_exec`:\n\n```python\n2**10\n```" in tools
    assert "Tool output:\n\n```\n1024\n```" in tools
    data = json.loads(run_cli("logs", "show", str(second), "--json").stdout)
    assert data["id"] == second and data["settings"]["thinking"] is False
    assert [m["role"] for m in data["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert data["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"code": "2**10"}
    assert data["messages"][1]["reasoning"] == "Use Python." and data["messages"][3]["completion_tokens"] == 9


def test_rm_and_path(logged, private_home):
    first, second = logged
    assert run_cli("logs", "path").stdout == f"{private_home / 'history.db'}\n"
    removed = run_cli("logs", "rm", str(first))
    assert removed.returncode == 0 and removed.stdout == "" and f"removed conversation {first}" in removed.stderr
    assert [r["id"] for r in json.loads(run_cli("logs", "--json").stdout)] == [second]
    again = run_cli("logs", "rm", str(first))
    assert again.returncode == 2 and again.stderr.startswith("error: no logged conversation") and again.stdout == ""


def test_nothing_logged_yet_creates_nothing(private_home):
    listed = run_cli("logs")
    assert listed.returncode == 0 and listed.stdout == "" and "no logged conversations" in listed.stderr
    shown = run_cli("logs", "show", "1")
    assert shown.returncode == 2 and "no logged conversation 1" in shown.stderr
    assert not (private_home / "history.db").exists()


def test_a_closed_pipe_ends_quietly(logged):
    result = subprocess.run(" ".join([*CLI, "logs", "show", str(logged[1])]) + " | head -1", shell=True,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == f"# Conversation {logged[1]}\n" and result.stderr == ""
