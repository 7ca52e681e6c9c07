"""`cascade-local batch`: input parsing, the crash-safe output, resuming, and the real CLI killed mid-job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import CLI, run_cli

from cascade_local.batch import ItemSettings, OutputFile, open_batch, read_items, run_batch
from cascade_local.engine import Engine
from cascade_local.errors import UsageError
from cascade_local.llama_model import LoadedModel

GREEDY_SHORT = ItemSettings(max_tokens=4, temperature=0.0)  # with thinking: the tiny model is cut off reasoning
ANSWERING = ItemSettings(thinking=False, max_tokens=4, temperature=0.0)


def adds_up(summary) -> bool:
    return summary.items == summary.answered + summary.cut_off + summary.failed + summary.already_done


@pytest.fixture(autouse=True)
def own_home(tmp_path, monkeypatch):
    """No user models.toml: the registry is the shipped one."""
    monkeypatch.setenv("CASCADE_LOCAL_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def engine(tiny_gguf) -> Engine:
    return Engine(LoadedModel(tiny_gguf("q8_0")), n_ctx=1024, n_seq_max=2, threads=2)


def write_lines(path: Path, lines: list[str | dict]) -> Path:
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines), encoding="utf-8")
    return path


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().split(b"\n") if line]


# -- reading INPUT -----------------------------------------------------------------------------------


def test_plain_text_lines_are_prompts_numbered_from_one(tmp_path):
    items = read_items(write_lines(tmp_path / "in.txt", ["first", "", "  third  ", "fourth\r"]))
    assert [(i.id, i.line, i.error) for i in items] == [(1, 1, None), (3, 3, None), (4, 4, None)]
    assert items[1].messages == [{"role": "user", "content": "third"}]
    assert items[2].messages[0]["content"] == "fourth"


def test_jsonl_is_detected_by_extension_or_first_line(tmp_path):
    by_line = read_items(write_lines(tmp_path / "prompts.txt", ["", {"id": "a", "prompt": "x"}, "{broken"]))
    assert [(i.id, i.error is None) for i in by_line] == [("a", True), (None, False)]
    by_name = read_items(write_lines(tmp_path / "p.jsonl", ["not json", {"prompt": "x"}]))
    assert [(i.id, i.error is None) for i in by_name] == [(None, False), (2, True)]  # id defaults to the line


def test_bad_lines_become_errors_with_what_is_wrong(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [
        {"id": 1, "prompt": "fine", "think": False, "budget": 8, "max_tokens": 5, "temperature": 0, "top_p": 1,
         "seed": 3, "system": "S", "note": "unknown keys are kept out of the options"},
        "{not json",
        "[1, 2]",
        {"id": 2},
        {"id": 3, "prompt": "x", "messages": [{"role": "user", "content": "y"}]},
        {"id": 1, "prompt": "again"},
        {"id": 4, "prompt": "x", "temperature": "hot"},
        {"id": 5, "prompt": "x", "max_tokens": 0},
        {"id": 6, "prompt": "x", "seed": True},
        {"id": [6], "prompt": "x"},
        {"id": 7, "messages": [{"content": "no role"}]},
        {"id": 8, "messages": [{"role": "user", "content": "ok"}]},
    ])
    with path.open("ab") as f:
        f.write(b'{"id": 9, "prompt": "caf\xe9"}\n')  # Latin-1, not UTF-8
    items = {i.line: i for i in read_items(path)}
    assert items[1].error is None and items[1].options == {
        "thinking": False, "budget": 8, "max_tokens": 5, "temperature": 0, "top_p": 1, "seed": 3, "system": "S"}
    assert items[12].error is None and items[12].messages == [{"role": "user", "content": "ok"}]
    expected = {2: (None, "not valid JSON"), 3: (None, "not a JSON object"), 4: (2, "no \"prompt\""),
                5: (3, "not both"), 6: (1, "duplicate id 1 (first on line 1)"), 7: (4, "\"temperature\" must be"),
                8: (5, "out of range"), 9: (6, "\"seed\" must be an integer"), 10: (None, "id must be"),
                11: (7, "string \"role\""), 13: (None, "not valid JSON")}
    for line, (item_id, message) in expected.items():
        assert items[line].id == item_id and message in (items[line].error or ""), (line, items[line])


# -- OUTPUT ------------------------------------------------------------------------------------------


def test_a_half_written_last_line_is_cut_off(tmp_path):
    out = tmp_path / "out.jsonl"
    done = {"id": "a", "line": 1, "content": "A", "error": None}
    failed = {"id": "b", "line": 2, "content": None, "error": "boom"}
    out.write_bytes((json.dumps(done) + "\n" + json.dumps(failed) + "\n").encode() + b'{"id": "c", "li')
    with OutputFile(out) as output:
        assert output.state.done == {'"a"'} and output.state.truncated_bytes == len(b'{"id": "c", "li')
        assert output.state.errors == {(2, "boom")}
        output.write({"id": "c", "error": None})
    assert [r["id"] for r in records(out)] == ["a", "b", "c"]


def test_existing_output_resumed_refused_or_overwritten(tmp_path):
    out = write_lines(tmp_path / "out.jsonl", [{"id": 1, "error": None}])
    with pytest.raises(UsageError, match="--force"):
        OutputFile(out, resume=False)
    with OutputFile(out) as output:
        assert output.state.done == {"1"}
        with pytest.raises(UsageError, match="another batch job"):
            OutputFile(out)  # locked while the first job holds it
    with OutputFile(out, resume=False, force=True) as output:
        assert output.state.done == set()
    assert out.read_bytes() == b""


# -- the job on the tiny model -----------------------------------------------------------------------


def test_errors_are_recorded_and_the_job_goes_on(engine, tmp_path):
    inp = write_lines(tmp_path / "in.jsonl", [
        {"id": "ok", "prompt": "Hello"},
        "{broken",
        {"id": "long", "prompt": "word " * 2000},  # more than the 512 tokens each sequence holds
        {"id": "chat", "messages": [{"role": "user", "content": "Hi"}], "think": False, "system": "S"},
    ])
    out = tmp_path / "out.jsonl"
    with open_batch(inp, out) as job:
        summary = run_batch(job, engine, GREEDY_SHORT)
    # "ok" thinks for all of its 4 tokens: a record, but no answer.
    assert (summary.items, summary.answered, summary.cut_off, summary.failed) == (4, 1, 1, 2) and adds_up(summary)
    by_id = {r["id"]: r for r in records(out)}
    assert by_id[None]["line"] == 2 and "not valid JSON" in by_id[None]["error"]
    assert "raise --ctx" in by_id["long"]["error"] and by_id["long"]["content"] is None
    for key in ("ok", "chat"):
        r = by_id[key]
        assert r["error"] is None and r["usage"]["completion_tokens"] == 4 and r["finish_reason"] == "length"
        assert set(r) == {"id", "line", "content", "reasoning", "usage", "finish_reason", "error"}
    assert by_id["chat"]["usage"]["reasoning_tokens"] == 0 and by_id["ok"]["usage"]["reasoning_tokens"] == 4

    # Resumed: answered ids are skipped, the failed and cut-off items are tried again, the bad line is not
    # recorded twice but still counts as failed, so that the summary adds up.
    with open_batch(inp, out) as job:
        assert [i.id for i in job.todo] == ["ok", "long"] and job.new_errors == []
        again = run_batch(job, engine, GREEDY_SHORT)
    assert (again.already_done, again.answered, again.cut_off, again.failed) == (1, 0, 1, 2) and adds_up(again)
    assert [r["id"] for r in records(out)].count("long") == 2 and len(records(out)) == 6
    with open_batch(inp, out) as job:  # with room to answer, the cut-off item is answered
        last = run_batch(job, engine, ANSWERING)
    assert (last.already_done, last.answered, last.cut_off, last.failed) == (1, 1, 0, 2) and adds_up(last)


def test_resume_answers_only_new_ids(engine, tmp_path):
    inp = write_lines(tmp_path / "in.txt", ["one", "two", "three"])
    out = tmp_path / "out.jsonl"
    with open_batch(inp, out) as job:
        assert run_batch(job, engine, ANSWERING).answered == 3
    write_lines(inp, ["one", "two", "three", "four", "five"])
    with open_batch(inp, out) as job:
        summary = run_batch(job, engine, ANSWERING)
    assert (summary.already_done, summary.answered) == (3, 2)
    assert sorted(r["id"] for r in records(out)) == [1, 2, 3, 4, 5]
    with open_batch(inp, out) as job:  # nothing left: no engine needed
        assert job.todo == [] and run_batch(job, None).answered == 0


# -- the command -------------------------------------------------------------------------------------


def test_help_has_an_example():
    result = run_cli("batch", "--help")
    assert result.returncode == 0 and "Example: cascade-local batch" in result.stdout


def test_plain_text_batch_and_parallel_give_the_same_ids(tiny_gguf, tmp_path):
    inp = write_lines(tmp_path / "prompts.txt", ["Hello", "", "What is 2+2?", "Tell me a story", "Bye"])
    ids = {}
    for parallel in ("1", "2"):
        out = tmp_path / f"out{parallel}.jsonl"
        result = run_cli("batch", str(inp), "-o", str(out), "-m", str(tiny_gguf("q8_0")), "--max-tokens", "8",
                         "--no-think", "--parallel", parallel, "--threads", "2")
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"{out}\n" and "\x1b[" not in result.stdout + result.stderr
        assert result.stderr.count("\n") == 1 and "4 items: 4 answered, 0 failed" in result.stderr
        ids[parallel] = Counter(r["id"] for r in records(out))
    assert ids["1"] == ids["2"] == Counter({1: 1, 3: 1, 4: 1, 5: 1})


def test_killed_job_resumes_with_every_id_exactly_once(tiny_gguf, tmp_path):
    n = 40
    inp = write_lines(tmp_path / "in.jsonl", [{"id": f"q{i}", "prompt": f"Question number {i}"} for i in range(n)])
    out = tmp_path / "out.jsonl"
    args = ["batch", str(inp), "-o", str(out), "-m", str(tiny_gguf("q8_0")), "--max-tokens", "16", "--no-think",
            "--threads", "2"]
    env = {**os.environ, "NO_COLOR": "1"}
    job = subprocess.Popen([*CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and job.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 2:
                job.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        job.wait(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == -signal.SIGKILL, "the job ended before it could be killed"
    written = records(out)
    assert 2 <= len(written) < n
    with out.open("ab") as f:  # as if the kill had landed in the middle of a write
        f.write(b'{"id": "q39", "line": 40, "content": "half')

    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "cut off a half-written last line" in result.stderr
    final = records(out)  # every line parses
    assert final[: len(written)] == written
    assert Counter(r["id"] for r in final) == Counter(f"q{i}" for i in range(n))
    assert all(r["error"] is None for r in final)


def test_items_without_an_answer_are_counted_apart_and_the_exit_says_so(tiny_gguf, tmp_path):
    inp = write_lines(tmp_path / "in.jsonl", [{"id": "a", "prompt": "Hello"}, "{broken",
                                              {"id": "b", "prompt": "Hi", "think": False}])
    out = tmp_path / "out.jsonl"
    args = ["batch", str(inp), "-o", str(out), "-m", str(tiny_gguf("q8_0")), "--max-tokens", "4", "--temperature",
            "0", "--threads", "2"]
    first = run_cli(*args)
    assert (first.returncode, first.stdout) == (3, f"{out}\n"), first.stderr
    assert "3 items: 1 answered, 1 cut off while reasoning (raise --max-tokens), 1 failed, 0 already done" \
        in first.stderr
    again = run_cli(*args)  # resumed: "a" is tried again, the bad line is still failed
    assert again.returncode == 3, again.stderr
    assert "3 items: 0 answered, 1 cut off while reasoning (raise --max-tokens), 1 failed, 1 already done" \
        in again.stderr
    write_lines(inp, [{"id": "a", "prompt": "Hello"}, {"id": "b", "prompt": "Hi", "think": False}])
    fixed = run_cli(*args, "--no-think")
    assert fixed.returncode == 0, fixed.stderr
    assert "2 items: 1 answered, 0 failed, 1 already done" in fixed.stderr


def test_ctrl_c_says_how_to_resume(tiny_gguf, tmp_path):
    inp = write_lines(tmp_path / "in.txt", [f"Question {i}" for i in range(20)])
    out = tmp_path / "out.jsonl"
    job = subprocess.Popen([*CLI, "batch", str(inp), "-o", str(out), "-m", str(tiny_gguf("q8_0")), "--no-think",
                            "--max-tokens", "100000", "--ignore-eos", "--threads", "2"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "NO_COLOR": "1", "COLUMNS": "300"})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (tmp_path / "out.jsonl").exists():
            time.sleep(0.05)
        time.sleep(1.0)  # loaded and decoding
        job.send_signal(signal.SIGINT)
        stdout, stderr = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 130 and stdout == "" and "Traceback" not in stderr, stderr
    assert f"interrupted: the answers so far are in {out}; run the same command again to resume" in stderr


def test_the_model_comes_first_as_in_run_and_chat(tiny_gguf, tmp_path):
    """batch [MODEL] INPUT, as run [MODEL] PROMPT; -m/--model still works; the model given twice is refused."""
    inp = write_lines(tmp_path / "prompts.txt", ["Hello", "Bye"])
    model = str(tiny_gguf("q8_0"))
    common = ["--max-tokens", "4", "--no-think", "--threads", "2"]
    first = run_cli("batch", model, str(inp), "-o", str(tmp_path / "a.jsonl"), *common)
    assert first.returncode == 0, first.stderr
    assert "2 items: 2 answered" in first.stderr and [r["id"] for r in records(tmp_path / "a.jsonl")] == [1, 2]
    old = run_cli("batch", str(inp), "-o", str(tmp_path / "b.jsonl"), "-m", model, *common)
    assert old.returncode == 0 and "2 items: 2 answered" in old.stderr, old.stderr
    twice = run_cli("batch", model, str(inp), "-o", str(tmp_path / "c.jsonl"), "-m", model, *common)
    assert twice.returncode == 1 and "give the model once" in twice.stderr
    missing = run_cli("batch", model, str(tmp_path / "nope.txt"), "-o", str(tmp_path / "d.jsonl"), *common)
    assert missing.returncode == 1 and "nope.txt is not a file that exists" in missing.stderr
    assert "Traceback" not in twice.stderr + missing.stderr
