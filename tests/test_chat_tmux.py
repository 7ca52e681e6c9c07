"""`cascade-local chat` in a real terminal: tmux runs it, send-keys types, capture-pane reads the screen.

This is the path people use (prompt_toolkit input, live Markdown, the collapsing reasoning block, Ctrl-C), which
the pipe-driven tests in test_cli.py never reach.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

TMUX = shutil.which("tmux")
pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed")

STATS = re.compile(r"^\d+ tokens \(\d+ thinking\), [\d.]+ tok/s", re.M)
THOUGHT = re.compile(r"^thought for \d+ tokens?, \d+\.\d s$", re.M)


class Pane:
    """A detached tmux session on a private socket, running one command."""

    def __init__(self, socket: Path, command: str, width: int = 120, height: int = 40):
        self.socket = socket
        self.tmux("new-session", "-d", "-s", "chat", "-x", str(width), "-y", str(height), command)

    def tmux(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([TMUX, "-S", str(self.socket), *args], capture_output=True, text=True, timeout=10)

    def screen(self) -> str:
        """The scrollback and the screen, wrapped lines joined."""
        return self.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "chat").stdout

    def type(self, text: str, enter: bool = True) -> None:
        self.tmux("send-keys", "-t", "chat", "-l", text)
        if enter:
            time.sleep(0.2)  # let prompt_toolkit take the text (and its completion menu) before Enter
            self.tmux("send-keys", "-t", "chat", "Enter")

    def key(self, name: str) -> None:
        self.tmux("send-keys", "-t", "chat", name)

    def alive(self) -> bool:
        return self.tmux("has-session", "-t", "chat").returncode == 0

    def wait(self, check, what: str, timeout: float = 30) -> str:
        """Polls the screen until check(screen) is true."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if check(screen):
                return screen
            if not self.alive():
                pytest.fail(f"the chat ended while waiting for {what}")
            time.sleep(0.05)
        pytest.fail(f"timed out waiting for {what}; the screen:\n{self.screen()}")

    def wait_prompts(self, n: int) -> str:
        return self.wait(lambda s: len(re.findall(r"^>>>", s, re.M)) >= n, f"prompt number {n}")

    def close(self) -> None:
        self.tmux("kill-server")


def start_chat(tmp_path: Path, model: Path, *extra: str, tag: str = "") -> tuple[Pane, Path, Path]:
    """A chat in its own tmux server; chats started with different tags share the home folder."""
    home = tmp_path / "home"
    rc = tmp_path / f"rc{tag}"
    command = " ".join(shlex.quote(a) for a in [
        "env", "-u", "NO_COLOR", "-u", "FORCE_COLOR", "-u", "COLUMNS", "-u", "LINES", f"CASCADE_LOCAL_HOME={home}",
        sys.executable, "-m", "cascade_local", "chat", str(model), "--temperature", "0", "--threads", "2", *extra])
    # The exit code is written to a file: the session itself ends with the chat.
    return Pane(tmp_path / f"tmux{tag}.sock", f"{command}; echo $? > {shlex.quote(str(rc))}"), home, rc


@pytest.fixture
def chat_pane(tmp_path, tiny_gguf):
    pane, home, rc = start_chat(tmp_path, tiny_gguf("q8_0"), "--max-tokens", "5000")
    try:
        yield pane, home, rc
    finally:
        pane.close()


@pytest.fixture
def endless_chat_pane(tmp_path, tiny_gguf):
    """Answers that never end by themselves (--ignore-eos), so Ctrl-C always lands mid-answer."""
    pane, home, rc = start_chat(tmp_path, tiny_gguf("q8_0"), "--max-tokens", "10000000", "--ignore-eos",
                                "--no-think")
    try:
        yield pane, home, rc
    finally:
        pane.close()


def test_chat_in_a_real_terminal(chat_pane, tmp_path):
    pane, home, rc = chat_pane
    pane.wait_prompts(1)

    # A turn with thinking: the reasoning block collapses to its summary, then the stats line.
    pane.type("Hello")
    screen = pane.wait(lambda s: len(STATS.findall(s)) >= 1, "the first stats line")
    assert THOUGHT.search(screen), screen
    assert "thinking…" not in screen  # the live label is gone once the block collapsed

    # Without thinking: an answer appears between the question and the stats line.
    pane.type("/think off")
    pane.wait(lambda s: "thinking off" in s, "thinking off")
    pane.type("Hi again")
    screen = pane.wait(lambda s: len(STATS.findall(s)) >= 2, "the second stats line")
    turn = screen.split(">>> Hi again", 1)[1]
    answer = turn[:STATS.search(turn).start()]
    assert answer.strip(), screen

    # Completion: /sta + Tab becomes /stats (typed once the next prompt is up, not into the finishing answer).
    pane.wait(lambda s: re.search(r"^>>>\s*$", s, re.M), "the next empty prompt")
    pane.type("/sta", enter=False)
    time.sleep(0.3)
    pane.key("Tab")
    pane.wait(lambda s: re.search(r"^>>> /stats\s*$", s, re.M), "the completed /stats")
    pane.key("Enter")
    screen = pane.wait(lambda s: "session: 2 answers" in s, "/stats")
    assert re.search(r"last answer: \d+ tokens", screen) and re.search(r"memory: [\d.]+ \w+ resident", screen)
    assert "placement: " in screen

    saved = tmp_path / "saved chat.json"
    pane.type(f'/save "{saved}"')
    pane.wait(lambda s: "saved 4 messages" in s, "/save")
    data = json.loads(saved.read_text(encoding="utf-8"))
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"] * 2
    assert data["messages"][2]["content"] == "Hi again" and data["settings"]["thinking"] is False

    # The input history is kept under CASCADE_LOCAL_HOME.
    assert "+Hi again" in (home / "chat_history").read_text(encoding="utf-8")

    pane.type("/exit")
    deadline = time.monotonic() + 15
    while pane.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pane.alive(), "the chat did not end after /exit"
    assert rc.read_text().strip() == "0"


def test_ctrl_c_stops_an_answer_and_keeps_the_conversation(endless_chat_pane, tmp_path):
    pane, _, rc = endless_chat_pane
    pane.wait_prompts(1)
    pane.type("hi")
    pane.wait(lambda s: ">>> hi\n" in s and len(s.split(">>> hi\n", 1)[1].strip()) > 20, "the answer to start")
    pane.key("C-c")
    # A stopped answer has its footer, and counts in /stats, as stopped.
    screen = pane.wait(lambda s: re.search(r"^stopped: \d+ tokens \(0 thinking\), [\d.]+ tok/s.*\n>>>", s, re.M),
                       "stopped with its stats line, and the prompt")
    shown = int(re.search(r"^stopped: (\d+) tokens", screen, re.M).group(1))
    assert shown > 0
    pane.type("/stats")
    pane.wait(lambda s: re.search(rf"session: 1 answer \(1 stopped\), {shown} tokens generated", s),
              "the stopped answer in /stats")
    saved = tmp_path / "after.json"
    pane.type(f'/save "{saved}"')
    pane.wait(lambda s: "saved 2 messages" in s, "/save")
    messages = json.loads(saved.read_text(encoding="utf-8"))["messages"]
    assert messages[0]["content"] == "hi" and messages[1]["role"] == "assistant" and messages[1]["content"]
    pane.type("/exit")
    deadline = time.monotonic() + 15
    while pane.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pane.alive() and rc.read_text().strip() == "0"


def _wait_exit(pane: Pane, rc: Path, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while pane.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pane.alive(), "the chat did not end"
    return rc.read_text().strip()


def _still_alive(pane: Pane, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert pane.alive(), "the chat ended"
        time.sleep(0.05)


LEAVE_HINT = "Ctrl-C again or Ctrl-D to leave"


@pytest.fixture
def quick_chat_pane(tmp_path, tiny_gguf):
    """Short answers without thinking: an answer ends a few milliseconds after the question."""
    pane, home, rc = start_chat(tmp_path, tiny_gguf("q8_0"), "--max-tokens", "8", "--no-think")
    try:
        yield pane, home, rc
    finally:
        pane.close()


def test_ctrl_c_at_the_prompt_clears_the_line_then_warns_before_leaving(quick_chat_pane):
    pane, _, rc = quick_chat_pane
    pane.wait_prompts(1)
    pane.type("half a thought", enter=False)
    pane.wait(lambda s: re.search(r"^>>> half a thought", s, re.M), "the typed text")
    pane.key("C-c")  # typed text: the line is cleared, nothing else happens
    pane.wait(lambda s: not re.search(r"^>>> half a thought", s, re.M), "the cleared line")
    _still_alive(pane, 0.5)
    assert LEAVE_HINT not in pane.screen()

    pane.key("C-c")  # an empty line: a warning only
    pane.wait(lambda s: s.count(LEAVE_HINT) == 1, "the warning")
    _still_alive(pane, 2.5)  # a second Ctrl-C after the window only warns again
    pane.key("C-c")
    pane.wait(lambda s: s.count(LEAVE_HINT) == 2, "the second warning")
    _still_alive(pane, 0.3)
    pane.key("C-c")  # within the window: the chat ends, as a normal exit
    assert _wait_exit(pane, rc) == "0"


def test_ctrl_d_leaves_at_once(quick_chat_pane):
    pane, _, rc = quick_chat_pane
    pane.wait_prompts(1)
    pane.key("C-d")
    assert _wait_exit(pane, rc, timeout=5) == "0"


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.15, 0.3])
def test_a_ctrl_c_just_after_an_answer_never_ends_the_chat(quick_chat_pane, delay):
    """The race: Ctrl-C meant for an answer that has already ended, landing between turns or on the prompt."""
    pane, _, rc = quick_chat_pane
    pane.wait_prompts(1)
    for n in range(1, 4):
        pane.type(f"question {n}")
        time.sleep(delay)
        pane.key("C-c")
        pane.wait_prompts(n + 1)
        _still_alive(pane, 0.3)
    # Once the answer's stats line is on the screen: the next Ctrl-C lands on the fresh prompt.
    pane.type("question 4")
    pane.wait(lambda s: re.search(r"^>>> question 4\n(.*\n)*.*tok/s", s, re.M), "the answer to question 4")
    pane.key("C-c")
    pane.wait(lambda s: LEAVE_HINT in s.split(">>> question 4", 1)[1], "the warning")
    _still_alive(pane, 0.3)
    pane.type("question 5")  # the chat goes on
    pane.wait(lambda s: re.search(r"^>>> question 5\n(.*\n)*.*tok/s", s, re.M), "the answer to question 5")
    pane.type("/exit")
    assert _wait_exit(pane, rc) == "0"


def _history(home: Path):
    from cascade_local.history import HistoryStore, connect

    return HistoryStore(connect(home / "history.db"))


def test_a_chat_killed_with_kill_9_keeps_every_finished_message(endless_chat_pane, tmp_path, tiny_gguf):
    import os
    import signal

    import psutil
    from conftest import run_cli

    pane, home, _ = endless_chat_pane
    pane.wait_prompts(1)
    pane.type("first question")
    pane.wait(lambda s: len(s.split(">>> first question\n", 1)[-1].strip()) > 20, "the first answer")
    pane.key("C-c")  # an answer stopped by Ctrl-C is a finished message: it stays
    pane.wait_prompts(2)
    pane.type("second question")
    pane.wait(lambda s: len(s.split(">>> second question\n", 1)[-1].strip()) > 20, "the second answer")
    shell = psutil.Process(int(pane.tmux("display", "-p", "-t", "chat", "#{pane_pid}").stdout))
    [chat] = [p for p in shell.children(recursive=True) if "cascade_local" in " ".join(p.cmdline())]
    os.kill(chat.pid, signal.SIGKILL)  # mid-answer
    chat.wait(10)

    [summary] = _history(home).summaries()
    stored = _history(home).get(summary.id)
    assert [(m["role"], m["content"][:15]) for m in stored.messages[::2]] == [
        ("user", "first question"), ("user", "second question")]
    assert stored.messages[1]["role"] == "assistant" and stored.messages[1]["content"]
    assert len(stored.messages) == 3  # only the answer in progress is lost

    resumed = run_cli("chat", str(tiny_gguf("q8_0")), "--continue", "--max-tokens", "4", "--no-think",
                      input="third question\n", env={"CASCADE_LOCAL_HOME": str(home)})
    assert resumed.returncode == 0, resumed.stderr
    assert f"conversation {summary.id} (2 questions, 3 messages)" in resumed.stderr
    after = _history(home).get(summary.id).messages
    assert [m["content"] for m in after[:3]] == [m["content"] for m in stored.messages]
    assert [m["role"] for m in after[3:]] == ["user", "assistant"] and after[3]["content"] == "third question"


def test_two_chats_at_once_each_keep_their_own_conversation(tmp_path, tiny_gguf):
    model = tiny_gguf("q8_0")
    panes = [start_chat(tmp_path, model, "--max-tokens", "8", "--no-think", tag=tag)[0] for tag in ("a", "b")]
    try:
        for pane in panes:
            pane.wait_prompts(1)
        for n in range(1, 4):
            for name, pane in zip("ab", panes, strict=True):
                pane.type(f"chat {name} question {n}")
        for pane in panes:
            pane.wait_prompts(4)
            pane.wait(lambda s: len(STATS.findall(s)) >= 3, "three answers")
    finally:
        for pane in panes:
            pane.close()
    store = _history(tmp_path / "home")
    summaries = store.summaries()
    assert sorted(s.first for s in summaries) == ["chat a question 1", "chat b question 1"]
    for s in summaries:
        name = s.first.split()[1]
        messages = store.get(s.id).messages
        assert [m["content"] for m in messages[::2]] == [f"chat {name} question {n}" for n in (1, 2, 3)]
        assert all(m["role"] == "assistant" and m["completion_tokens"] == 8 for m in messages[1::2])


def _sent_messages(home: Path) -> list[str]:
    [summary] = _history(home).summaries()
    return [m["content"] for m in _history(home).get(summary.id).messages if m["role"] == "user"]


def test_a_block_is_sent_exactly_as_typed_and_as_pasted(quick_chat_pane):
    """Enter inside a \"\"\" block adds a bare newline: no indentation copied from the line above."""
    pane, home, rc = quick_chat_pane
    pane.wait_prompts(1)
    for line in ['"""', "a:", "    b", "c", 'd"""']:  # typed line by line
        pane.type(line)
    pane.wait_prompts(2)
    # A paste without bracketed paste (tmux paste-buffer) arrives as keys, newlines as Enter.
    pasted = 'def f(x):\n    if x:\n        return 1\n    return 2'
    pane.tmux("set-buffer", "-b", "code", f'"""\n{pasted}\n"""')
    pane.tmux("paste-buffer", "-b", "code", "-t", "chat")
    pane.wait(lambda s: s.rstrip().endswith('... """'), "the pasted block")
    pane.key("Enter")
    pane.wait_prompts(3)
    pane.type("/exit")
    assert _wait_exit(pane, rc) == "0"
    assert _sent_messages(home) == ["a:\n    b\nc\nd", pasted]


# -- wide characters in streamed Markdown, against a scripted server ------------------------------------------------

WIDE_ANSWER = """# नमस्ते दुनिया 👍🏽 🇮🇳 👨‍👩‍👧

यह एक अनुच्छेद है जिसमें हिंदी पाठ है और कुछ इमोजी 👍🏽 👨‍👩‍👧 🇮🇳 भी हैं, ताकि पंक्ति टर्मिनल की चौड़ाई से लंबी हो जाए और लपेटी जाए।

| भाषा | झंडा | परिवार |
|---|---|---|
| हिंदी | 🇮🇳 | 👨‍👩‍👧 |
| English | 🇬🇧 | 👍🏽 |

- पहला बिंदु ✔️ ❤️
- दूसरा बिंदु 🇮🇳 with some English words to make it long enough to wrap around the screen edge

## दूसरा शीर्षक 👨‍👩‍👧

Last line.
"""


def unique_words(text: str) -> list[str]:
    """The words of the Markdown source that occur once in it, without Markdown's own marks."""
    words = _words(text)
    return [w for w in words if w and words.count(w) == 1]


def _words(text: str) -> list[str]:
    return [w.strip("#|-*.,।•│┃─") for w in text.split()]


@pytest.fixture
def scripted_server(tmp_path):
    """A test double: an OpenAI-style server on 127.0.0.1 that streams WIDE_ANSWER, 2 characters per event."""
    def start(*extra: str) -> str:
        text, port = tmp_path / "answer.md", tmp_path / "port"
        text.write_text(WIDE_ANSWER, encoding="utf-8")
        proc = subprocess.Popen([sys.executable, "-m", "cascade_local.testing.scripted_server", str(text), str(port),
                                 "--chunk", "2", "--delay", "0.01", *extra])
        servers.append(proc)
        deadline = time.monotonic() + 15
        while not port.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the scripted server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{port.read_text()}/v1"

    servers: list[subprocess.Popen] = []
    yield start
    for proc in servers:
        proc.terminate()
        proc.wait(10)


def _answer_region(screen: str) -> str:
    return screen.split(">>> hi\n", 1)[1].split("\n>>>", 1)[0]


def _assert_each_word_once(screen: str) -> None:
    shown = _words(_answer_region(screen))
    counts = {w: shown.count(w) for w in unique_words(WIDE_ANSWER)}
    assert all(n == 1 for n in counts.values()), (
        f"words not shown exactly once: { {w: n for w, n in counts.items() if n != 1} }\n{screen}")


STREAM_DONE = re.compile(r"^\d+ tokens \(0 thinking\)", re.M)


def start_remote_chat(tmp_path: Path, url: str, width: int, height: int) -> Pane:
    return Pane(tmp_path / "remote.sock", " ".join(shlex.quote(a) for a in [
        "env", "-u", "NO_COLOR", "-u", "FORCE_COLOR", "-u", "COLUMNS", "-u", "LINES",
        f"CASCADE_LOCAL_HOME={tmp_path / 'home'}", sys.executable, "-m", "cascade_local", "chat", "--endpoint", url,
        "--no-think", "--no-log"]), width=width, height=height)


@pytest.mark.parametrize("size", [(100, 30), (60, 20)])
def test_streamed_markdown_with_wide_characters_shows_each_line_once(tmp_path, scripted_server, size):
    """Hindi and compound emoji, which rich and the terminal measure differently, streamed as Markdown."""
    pane = start_remote_chat(tmp_path, scripted_server(), *size)
    try:
        pane.wait_prompts(1)
        pane.type("hi")
        _assert_each_word_once(pane.wait(lambda s: STREAM_DONE.search(s), "the answer's stats line"))
    finally:
        pane.close()


@pytest.mark.parametrize("new_width", [40, 90])
def test_a_resize_while_an_answer_streams_leaves_no_stale_copy(tmp_path, scripted_server, new_width):
    # The server pauses in the middle of the paragraph, the terminal is resized then (reflowing the live region),
    # and the answer goes on at the new width. A resize while frames are being drawn races with them (the terminal
    # may reflow before it reads a frame written for the old width): that case is not covered.
    pane = start_remote_chat(tmp_path, scripted_server("--pause-after", "ताकि", "--pause", "5"), 60, 20)
    try:
        pane.wait_prompts(1)
        pane.type("hi")
        pane.wait(lambda s: "ताकि" in s, "the paragraph to stream")
        time.sleep(0.5)  # the frame showing it is complete: no frame is drawn while the stream pauses
        pane.tmux("resize-window", "-t", "chat", "-x", str(new_width))
        _assert_each_word_once(pane.wait(lambda s: STREAM_DONE.search(s), "the answer's stats line"))
    finally:
        pane.close()


def test_run_show_thinking_on_a_terminal_is_dim_and_labelled(tmp_path, tiny_gguf):
    done = tmp_path / "done"
    command = " ".join(shlex.quote(a) for a in [
        "env", "-u", "NO_COLOR", "-u", "FORCE_COLOR", f"CASCADE_LOCAL_HOME={tmp_path / 'home'}", sys.executable, "-m",
        "cascade_local", "run", str(tiny_gguf("q8_0")), "Hello", "--show-thinking", "--max-tokens", "12",
        "--temperature", "0", "--threads", "2"])
    pane = Pane(tmp_path / "run.sock", f"{command}; touch {shlex.quote(str(done))}; sleep 60", width=100, height=30)
    try:
        deadline = time.monotonic() + 60
        while not done.exists():
            assert time.monotonic() < deadline, pane.screen()
            time.sleep(0.1)
        styled = pane.tmux("capture-pane", "-p", "-e", "-t", "chat").stdout
        plain = pane.screen()
        assert re.search(r"^thinking$", plain, re.M), plain  # the label, on a line of its own
        reasoning = styled.split("thinking", 1)[1].split("tokens (", 1)[0]
        assert re.search(r"\x1b\[(\d+;)*2(;\d+)*m", reasoning), repr(styled)  # the reasoning is dim
    finally:
        pane.close()
