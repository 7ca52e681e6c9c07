"""The chat's pure parts: slash commands, multi-line input, Markdown streaming, transcripts, and the loop itself
driven by a scripted conversation (the real model runs in test_cli.py and test_chat_tmux.py)."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console
from rich.markdown import Markdown

from cascade_local import transcript
from cascade_local.chat_template import ChatTemplate
from cascade_local.cli.chat import (
    COMMANDS,
    ChatSession,
    Command,
    MarkdownBlocks,
    MarkdownStream,
    SlashError,
    block_is_open,
    help_text,
    interpret,
    parse_slash,
    read_message,
    run_chat,
    slash_completer,
    terminal_safe,
    thought_summary,
)
from cascade_local.cli.chat.interrupts import Interrupts
from cascade_local.cli.chat.loop import LEAVE_HINT, LEAVE_WINDOW
from cascade_local.cli.chat.tools import exchange_messages
from cascade_local.conversation import Conversation, TurnSettings
from cascade_local.engine import Event, Result
from cascade_local.llama_model import default_template
from cascade_local.sampling import SamplingParams
from cascade_local.tools.loop import CallRecord
from cascade_local.transcript import TranscriptError

# -- slash commands -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "expected"), [
    ("/think on", Command("/think", True)),
    ("/think OFF", Command("/think", False)),
    ("/thinking hide", Command("/thinking", False)),
    ("/thinking show", Command("/thinking", True)),
    ("/budget 512", Command("/budget", 512)),
    ("/budget off", Command("/budget", None)),
    ("/system  Be brief.  ", Command("/system", "Be brief.")),
    ("/system", Command("/system", None)),  # shows it
    ("/system off", Command("/system", "")),  # removes it
    ("/think", Command("/think", None)),
    ("/tools", Command("/tools", None)),
    ("/load chat.json --settings", Command("/load", Path("chat.json"), with_settings=True)),
    ("/settings", Command("/settings")),
    ("/save chat.json", Command("/save", Path("chat.json"))),
    ("/save chat.json --force", Command("/save", Path("chat.json"), force=True)),
    ("/save --force 'my chat.json'", Command("/save", Path("my chat.json"), force=True)),
    ("/load ~/chat.json", Command("/load", Path("~/chat.json").expanduser())),
    ("/quit", Command("/exit")),
    ("/bye", Command("/exit")),
    ("/stats", Command("/stats")),
])
def test_parse_slash(line, expected):
    assert parse_slash(line) == expected


@pytest.mark.parametrize(("line", "message"), [
    ("/think maybe", "usage: /think [on|off]"),
    ("/budget 0", "usage: /budget N|off"),
    ("/budget -3", "usage: /budget N|off"),
    ("/save", "usage: /save FILE [--force]"),
    ("/save my chat.json", "usage: /save FILE [--force] (quote a name that has spaces)"),
    ("/load a.json --force", "usage: /load FILE|ID"),
    ("/save 'unclosed", "/save: No closing quotation"),
    ("/clear now", "/clear takes no argument"),
    ("/usr/bin/env", 'unknown command /usr/bin/env; /help lists them (to send a message that starts with /, wrap it'),
    ("/exitt", "unknown command /exitt; did you mean /exit? /help lists them"),
    ("/stat", "unknown command /stat; did you mean /stats? /help lists them"),
])
def test_parse_slash_refuses_with_a_reason(line, message):
    with pytest.raises(SlashError, match="^" + re.escape(message)):
        parse_slash(line)


def test_help_lists_every_command_and_multiline():
    text = help_text()
    assert all(name in text for name in COMMANDS) and '"""' in text


def test_help_wraps_between_words_to_the_terminal():
    narrow = help_text(60)
    assert all(len(line) <= 60 for line in narrow.splitlines()), narrow
    # Nothing lost or cut: the same words as at full width.
    assert narrow.split() == help_text(1000).split()


def test_completer_completes_commands_and_arguments_at_the_start_only(tmp_path):
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document

    completer = slash_completer()

    def complete(text: str) -> list[str]:
        return [c.text for c in completer.get_completions(Document(text), CompleteEvent(completion_requested=True))]

    assert complete("/sta") == ["/stats"]
    assert complete("/think o") == ["/think off", "/think on"]
    assert complete("say /th") == []
    (tmp_path / "saved.json").write_text("{}")
    assert complete(f"/load {tmp_path}/sa") == ["ved.json"]


# -- multi-line input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "is_open"), [
    ('"""', True),
    ('"""first line', True),
    ('"""\nfirst\nsecond', True),
    ('"""\nfirst\nlast"""', False),
    ('"""one line"""', False),
    ('""""""', False),
    ("plain", False),
    ('say """', False),
])
def test_block_is_open(text, is_open):
    assert block_is_open(text) is is_open


@pytest.mark.parametrize(("raw", "expected"), [
    ("hello", ("message", "hello")),
    ("  /budget 8 ", ("command", "/budget 8")),
    ("   ", ("empty", "")),
    ('"""\n/usr/bin is a folder\n  indented\n"""', ("message", "/usr/bin is a folder\n  indented")),
    ('"""one line"""', ("message", "one line")),
    ('"""\n\n"""', ("empty", "")),
])
def test_interpret(raw, expected):
    assert interpret(raw) == expected


def test_read_message_reads_a_block_line_by_line():
    lines = iter(['"""', "def f():", "    return 1", '"""', "next"])
    prompts: list[str] = []

    def read_line(prompt: str) -> str:
        prompts.append(prompt)
        return next(lines)

    assert interpret(read_message(read_line)) == ("message", "def f():\n    return 1")
    assert prompts == [">>> ", "... ", "... ", "... "]
    assert read_message(read_line) == "next"


def test_read_message_sends_an_unclosed_block_at_end_of_input():
    lines = iter(['"""', "half"])

    def read_line(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    assert interpret(read_message(read_line)) == ("message", "half")


# -- rendering ------------------------------------------------------------------------------------------------------


def test_terminal_safe_neutralizes_control_characters():
    assert terminal_safe("a\x1b[2Jb\r\n\tc\x07") == "a\ufffd[2Jb\n\tc\ufffd"


def test_thought_summary():
    assert thought_summary(412, 9.06) == "thought for 412 tokens, 9.1 s"
    assert thought_summary(1, 0.04) == "thought for 1 token, 0.0 s"


def _feed_all(pieces: list[str]) -> MarkdownBlocks:
    blocks = MarkdownBlocks()
    for piece in pieces:
        blocks.feed(piece)
    return blocks


def test_blocks_are_stable_after_a_blank_line_and_a_line_at_the_margin():
    text = "# Title\n\nFirst paragraph.\n\n- item\n\n  still the item\n\nNext"
    blocks = _feed_all(list(text))
    assert text[blocks.stable:] == "- item\n\n  still the item\n\nNext"  # "Next" is not a complete line yet
    blocks.feed("\n")
    assert text[blocks.stable:] == "Next"


def test_blocks_never_split_a_code_fence():
    text = "Intro\n\n```python\nx = 1\n\ny = 2\n```\n\nAfter\n"
    blocks = _feed_all([text])
    assert text[blocks.stable:] == "After\n"
    unclosed = _feed_all(["Intro\n\n~~~\na\n\nb\n```\n\nc\n"])
    assert unclosed.text[unclosed.stable:] == "~~~\na\n\nb\n```\n\nc\n"  # ``` does not close ~~~


ANSWER = """## Reversing a list

There are **three** ways:

1. `items[::-1]` makes a *new* list.

2. `reversed(items)` gives an iterator.

- a bullet
- another

```python
items = [1, 2, 3]

items.reverse()
```

> A quote
> on two lines.

| a | b |
|---|---|
| 1 | 2 |

Last paragraph, long enough to wrap at forty columns at least once or twice."""


@pytest.mark.parametrize("step", [1, 3, 17, len(ANSWER)])
def test_streamed_markdown_renders_exactly_as_the_whole_text(step):
    console = Console(width=40, file=io.StringIO(), force_terminal=False)
    stream = MarkdownStream(console)
    lines = []
    for i in range(0, len(ANSWER), step):
        lines += stream.feed(ANSWER[i:i + step])
    lines += stream.pending()

    def text(ls):
        return ["".join(s.text for s in line) for line in ls]

    assert text(lines) == text(console.render_lines(Markdown(ANSWER), console.options, pad=False))


# -- transcripts ----------------------------------------------------------------------------------------------------


def _conversation(messages=(), system=None) -> Conversation:
    chat = Conversation(SimpleNamespace(model=SimpleNamespace(path=Path("tiny.gguf"))), system)
    chat.messages.extend(dict(m) for m in messages)
    return chat


HISTORY = [{"role": "user", "content": "Hi"},
           {"role": "assistant", "content": "Hello! **Bold**", "reasoning_content": "greet back"}]


def test_transcript_round_trip(tmp_path):
    settings = TurnSettings(False, 256, 100, SamplingParams(temperature=0.6, top_p=0.9, seed=7))
    path = transcript.save(_conversation(HISTORY, "Be brief."), settings, tmp_path / "chat.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "cascade-local/conversation" and data["model"] == "tiny.gguf"
    assert data["messages"] == HISTORY and data["system"] == "Be brief."
    assert [p.name for p in tmp_path.iterdir()] == ["chat.json"]  # the temporary file is gone

    other, other_settings = _conversation([{"role": "user", "content": "old"}]), TurnSettings()
    transcript.load(other, other_settings, path, with_settings=True)
    assert other.messages == HISTORY and other.system == "Be brief."
    assert other_settings == settings


def test_transcript_round_trip_of_a_tool_turn(tmp_path):
    # The messages a tool round adds, as the chat itself builds them, between a system message and a final answer.
    call = CallRecord("stateful_python_code_exec", {"code": "print(6 * 7)"}, "42\n")
    exchange = exchange_messages(call, {"content": "Let me compute.", "reasoning": "Use Python."})
    history = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "6 times 7?"}, *exchange,
               {"role": "assistant", "content": "42.", "reasoning_content": "It printed 42."}]
    assert [m["role"] for m in history] == ["system", "user", "assistant", "tool", "assistant"]
    assert history[2]["tool_calls"]
    path = transcript.save(_conversation(history, "Be brief."), TurnSettings(), tmp_path / "chat.json")

    other = _conversation()
    transcript.load(other, TurnSettings(), path, with_settings=True)
    assert other.messages == history and other.system == "Be brief."
    prompt = ChatTemplate(default_template()).render(other.messages)  # what the next turn's prompt holds
    assert "<tool_call>\n<function=stateful_python_code_exec>\n<parameter=code>\nprint(6 * 7)\n" in prompt
    assert "<tool_response>\n42\n\n</tool_response>" in prompt


@pytest.mark.parametrize(("message", "error"), [
    ({"role": "user", "content": "x", "tool_calls": []}, "only an assistant message has tool_calls"),
    ({"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]}, "tool_calls must be"),
    ({"role": "assistant", "content": "", "tool_calls": {"name": "f"}}, "tool_calls must be"),
    ({"role": "tool", "content": "out", "tool_call_id": 3}, "tool_call_id must be a string"),
])
def test_a_bad_tool_message_is_refused(tmp_path, message, error):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, message]}))
    with pytest.raises(TranscriptError, match=f"message 2: {error}"):
        transcript.load(_conversation(), TurnSettings(), path)


def test_save_refuses_to_overwrite_unless_forced(tmp_path):
    path = tmp_path / "chat.json"
    path.write_text("precious")
    with pytest.raises(TranscriptError, match="exists; add --force to overwrite it"):
        transcript.save(_conversation(HISTORY), TurnSettings(), path)
    assert path.read_text() == "precious"
    transcript.save(_conversation(HISTORY), TurnSettings(), path, force=True)
    assert json.loads(path.read_text())["messages"] == HISTORY
    assert [p.name for p in tmp_path.iterdir()] == ["chat.json"]


def test_save_into_a_missing_folder_says_so(tmp_path):
    with pytest.raises(TranscriptError, match="does not exist"):
        transcript.save(_conversation(HISTORY), TurnSettings(), tmp_path / "nope" / "chat.json")


@pytest.mark.parametrize(("content", "message"), [
    ('{"messages": [', "not a saved conversation: invalid JSON at line 1, column 15"),
    ("[1, 2]", "not a saved conversation \\(expected a JSON object\\)"),
    ('{"system": null}', "has no 'messages' list"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "message 1 needs a role"),
    ('{"messages": [], "settings": {"max_tokens": 0}}', "settings.max_tokens must be a positive integer"),
    ('{"messages": [], "settings": {"sampling": {"top_p": 7}}}', "settings.sampling: top-p must be in"),
    ('{"format": "something-else", "messages": []}', "not a saved conversation \\(format"),
    ('{"version": 99, "messages": []}', "written by a newer cascade-local"),
])
def test_a_bad_file_is_refused_and_the_conversation_is_unchanged(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    chat, settings = _conversation(HISTORY), TurnSettings()
    with pytest.raises(TranscriptError, match=message):
        transcript.load(chat, settings, path)
    assert chat.messages == HISTORY and settings == TurnSettings()


def test_unknown_keys_are_ignored(tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps({"messages": HISTORY, "settings": {"thinking": False, "colour": "blue",
                                                                  "sampling": {"temperature": 0, "mirostat": 2}},
                                "extra": 1}))
    chat, settings = _conversation(), TurnSettings()
    transcript.load(chat, settings, path, with_settings=True)
    assert chat.messages == HISTORY and settings.thinking is False and settings.sampling.temperature == 0


# -- the loop, with a scripted conversation -------------------------------------------------------------------------


class ScriptedConversation:
    """Stands in for Conversation: each reply streams `reasoning` then `answer` (or raises `fail`, once)."""

    def __init__(self, answer: str = "The answer.", reasoning: str = "Let me think."):
        self.answer, self.reasoning, self.fail = answer, reasoning, None
        self.messages: list[dict] = []
        self.system: str | None = None
        self.last: Result | None = None
        self.model = SimpleNamespace(path=Path("scripted.gguf"), metadata={})
        self.engine = SimpleNamespace(n_ctx=4096)
        self.asked: list[tuple[str, bool]] = []

    def reply(self, text, settings, progress=None):
        self.asked.append((text, settings.thinking))
        self.messages.append({"role": "user", "content": text})
        self.last = None
        try:
            if self.fail is not None:  # once
                fail, self.fail = self.fail, None
                raise fail
            if settings.thinking:
                yield Event(None, "reasoning", self.reasoning)
            yield Event(None, "content", self.answer)
            self.last = Result(content=self.answer, completion_tokens=5, reasoning_tokens=2 * settings.thinking,
                               prompt_tokens=11, generation_seconds=0.5)
            yield Event(None, "done", result=self.last)
        finally:
            self.messages.append({"role": "assistant", "content": self.answer})

    def retry_last(self):
        if len(self.messages) >= 2:
            self.messages.pop()
            return self.messages.pop()["content"]
        return None

    def clear(self):
        self.messages.clear()

    def turns_left_out(self):
        return 0


def _session(chat=None) -> tuple[ChatSession, io.StringIO]:
    err = io.StringIO()
    session = ChatSession(chat or ScriptedConversation(), TurnSettings(), lambda thinking: SamplingParams(
        temperature=1.0 if thinking else 0.6), out=Console(file=io.StringIO()), err=Console(file=err, width=200))
    return session, err


def _script(*inputs):
    lines = iter(inputs)

    def read():
        item = next(lines, EOFError)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        return item

    return read


def test_loop_turns_commands_and_end_of_input(capsys, tmp_path):
    session, err = _session()
    saved = tmp_path / "chat.json"
    code = run_chat(session, _script("Hi", "/think off", "Again", "/retry", f"/save {saved}", "/stats", "/nope"))
    assert code == 0
    chat = session.conversation
    assert chat.asked == [("Hi", True), ("Again", False), ("Again", False)]
    assert session.settings.sampling.temperature == 0.6  # the no-thinking sampling came with /think off
    assert capsys.readouterr().out == "The answer.\n" * 3  # plain stdout: the answers only
    log = err.getvalue()
    assert "Let me think." in log and "thinking off" in log and f"saved 4 messages to {saved}" in log
    assert "session: 3 answers, 15 tokens generated" in log
    assert "error: unknown command /nope" in log
    assert len(json.loads(saved.read_text())["messages"]) == 4


def test_a_bad_load_keeps_the_chat_going(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    session, err = _session()
    assert run_chat(session, _script("Hi", f"/load {bad}", "Still here?", "/exit", "never read")) == 0
    assert "is not a saved conversation: invalid JSON" in err.getvalue()
    assert [m["content"] for m in session.conversation.messages if m["role"] == "user"] == ["Hi", "Still here?"]


def _clock(*times):
    """A scripted monotonic clock: the times at which each Ctrl-C at the prompt is pressed."""
    ticks = iter(times)
    return lambda: next(ticks)


def test_one_ctrl_c_at_the_prompt_only_warns():
    session, err = _session()
    assert run_chat(session, _script("Hi", KeyboardInterrupt, "Again", "/exit"), clock=_clock(100.0)) == 0
    assert session.conversation.asked == [("Hi", True), ("Again", True)]
    assert err.getvalue().count(LEAVE_HINT) == 1


def test_two_ctrl_c_within_the_window_leave_with_0():
    session, err = _session()
    script = _script("Hi", KeyboardInterrupt, KeyboardInterrupt, "never read")
    assert run_chat(session, script, clock=_clock(100.0, 100.0 + LEAVE_WINDOW - 0.1)) == 0
    assert session.conversation.asked == [("Hi", True)] and err.getvalue().count(LEAVE_HINT) == 1


def test_a_ctrl_c_after_the_window_or_after_an_input_warns_again():
    session, err = _session()
    script = _script(KeyboardInterrupt, KeyboardInterrupt, "Hi", KeyboardInterrupt, KeyboardInterrupt)
    assert run_chat(session, script, clock=_clock(100.0, 100.0 + LEAVE_WINDOW + 0.5, 103.0, 103.5)) == 0
    assert session.conversation.asked == [("Hi", True)] and err.getvalue().count(LEAVE_HINT) == 3


def test_sigint_raises_only_while_armed():
    """A real SIGINT to this process: dropped outside armed sections (the race after an answer), raised inside."""
    import os
    import signal

    interrupts = Interrupts()
    with interrupts.installed():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs between bytecodes
        assert interrupts.dropped == 1
        with pytest.raises(KeyboardInterrupt), interrupts.armed():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_failed_turn_leaves_no_trace_and_the_chat_goes_on(capsys):
    from cascade_local.errors import UsageError

    chat = ScriptedConversation()
    session, err = _session(chat)
    chat.fail = UsageError("prompt of 9000 tokens does not fit the context")
    assert run_chat(session, _script("Too long", "Short", "/exit")) == 0
    assert "error: prompt of 9000 tokens does not fit the context" in err.getvalue()
    assert [m["content"] for m in chat.messages if m["role"] == "user"] == ["Short"]


def test_ctrl_c_during_an_answer_keeps_the_conversation(capsys):
    class Interrupting(ScriptedConversation):
        def reply(self, text, settings, progress=None):
            self.messages.append({"role": "user", "content": text})
            try:
                yield Event(None, "content", "Half an ans")
                raise KeyboardInterrupt
            finally:
                self.last = None
                self.messages.append({"role": "assistant", "content": "Half an ans"})

    session, err = _session(Interrupting())
    assert run_chat(session, _script("Long question", "/exit")) == 0
    assert "stopped" in err.getvalue()
    assert session.conversation.messages[-1] == {"role": "assistant", "content": "Half an ans"}
    assert capsys.readouterr().out == "Half an ans\n"


def test_load_keeps_the_command_line_settings_unless_asked(tmp_path):
    """The chat's own settings (as its command line set them) survive /load; /load FILE --settings takes the file's."""
    saved = tmp_path / "chat.json"
    transcript.save(_conversation(HISTORY, "Saved system."), TurnSettings(True, 64, 99, SamplingParams(seed=5)),
                    saved)
    session, err = _session()
    session.settings = TurnSettings(False, None, 77, SamplingParams(temperature=0.2))
    session.conversation.system = "From the command line."
    assert run_chat(session, _script(f"/load {saved}", "/settings", "/system", "/think", "/thinking", "/tools")) == 0
    assert session.conversation.messages == HISTORY
    assert session.settings == TurnSettings(False, None, 77, SamplingParams(temperature=0.2))
    log = err.getvalue()
    assert "settings kept (/load FILE --settings takes the file's)" in log
    assert "thinking off · budget off · max tokens 77 · reasoning shown · tools off" in log
    assert "sampling: temperature 0.2, top-p 0.95, top-k 0, min-p 0, repeat penalty 1, seed random" in log
    assert log.count("system prompt: From the command line.") == 2  # /settings, then /system
    assert "\nthinking off\n" in log and "\nreasoning shown\n" in log and "\ntools off\n" in log

    assert run_chat(session, _script(f"/load {saved} --settings", "/system off", "/system")) == 0
    assert session.settings == TurnSettings(True, 64, 99, SamplingParams(seed=5))
    assert "with its settings" in err.getvalue() and "no system prompt" in err.getvalue()


def read_terminal(master: int) -> bytes:
    """Everything written to a pseudo-terminal whose other end has been closed."""
    import os

    screen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal's other end is closed and everything was read
            return screen
        if not chunk:
            return screen
        screen += chunk


def test_the_thought_summary_gives_the_engines_count(tiny_gguf):
    """One source for token counts: "thought for N tokens" on a terminal is the Result's reasoning_tokens.

    A scripted token stream through the real engine: multi-byte characters split over tokens and the closing
    tag give fewer reasoning pieces than tokens, so counting pieces would disagree with the stats line.
    """
    import os
    import pty

    from cascade_local.cli.chat import TurnView
    from cascade_local.engine import Engine, Request
    from cascade_local.llama_model import LoadedModel
    from cascade_local.oneshot import build_messages, render_prompt
    from cascade_local.testing.scripted import ScriptedSampler

    model = LoadedModel(tiny_gguf("q8_0"))
    thought, answer = model.tokenize("café 👍🏽 हिन्दी plan"), model.tokenize("Paris")
    think_close, im_end = 13, 11
    engine = Engine(model, n_ctx=256, threads=2,
                    sampler_factory=lambda _: ScriptedSampler([*thought, think_close, *answer, im_end]))
    tokens = model.encode_prompt(render_prompt(model.template, build_messages("Capital?"), thinking=True))
    master, slave = pty.openpty()  # a real terminal for the live block
    try:
        with engine, open(slave, "w", encoding="utf-8", closefd=True) as tty:
            view = TurnView(Console(file=io.StringIO()), Console(file=tty, force_terminal=True, width=100),
                            thinking=True, show_thinking=False)
            result = None
            for event in engine.stream(Request(tokens, max_tokens=50, in_reasoning=True)):
                if event.kind == "done":
                    result = event.result
                else:
                    view.feed(event)
            view.close(result, False)
        screen = read_terminal(master)
    finally:
        os.close(master)
    assert result is not None and result.content == "Paris" and result.reasoning_tokens == len(thought) + 1
    counts = re.findall(r"thought for (\d+) tokens", screen.decode("utf-8", "replace"))
    assert counts == [str(result.reasoning_tokens)]


@pytest.mark.parametrize("thinking", [True, False])
def test_a_long_document_shows_its_reading_progress_in_the_live_block(tiny_gguf, thinking):
    """A /read document is read by the real engine; the live block (the thinking one, or the answer's spinner)
    says how far, and the numbers are the engine's batches of 512 tokens."""
    import os
    import pty

    from cascade_local.cli.chat import TurnView
    from cascade_local.engine import Engine
    from cascade_local.llama_model import LoadedModel

    master, slave = pty.openpty()
    try:
        with Engine(LoadedModel(tiny_gguf("q8_0")), n_ctx=4096, threads=2, owns_model=True) as engine, \
                open(slave, "w", encoding="utf-8", closefd=True) as tty:
            terminal = Console(file=tty, force_terminal=True, width=120)
            chat = Conversation(engine)
            chat.attach("word " * 600)  # about 3,000 tokens
            view = TurnView(terminal, terminal, thinking=thinking, show_thinking=False)
            seen: list[tuple[int, int]] = []

            def progress(done: int, total: int) -> None:
                seen.append((done, total))
                view.reading(done, total)

            settings = TurnSettings(thinking=thinking, max_tokens=2, sampling=SamplingParams(temperature=0))
            for event in chat.reply("How many words?", settings, progress=progress):
                view.feed(event)
            view.close(chat.last, False)
        screen = read_terminal(master)
    finally:
        os.close(master)
    text = screen.decode("utf-8", "replace")
    total = seen[-1][1]
    assert total > 2048 and seen[0] == (512, total) and seen[-1] == (total, total)
    assert f"reading the prompt: 512/{total:,} tokens" in text
    assert re.search(rf"reading the prompt: 1,024/{total:,} tokens, [\d,]+ tokens/s, \d+ s left", text)
