"""The `cascade-local` command as a user runs it: real processes, pipes (not terminals), real files."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import run_cli

from cascade_local import __version__

ANSI = re.compile(r"\x1b\[")


@pytest.fixture
def offline_home(tmp_path):
    """An empty user folder and Hub cache, so nothing is found locally."""
    return {"CASCADE_LOCAL_HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf")}


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"cascade-local {__version__}"


def test_every_command_has_help_with_an_example():
    from cascade_local.cli.app import _register, app

    _register()
    commands = [c.name for c in app.registered_commands]
    assert {"convert", "chat", "info", "plan", "pull", "list", "rm"} <= set(commands)
    for command in commands:
        result = run_cli(command, "--help")
        flat = " ".join(result.stdout.split())
        assert result.returncode == 0 and f"Example: cascade-local {command}" in flat, command


def test_convert_pipes_cleanly(tiny_dir, tmp_path):
    out = tmp_path / "tiny.gguf"
    result = run_cli("convert", str(tiny_dir), "-o", str(out), "--type", "q8_0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{out}\n"  # stdout: the payload only
    assert "total" in result.stderr and "Q8_0" in result.stderr and "MB/s" in result.stderr
    assert not ANSI.search(result.stdout + result.stderr)
    assert out.read_bytes()[:4] == b"GGUF"
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]


@pytest.mark.parametrize("how", ["offline_mode", "unreachable_endpoint"])
def test_chat_without_a_model_or_network_says_what_to_do(offline_home, how):
    env = dict(offline_home)
    if how == "offline_mode":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens on the discard port: refused at once
    result = run_cli("chat", env=env, input="", timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert "nvidia/Nemotron-Cascade-2-30B-A3B" in message
    assert "give its path in place of the model name (/path/to/model.gguf;" in message


def test_chat_with_a_file_that_is_not_gguf(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 not a model")
    result = run_cli("chat", str(bogus), input="")
    assert result.returncode == 2 and "is not a GGUF file" in result.stderr and "Traceback" not in result.stderr


def test_chat_with_a_checkpoint_folder_suggests_convert(tiny_dir):
    result = run_cli("chat", str(tiny_dir), input="")
    assert result.returncode == 1 and "convert it once with: cascade-local pull" in result.stderr


def test_chat_turn_and_thinking_toggle(tiny_gguf):
    script = "Hello\n/think off\nHi again\n/exit\n"
    result = run_cli("chat", str(tiny_gguf("q8_0")), "--max-tokens", "8", "--temperature", "0", input=script)
    assert result.returncode == 0, result.stderr
    assert "thinking off" in result.stderr
    assert result.stderr.count(">>> ") == 4 and ">>>" not in result.stdout  # one prompt per line read, on stderr
    # One line per answer on stdout. Thinking on: the 8 tokens are all reasoning (stderr). Off: they are the answer.
    first, second = result.stdout.split("\n", 1)
    assert first.strip() == "" and second.strip() != ""


def test_a_scripted_chat_writes_only_answers_to_stdout(tiny_gguf):
    script = '"""\nTwo lines\nof question\n"""\n'
    result = run_cli("chat", str(tiny_gguf("q8_0")), "--max-tokens", "8", "--no-think", "--temperature", "0",
                     input=script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and not result.stdout.startswith((">>>", "...")) and "..." not in result.stdout
    assert result.stderr.count(">>> ") == 2 and result.stderr.count("... ") == 3


@pytest.mark.parametrize(("line", "message"), [("/exitt", "unknown command /exitt"),
                                                ("/load /nonexistent/chat.json", "/nonexistent/chat.json")])
def test_a_script_with_a_failed_command_ends_non_zero(tiny_gguf, line, message):
    result = run_cli("chat", str(tiny_gguf("q8_0")), "--max-tokens", "4", "--no-think", "--temperature", "0",
                     input=f"{line}\nHi\n")
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert result.stdout.strip()  # the script went on after the error: "Hi" was answered


def test_chat_applies_placement_options(tiny_gguf):
    """On a CPU-only build every placement spelling still loads and answers."""
    script = "Hi\n/exit\n"
    for extra in (["--gpu-mem", "0"], ["--cpu-moe"], ["--override-tensor", r"blk\.\d+\.ffn_(up|down)_exps=CPU"]):
        result = run_cli("chat", str(tiny_gguf("q8_0")), "--max-tokens", "4", "--no-think", *extra, input=script)
        assert result.returncode == 0, (extra, result.stderr)


def test_chat_refuses_a_context_that_cannot_fit(tiny_gguf):
    result = run_cli("chat", str(tiny_gguf("q8_0")), "--ctx", "100000000", input="")
    # The planner's refusal (a PlanError, exit 2), naming the largest context that fits, before any load.
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "--ctx 100000000 with --parallel 1 does not fit" in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1


def test_chat_with_a_truncated_gguf(tiny_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf("q8_0").read_bytes()[:300_000])
    result = run_cli("chat", str(cut), input="")
    assert result.returncode == 2 and "is damaged" in result.stderr and "Traceback" not in result.stderr


def test_chat_with_another_architecture_names_it(llama_arch_gguf):
    result = run_cli("chat", str(llama_arch_gguf), input="")
    assert result.returncode == 2 and "is a llama model; cascade-local runs nemotron_h_moe" in result.stderr


@pytest.mark.parametrize("command", [["info", "{gguf}"], ["plan", "{gguf}"], ["convert", "--help"], ["--help"]])
def test_a_closed_pipe_ends_quietly(tiny_gguf, command):
    import shlex
    import subprocess
    import sys

    args = " ".join(shlex.quote(a.format(gguf=tiny_gguf("q8_0"))) for a in command)
    script = f"set -o pipefail; {shlex.quote(sys.executable)} -m cascade_local {args} | head -1"
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and len(result.stdout.splitlines()) <= 1


def test_sampling_and_thinking_options_are_spelled_the_same_everywhere():
    """One declaration each (cli/options.py): the same flags, with the same help, in chat, run and batch."""
    import typer.main

    from cascade_local.cli.app import _register, app

    _register()
    group = typer.main.get_command(app)
    shared = ["--temperature", "--top-p", "--top-k", "--min-p", "--repeat-penalty", "--seed", "--ignore-eos"]

    def options(name: str) -> dict[str, tuple[tuple[str, ...], str]]:
        return {opt: (tuple(p.opts + p.secondary_opts), p.help) for p in group.commands[name].params
                for opt in p.opts}

    chat, run, batch = options("chat"), options("run"), options("batch")
    for flag in shared:
        assert chat[flag] == run[flag] == batch[flag], flag
    assert chat["--show-thinking"] == run["--show-thinking"]
    assert chat["--show-thinking"][0] == ("--show-thinking", "--hide-thinking")


def test_chat_takes_the_shared_sampling_options(tiny_gguf):
    result = run_cli("chat", str(tiny_gguf("q8_0")), "--max-tokens", "4", "--no-think", "--top-k", "1", "--min-p",
                     "0.1", "--repeat-penalty", "1.1", "--show-thinking", input="Hi\n/settings\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "top-k 1, min-p 0.1, repeat penalty 1.1" in result.stderr and "reasoning shown" in result.stderr
    hidden = run_cli("chat", str(tiny_gguf("q8_0")), "--hide-thinking", "--ignore-eos", input="/settings\n")
    assert hidden.returncode == 0 and "reasoning hidden" in hidden.stderr and "ignore eos" in hidden.stderr


def test_chat_model_and_a_first_message(tiny_gguf):
    """`chat MODEL "first message"`, as `ollama run MODEL PROMPT`: asked at once, then the chat goes on."""
    result = run_cli("chat", str(tiny_gguf("q8_0")), "Hi there", "--max-tokens", "4", "--no-think", "--temperature",
                     "0", input="Again\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert ">>> Hi there\n" in result.stderr
    assert len(result.stdout.splitlines()) == 2 and all(line.strip() for line in result.stdout.splitlines())


@pytest.mark.parametrize("command", ["run", "chat", "batch"])
def test_help_keeps_bracketed_words(command):
    """Rich markup took "[endpoints]" for a style tag and printed "a URL or an  name"."""
    result = run_cli(command, "--help", env={"COLUMNS": "300"})
    assert result.returncode == 0
    assert "an [endpoints] name" in result.stdout and "an  name" not in result.stdout


def test_convert_force_names_the_option_it_overwrites():
    result = run_cli("convert", "--help", env={"COLUMNS": "300"})
    assert "Overwrite the --output file if it exists." in result.stdout


def test_a_chat_that_outgrows_its_context_leaves_out_the_oldest_turns(tiny_gguf, tmp_path):
    """--ctx 256: by the fourth long question the history cannot fit; the oldest turns make room, once said."""
    questions = [f"Question {i}: " + " ".join(f"word{i}x{j}" for j in range(5)) for i in range(5)]
    saved = tmp_path / "chat.json"
    script = "\n".join([*questions, "/stats", f"/save {saved}"]) + "\n"
    result = run_cli("chat", str(tiny_gguf("q8_0")), "--ctx", "256", "--max-tokens", "16", "--no-think",
                     "--temperature", "0", "--system", "Be brief.", "--no-log", input=script)
    assert result.returncode == 0, result.stderr
    assert "does not fit" not in result.stderr
    notices = re.findall(r"the context is full: the (\d+) oldest turns? left out of the prompt \(the system prompt "
                         r"stays\); /clear starts afresh", result.stderr)
    assert notices and all(int(n) >= 1 for n in notices), result.stderr
    assert len(result.stdout.splitlines()) == 5  # every question answered
    # Each stats line says how full the context was; /stats too, with the turns left out.
    fills = [int(p) for p in re.findall(r"context (\d+)% full \(\d+/256\)", result.stderr)]
    assert len(fills) == 6 and all(0 < p <= 100 for p in fills), result.stderr  # 5 answers, and /stats
    assert re.search(r"oldest turns? left out to fit \(/clear starts afresh\)", result.stderr)
    # The turns left out of the prompt stay in the conversation that is saved.
    messages = json.loads(saved.read_text(encoding="utf-8"))["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == questions


HELP_CHECK = """
import sys
from cascade_local.cli.app import main
for command in sys.argv[1:]:
    sys.argv = ["cascade-local", *command.split(), "--help"]
    try:
        main()
    except SystemExit as exc:
        assert exc.code == 0, (command, exc.code)
heavy = {"numpy", "gguf", "llama_cpp", "jinja2", "tokenizers", "httpx", "sqlite3", "prompt_toolkit", "yaml",
         "psutil", "safetensors"}
print(" ".join(sorted({name.split(".")[0] for name in sys.modules} & heavy)))
"""


def test_help_imports_none_of_the_heavy_libraries():
    """--help of every command stays quick: numpy, llama.cpp, jinja2... load when a command runs, not before.
    (bench/startup_bench.py measures the time; this checks the cause, which a timed test could not do reliably.)"""
    commands = ["", "convert", "info", "plan", "chat", "run", "batch", "pull", "list", "rm", "doctor", "eval",
                "serve", "logs", "logs show", "rpc-server", "cache", "cache list"]
    done = subprocess.run([sys.executable, "-c", HELP_CHECK, *commands], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "100"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "", f"imported by --help: {done.stdout.splitlines()[-1]}"


def test_short_options_mean_one_thing_in_every_command():
    """-f is --file (run), never --force; -o is --output; -m --model; -c --continue."""
    import typer.main

    from cascade_local.cli.app import _register, app

    _register()
    meaning: dict[str, set[str]] = {}

    def walk(command, path: str) -> None:
        for param in getattr(command, "params", []):
            names = [*param.opts, *param.secondary_opts]
            longs = [n for n in names if n.startswith("--")]
            for short in (n for n in names if n.startswith("-") and not n.startswith("--")):
                meaning.setdefault(short, set()).add(longs[0] if longs else f"{path} {param.name}")
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "cascade-local")
    assert meaning["-f"] == {"--file"}
    assert {short: longs for short, longs in meaning.items() if len(longs) > 1} == {}


@pytest.mark.parametrize("command", ["", "convert", "info", "plan", "chat", "run", "batch", "pull", "list", "rm",
                                     "doctor", "eval", "serve", "logs", "logs show", "rpc-server", "cache"])
def test_help_reads_cleanly(command):
    """No <bool> on flags; usage lines spell arguments NAME or [NAME]; paragraphs wrap to the terminal, not to
    the source file (at 1000 columns every paragraph of the description is one line)."""
    result = run_cli(*command.split(), "--help", env={"COLUMNS": "1000"})
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "<bool>" not in text
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    words = usage.split("[OPTIONS]", 1)[1].split()
    assert all(re.fullmatch(r"\[?[A-Z][A-Z_-]*\]?(\.\.\.)?", w) for w in words), usage
    description = text.split("Usage:", 1)[1].split("╭", 1)[0].splitlines()[1:]
    lines = [line.strip() for line in description]
    assert all(not (a and b) for a, b in itertools.pairwise(lines)), description  # no two text lines in a row
