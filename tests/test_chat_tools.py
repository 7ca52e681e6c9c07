"""`chat --tools python`: the switch, /tools on|off, the rendering of calls, and a scripted call in a real kernel."""

from __future__ import annotations

import io
import time

import psutil
import pytest
from conftest import run_cli
from rich.console import Console

from cascade_local.cli.chat import ChatSession, TurnView, help_text, parse_slash, run_chat
from cascade_local.conversation import Conversation, TurnSettings
from cascade_local.sampling import SamplingParams
from cascade_local.tools import PYTHON_TOOL_NAME, CallRecord, LoopEvent

pytest.importorskip("jupyter_client")
pytest.importorskip("ipykernel")

IM_END = 11
CALL = (f"<tool_call>\n<function={PYTHON_TOOL_NAME}>\n<parameter=code>\nprint(6*7)\n</parameter>\n</function>\n"
        "</tool_call>")


def test_tools_toggle_is_a_command_with_help():
    assert parse_slash("/tools on").value is True and parse_slash("/tools OFF").value is False
    assert "/tools [on|off]" in help_text()


# -- through the real command (piped) --------------------------------------------------------------------------


def test_chat_with_tools_without_yes_answers_a_turn(tiny_gguf):
    done = run_cli("chat", str(tiny_gguf("q8_0")), "--tools", "python", "--max-tokens", "8", "--threads", "2",
                   "--no-think", input="hello\n")
    assert done.returncode == 0, done.stderr
    assert "tools on, each call asks" in done.stderr
    assert "8 tokens (0 thinking)" in done.stderr  # the stats line of the tool turn
    assert done.stdout.strip()


def test_chat_tools_off_and_on_are_reported(tiny_gguf):
    done = run_cli("chat", str(tiny_gguf("q8_0")), "--max-tokens", "4", "--threads", "2", "--no-think",
                   input="/tools on\nhi\n/tools off\n/tools on\n/exit\n")
    assert done.returncode == 0, done.stderr
    assert "tools on: stateful_python_code_exec (you confirm each call)" in done.stderr
    assert "tools off (the Python kernel was shut down)" in done.stderr
    assert "error" not in done.stderr


def test_chat_tools_refuses_an_unknown_tool(tiny_gguf):
    done = run_cli("chat", str(tiny_gguf("q8_0")), "--tools", "shell", input="")
    assert done.returncode == 1 and "unknown tool shell" in done.stderr


# -- rendering -------------------------------------------------------------------------------------------------


def _scripted_events() -> list[LoopEvent]:
    call = CallRecord(PYTHON_TOOL_NAME, {"code": "x = 6 * 7\nprint(x)"}, "")
    done = CallRecord(PYTHON_TOOL_NAME, {"code": "x = 6 * 7\nprint(x)"}, "42")
    return [LoopEvent("content", "Let me compute."), LoopEvent("tool_call", call.code, call),
            LoopEvent("tool_result", "42", done), LoopEvent("content", "It is 42.")]


def test_tool_calls_render_as_plain_text_on_stderr_when_not_a_terminal(capsys):
    err = io.StringIO()
    view = TurnView(Console(file=io.StringIO()), Console(file=err, width=200), thinking=False, show_thinking=True)
    for event in _scripted_events():
        view.feed(event)
    view.close(None, False)
    out = capsys.readouterr().out
    assert out == "Let me compute.\nIt is 42.\n"  # stdout: the answer only
    assert f"[tool call {PYTHON_TOOL_NAME}]\nx = 6 * 7\nprint(x)\n[tool output]\n42\n" in err.getvalue()


def test_tool_calls_render_as_panels_on_a_terminal():
    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=True, color_system="truecolor")
    console.file.isatty = lambda: True  # type: ignore[method-assign]
    view = TurnView(console, Console(file=io.StringIO(), width=80), thinking=False, show_thinking=True)
    for event in _scripted_events():
        view.feed(event)
    view.close(None, False)
    text = out.getvalue()
    assert PYTHON_TOOL_NAME in text and "output" in text and "╭" in text
    assert "\x1b[" in text  # highlighted
    assert "print" in text and "42" in text


# -- a scripted call in a real kernel ------------------------------------------------------------------------


def test_a_scripted_tool_call_runs_in_the_chat_kernel_and_clear_ends_it(tiny_gguf, capsys):
    from cascade_local.engine import Engine
    from cascade_local.llama_model import LoadedModel
    from cascade_local.testing.scripted import ScriptedSampler

    model = LoadedModel(tiny_gguf("q8_0"))
    rounds = iter([model.tokenize(CALL), [*model.tokenize("42"), IM_END]])
    engine = Engine(model, n_ctx=1024, threads=2,
                    sampler_factory=lambda params: ScriptedSampler(next(rounds, [IM_END]), then=IM_END))
    err = io.StringIO()
    asked = []
    session = ChatSession(Conversation(engine), TurnSettings(thinking=False, max_tokens=200),
                          lambda thinking: SamplingParams(), out=Console(file=io.StringIO()),
                          err=Console(file=err, width=200), confirm=lambda call: asked.append(call) or True)
    session.enable_tools()
    result = session.turn("What is 6*7?")
    assert result is not None and result.completion_tokens > 0
    assert [c.arguments["code"] for c in asked] == ["print(6*7)"]
    assert "[tool output]\n42\n" in err.getvalue()
    history = session.conversation.messages
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]
    assert history[2]["content"] == "42" and history[3]["content"] == "42"
    assert "tokens (0 thinking)" in err.getvalue()
    kernel = session.tools[0].kernel
    pid = kernel.pid
    assert pid and psutil.pid_exists(pid)
    lines = iter(["/clear", "/exit"])
    assert run_chat(session, lambda: next(lines)) == 0
    deadline = time.monotonic() + 5
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not psutil.pid_exists(pid)
    assert session.tools[0].kernel is None


def test_the_confirmation_runs_only_on_yes():
    from cascade_local.cli.chat import ask_to_run

    def eof() -> str:
        raise EOFError

    err = io.StringIO()
    console = Console(file=err, width=200)
    assert ask_to_run(console, lambda: "y")(None) and ask_to_run(console, lambda: " YES ")(None)
    assert not ask_to_run(console, lambda: "")(None) and not ask_to_run(console, lambda: "no")(None)
    assert not ask_to_run(console, eof)(None)
    assert "Run this code? [y/N]" in err.getvalue()


def test_a_tool_turn_is_logged_with_its_call_and_output(tiny_gguf, tmp_path):
    from cascade_local.cli.chat.record import ChatRecorder
    from cascade_local.engine import Engine
    from cascade_local.history import ConversationLog, HistoryStore, connect
    from cascade_local.llama_model import LoadedModel
    from cascade_local.testing.scripted import ScriptedSampler

    model = LoadedModel(tiny_gguf("q8_0"))
    rounds = iter([model.tokenize(CALL), [*model.tokenize("42"), IM_END]])
    logged_before_round: list[list[str]] = []

    def sampler(params):
        # What another process reads from the history when each round starts: the call is there before the answer.
        logged_before_round.append([m["role"] for s in HistoryStore(connect(tmp_path / "h.db")).summaries()
                                    for m in HistoryStore(connect(tmp_path / "h.db")).get(s.id).messages])
        return ScriptedSampler(next(rounds, [IM_END]), then=IM_END)

    engine = Engine(model, n_ctx=1024, threads=2, sampler_factory=sampler)
    err = Console(file=io.StringIO(), width=200)
    log = ConversationLog(connect(tmp_path / "h.db"), model=str(model.path))
    session = ChatSession(Conversation(engine), TurnSettings(thinking=False, max_tokens=200),
                          lambda thinking: SamplingParams(), out=Console(file=io.StringIO()), err=err,
                          confirm=lambda call: True, recorder=ChatRecorder(log, err))
    session.enable_tools()
    try:
        assert session.turn("What is 6*7?") is not None
    finally:
        session.close()
    assert logged_before_round == [["user"], ["user", "assistant", "tool"]]
    stored = HistoryStore(connect(tmp_path / "h.db")).get(log.id)
    assert [m["role"] for m in stored.messages] == ["user", "assistant", "tool", "assistant"]
    call = stored.messages[1]["tool_calls"][0]["function"]
    assert call["name"] == PYTHON_TOOL_NAME and call["arguments"] == {"code": "print(6*7)"}
    assert stored.messages[2]["content"] == "42" and stored.messages[3]["content"] == "42"
    assert stored.messages[3]["completion_tokens"] > 0
    assert stored.chat_messages() == session.conversation.messages  # reloads exactly as the chat holds it
