"""`cascade-local run`: prompt assembly (no model), the library on the tiny model, and the real CLI in pipes."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess

import pytest
from conftest import CLI, run_cli

from cascade_local import oneshot
from cascade_local.chat_template import ChatTemplate
from cascade_local.engine import Engine, Event, Result
from cascade_local.errors import UsageError
from cascade_local.llama_model import LoadedModel, default_template
from cascade_local.testing.scripted import ScriptedSampler

ANSI = re.compile(r"\x1b\[")
THINK_OPEN, THINK_CLOSE, IM_END = 12, 13, 11
GREEDY = ("--temperature", "0", "--threads", "2")


@pytest.fixture(autouse=True)
def own_home(tmp_path, monkeypatch):
    """No user models.toml: the registry is the shipped one."""
    monkeypatch.setenv("CASCADE_LOCAL_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def model(tiny_gguf) -> LoadedModel:
    return LoadedModel(tiny_gguf("q8_0"))


# -- what the user typed, without a model ------------------------------------------------------------


def test_positionals_one_argument_is_the_prompt_unless_it_names_a_model(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    split = oneshot.split_positionals
    assert split("Hello", None) == (None, "Hello")
    assert split("Explain the theory of relativity", None) == (None, "Explain the theory of relativity")
    assert split(str(gguf), None) == (str(gguf), None)
    assert split("missing.gguf", None) == ("missing.gguf", None)  # so the user hears it is missing
    assert split("explain model.gguf", None) == (None, "explain model.gguf")  # words: a prompt that names a file
    assert split("nemotron-cascade-2", None) == ("nemotron-cascade-2", None)
    assert split("Hello", "World") == ("Hello", "World")  # two arguments: always MODEL PROMPT
    assert split(None, None) == (None, None)
    long = "why " * 2000  # longer than a file name may be: stat() fails with ENAMETOOLONG
    assert split(long, None) == (None, long)


def test_stdin_is_the_context_and_the_argument_the_instruction(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("FILE CONTEXT\n", encoding="utf-8")
    assert oneshot.compose_prompt("Summarize", "STDIN TEXT\n") == "STDIN TEXT\n\nSummarize"
    assert oneshot.compose_prompt(None, "only stdin\n") == "only stdin"
    assert oneshot.compose_prompt("only arg") == "only arg"
    assert oneshot.compose_prompt("Q", "S", [notes]) == "FILE CONTEXT\n\nS\n\nQ"
    assert oneshot.compose_prompt(None, "  \n", [notes]) == "FILE CONTEXT"
    for empty in [(None, None), ("", "\n\n"), ("  ", None)]:
        with pytest.raises(UsageError, match="no prompt"):
            oneshot.compose_prompt(*empty)


def test_prompt_files_must_be_utf8(tmp_path):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(UsageError, match="not UTF-8"):
        oneshot.compose_prompt("x", None, [latin])


def test_rendered_prompt_holds_system_context_and_instruction():
    template = ChatTemplate(default_template())
    prompt = oneshot.compose_prompt("INSTRUCTION", "CONTEXT\n")
    thinking = oneshot.render_prompt(template, oneshot.build_messages(prompt, "SYSTEM"), thinking=True)
    assert "CONTEXT\n\nINSTRUCTION" in thinking and "SYSTEM" in thinking
    assert thinking.index("SYSTEM") < thinking.index("CONTEXT")
    assert thinking.endswith("<think>\n")
    instruct = oneshot.render_prompt(template, oneshot.build_messages(prompt), thinking=False)
    assert instruct.endswith("<think></think>")


def test_sampling_defaults_come_from_the_registry_per_mode():
    assert oneshot.sampling_for(True).temperature == 1.0
    assert oneshot.sampling_for(False).temperature == 0.6
    given = oneshot.sampling_for(False, temperature=0.0, top_k=40, seed=7)
    assert (given.temperature, given.top_p, given.top_k, given.seed) == (0.0, 0.95, 40, 7)


def test_answer_pieces_are_trimmed_to_the_result():
    pieces = ["\n\n", "  Hello", " world", "\n", "\n", "again", "  \n"]
    events = [Event(None, "reasoning", "thought"), *(Event(None, "content", p) for p in pieces),
              Event(None, "done", result=Result(content="".join(pieces).strip()))]
    out = list(oneshot.trim_content(events))
    assert "".join(e.text for e in out if e.kind == "content") == "Hello world\n\nagain"
    assert out[0].kind == "reasoning" and out[-1].kind == "done"


def test_raw_and_system_do_not_mix():
    with pytest.raises(UsageError, match="--raw"):
        oneshot.OneShot("x", system="s", raw=True)


# -- the library on the tiny model -------------------------------------------------------------------


def test_raw_prompt_is_tokenized_as_is_and_all_output_is_content(model):
    words = model.tokenize(" and so")
    script = [*words, THINK_OPEN, *words, THINK_CLOSE, *words, IM_END]
    engine = Engine(model, n_ctx=256, threads=2, sampler_factory=lambda _: ScriptedSampler(script))
    job = oneshot.OneShot("Once upon a time", raw=True)
    assert oneshot.build_request(engine, job).prompt_tokens == model.encode_prompt("Once upon a time")
    events = list(oneshot.stream(engine, job))
    assert {e.kind for e in events} == {"content", "done"}
    text = "".join(e.text for e in events if e.kind == "content")
    assert text == " and so<think> and so</think> and so"
    result = events[-1].result
    assert result.content == text.strip() and result.reasoning == "" and result.reasoning_tokens == 0


def test_chat_prompt_goes_through_the_template(model):
    engine = Engine(model, n_ctx=512, threads=2)
    job = oneshot.OneShot("Hi", system="Be brief", thinking=False, max_tokens=4,
                          sampling=oneshot.sampling_for(False, temperature=0))
    request = oneshot.build_request(engine, job)
    expected = oneshot.render_prompt(model.template, oneshot.build_messages("Hi", "Be brief"), thinking=False)
    assert request.prompt_tokens == model.encode_prompt(expected) and not request.in_reasoning
    result = oneshot.generate(engine, job)
    assert result.completion_tokens <= 4 and result.reasoning == ""


# -- the command, in pipes ---------------------------------------------------------------------------


def test_json_output_with_a_file_stdin_and_an_instruction(tiny_gguf, model, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("Some notes.\n", encoding="utf-8")
    result = run_cli("run", str(tiny_gguf("q8_0")), "Summarize", "-f", str(notes), "--json", "--max-tokens", "12",
                     "--system", "Be brief", *GREEDY, input="A diff.\n")
    # The tiny model spends all 12 tokens thinking: the object is printed, and the exit says there is no answer.
    assert result.returncode == 3, result.stderr
    assert result.stderr == NO_ANSWER.format(n=12) and result.stdout.count("\n") == 1 and not ANSI.search(result.stdout)
    out = json.loads(result.stdout)
    assert set(out) == {"content", "reasoning", "usage", "timings", "finish_reason", "model"}
    assert set(out["usage"]) == {"prompt_tokens", "completion_tokens", "reasoning_tokens", "cached_tokens"}
    assert set(out["timings"]) == {"prompt_tokens_per_second", "generation_tokens_per_second", "prompt_seconds",
                                   "generation_seconds"}
    assert out["model"] == "tiny-q8_0.gguf" and out["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 12 and out["usage"]["reasoning_tokens"] == 12  # thinking is on
    # The command built the prompt the library builds: file, stdin, then the instruction.
    text = oneshot.render_prompt(model.template, oneshot.build_messages("Some notes.\n\nA diff.\n\nSummarize",
                                                                        "Be brief"), thinking=True)
    assert out["usage"]["prompt_tokens"] == len(model.encode_prompt(text))


def test_show_thinking_sends_the_reasoning_to_stderr_only(tiny_gguf):
    args = ("run", str(tiny_gguf("q8_0")), "Hello", "--max-tokens", "12", *GREEDY)
    as_json = json.loads(run_cli(*args, "--json", input="").stdout)
    shown = run_cli(*args, "--show-thinking", input="")
    assert shown.returncode == 3, shown.stderr
    assert as_json["reasoning"] and as_json["content"] == ""  # the tiny model spends all 12 tokens thinking
    assert shown.stdout == "" and as_json["reasoning"] in shown.stderr
    hidden = run_cli(*args, input="")
    assert hidden.stdout == "" and hidden.stderr == NO_ANSWER.format(n=12)


NO_ANSWER = ("error: stopped after {n} tokens while reasoning, before any answer: raise --max-tokens or set "
             "--budget\n")


def test_an_answer_cut_off_while_thinking_is_said_and_exits_3(tiny_gguf):
    result = run_cli("run", str(tiny_gguf("q8_0")), "hi", "--max-tokens", "8", *GREEDY, input="")
    assert (result.returncode, result.stdout, result.stderr) == (3, "", NO_ANSWER.format(n=8))
    # The same limit with thinking off answers: the exit is 0.
    answered = run_cli("run", str(tiny_gguf("q8_0")), "hi", "--max-tokens", "8", "--no-think", *GREEDY, input="")
    assert answered.returncode == 0 and answered.stdout.strip() and answered.stderr == ""


def test_repeat_penalty_answers(tiny_gguf):
    result = run_cli("run", str(tiny_gguf("q8_0")), "Hello", "--no-think", "--max-tokens", "4", "--repeat-penalty",
                     "1.3", "--top-k", "5", "--min-p", "0.05", "--threads", "2", input="")
    assert result.returncode == 0 and result.stdout.strip() and "Traceback" not in result.stderr, result.stderr


def test_answer_streams_plain_to_stdout(tiny_gguf):
    result = run_cli("run", str(tiny_gguf("q8_0")), "Hello", "--no-think", "--max-tokens", "16", *GREEDY, input="")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and result.stdout.endswith("\n") and not result.stdout.startswith(("\n", " "))
    assert not ANSI.search(result.stdout) and result.stderr == ""


def test_head_closing_the_pipe_ends_quietly(tiny_gguf, tmp_path):
    # Greedy on the tiny model writes a newline within the first few tokens: `head` exits, and the
    # thousands of tokens after it meet a closed pipe.
    command = shlex.join([*CLI, "run", str(tiny_gguf("q8_0")), "Hello", "--no-think", "--max-tokens", "3000",
                          *GREEDY])
    script = f"{command} </dev/null 2>err.txt | head -1; echo \"status=${{PIPESTATUS[0]}}\"; cat err.txt"
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "NO_COLOR": "1"})
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and lines[0].strip() and lines[1] == "status=0", done.stdout
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.parametrize(("args", "code", "message"), [
    (("run", "{model}"), 1, "no prompt"),
    (("run", "{model}", "Hi", "--temperature", "-1"), 1, "--temperature"),
    (("run", "/nonexistent/model.gguf", "Hi"), 2, "does not exist"),
])
def test_exit_codes(tiny_gguf, args, code, message):
    result = run_cli(*(a.format(model=tiny_gguf("q8_0")) for a in args), input="")
    assert result.returncode == code and message in result.stderr and result.stdout == ""
    assert "Traceback" not in result.stderr


def test_a_lone_prompt_uses_the_default_model(tmp_path):
    env = {"CASCADE_LOCAL_HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = run_cli("run", "Hello there", env=env, input="")
    message = " ".join(result.stderr.split())
    assert result.returncode == 2 and "nvidia/Nemotron-Cascade-2-30B-A3B" in message
    assert "cascade-local chat" not in message and "give its path in place of the model name" in message


def test_help_has_an_example():
    result = run_cli("run", "--help")
    assert result.returncode == 0 and "Example: cascade-local run" in result.stdout



def test_a_prompt_too_long_for_the_context_says_so_in_one_line(tiny_gguf):
    result = run_cli("run", str(tiny_gguf("q8_0")), "word " * 400, "--ctx", "256", "--threads", "2", input="")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.search(r"prompt of \d+ tokens does not fit the context \(256 tokens\)$", result.stderr.strip()), \
        result.stderr  # not "shared by 1 sequences"


def test_ctrl_c_mid_answer_ends_the_answer_line_before_the_notice(tiny_gguf):
    import signal
    import time

    child = subprocess.Popen([*CLI, "run", str(tiny_gguf("q8_0")), "Hello", "--no-think", "--ignore-eos",
                              "--max-tokens", "1000000", "--threads", "2"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "NO_COLOR": "1"})
    try:
        assert child.stdout is not None
        os.set_blocking(child.stdout.fileno(), False)
        seen, deadline = b"", time.monotonic() + 60
        while len(seen.strip()) < 20 and time.monotonic() < deadline:  # the answer is streaming
            seen += child.stdout.read() or b""
            time.sleep(0.02)
        child.send_signal(signal.SIGINT)
        child.wait(timeout=30)
        os.set_blocking(child.stdout.fileno(), True)
        seen += child.stdout.read()
        stderr = child.stderr.read().decode() if child.stderr else ""
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr, stderr
    assert seen.strip() and seen.endswith(b"\n")
