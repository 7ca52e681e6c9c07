"""Long documents: `--ctx auto` sizing and its refusals, and `--kv-type`, on the tiny fixture (trained length 4096)."""

from __future__ import annotations

import json
import re

import pytest
from conftest import run_cli

from cascade_local.engine import Engine, Request
from cascade_local.errors import UsageError
from cascade_local.gguf_info import read_gguf
from cascade_local.llama_model import LoadedModel
from cascade_local.placement import CPU, PlanError, plan_auto, plan_placement, smallest_budget
from cascade_local.runtime import open_engine, parse_ctx
from cascade_local.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
CPU_ONLY = dict(gpu_bytes=0, gpu_available=False)


def test_auto_sizes_the_context_to_the_prompt_and_max_tokens(tiny_gguf):
    seen = []

    def count(model: LoadedModel) -> int:
        seen.append(model.path)
        return 300

    engine, plan = open_engine(str(tiny_gguf("q8_0")), ctx=None, prompt_tokens=count, max_tokens=100)
    with engine:
        # 300 + 100 + 1 tokens, padded to llama.cpp's 256: the context is sized to the job, not a fixed 8192.
        assert seen == [tiny_gguf("q8_0")] and plan.ctx == 401 and engine.n_ctx == 512


def test_auto_caps_the_context_at_the_trained_length(tiny_gguf):
    engine, plan = open_engine(str(tiny_gguf("q8_0")), ctx=None, prompt_tokens=lambda m: 100, max_tokens=100_000)
    with engine:
        assert plan.ctx == 4096 and engine.n_ctx == 4096
    # chat and serve (no prompt yet): room to grow, here the whole trained length
    engine, plan = open_engine(str(tiny_gguf("q8_0")), ctx=None)
    with engine:
        assert engine.n_ctx == 4096


@pytest.fixture
def tight_ram(tiny_gguf):
    """RAM that just holds 2304 tokens with a q8_0 KV cache, so 2304 does not fit with f16 (on the real file).

    (On the tiny model the attention mask of the compute buffer grows faster than its small KV cache.)
    """
    gguf = read_gguf(tiny_gguf("f16"))
    need = plan_placement(gguf, ctx=2304, kv_type="q8_0", **CPU_ONLY).need(CPU)
    return gguf, smallest_budget(need)


def test_auto_refuses_with_the_numbers_when_memory_is_short(tight_ram):
    gguf, ram = tight_ram
    with pytest.raises(PlanError) as caught:
        plan_auto(gguf, need=4000, ram_bytes=ram, **CPU_ONLY)
    text = str(caught.value)
    assert "a context of 4000 tokens" in text and "f16 KV cache alone is 1.00 MiB" in text
    assert "more than its" in text  # the planner's memory needed and available
    largest = int(re.search(r"largest context that fits is (\d+) tokens", text).group(1))
    q8 = int(re.search(r"with --kv-type q8_0 it would be (\d+)", text).group(1))
    assert largest == 2048 and q8 >= 2304
    plan_placement(gguf, ctx=q8, ram_bytes=ram, kv_type="q8_0", **CPU_ONLY)  # the promise holds
    with pytest.raises(PlanError):
        plan_placement(gguf, ctx=q8 + 256, ram_bytes=ram, kv_type="q8_0", **CPU_ONLY)
    # room to grow (chat, serve) settles for the largest that fits instead of refusing
    assert plan_auto(gguf, need=256, room=True, ram_bytes=ram, **CPU_ONLY).ctx == 2048


def test_run_refuses_a_prompt_longer_than_the_trained_context(tiny_gguf, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("word " * 1000)  # about 5 tokens each with the tiny vocabulary
    result = run_cli("run", str(tiny_gguf("q8_0")), "-f", str(doc), "Summarize")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and re.search(r"the prompt is \d+ tokens, more than the model's trained context "
                                         r"of 4096", lines[0]), lines


def test_run_reads_a_document_longer_than_the_old_default_window(tiny_gguf, tmp_path):
    """A 3,000-token document: auto sizing fits it without --ctx (once refused below a fixed window)."""
    doc = tmp_path / "doc.txt"
    doc.write_text("word " * 600)
    result = run_cli("run", str(tiny_gguf("q8_0")), "-f", str(doc), "Summarize", "--max-tokens", "3",
                     "--temperature", "0", "--json", "--no-think")
    assert result.returncode == 0, result.stderr
    usage = json.loads(result.stdout)["usage"]
    assert usage["prompt_tokens"] > 3000 and usage["completion_tokens"] == 3 and usage["cached_tokens"] == 0


@pytest.mark.parametrize("text,value", [("auto", None), ("AUTO", None), ("4096", 4096)])
def test_parse_ctx(text, value):
    assert parse_ctx(text) == value


@pytest.mark.parametrize("text", ["12", "big", "-5"])
def test_parse_ctx_refuses(text):
    with pytest.raises(UsageError, match="--ctx"):
        parse_ctx(text)


# -- KV cache types ------------------------------------------------------------------------------------------------


def test_planner_counts_the_kv_type(tiny_gguf):
    gguf = read_gguf(tiny_gguf("f16"))
    kv = {t: plan_placement(gguf, ctx=4096, kv_type=t, **CPU_ONLY).memory.kv for t in ("f16", "q8_0", "q4_0")}
    # one attention layer, 2 KV heads of 32+32 values: f16 256 B per token, q8_0 34/32 B, q4_0 18/32 B per value
    assert kv == {"f16": 4096 * 256, "q8_0": 4096 * 136, "q4_0": 4096 * 72}


@pytest.mark.parametrize("kv_type", ["q8_0", "q4_0"])
def test_quantized_kv_cache_is_what_llama_cpp_holds(tiny_gguf, kv_type):
    """The state llama.cpp saves for a sequence holds its KV cells: its size shrinks by the planner's ratio."""
    tokens = list(range(10, 210))

    def state_size(kv: str) -> tuple[int, list[str]]:
        model = LoadedModel(tiny_gguf("f16"))
        with Engine(model, n_ctx=512, kv_type=kv, owns_model=True) as engine:
            engine._evaluate(0, tokens, 0, len(tokens), logits_at_end=True)
            size = engine._lib.llama_state_seq_get_size(engine.ctx, 0)
            out = engine.generate(Request(tokens, GREEDY, max_tokens=5))
            return size, [out.content, out.reasoning]

    f16, _ = state_size("f16")
    quantized, answer = state_size(kv_type)
    per_token = {"q8_0": 256 - 136, "q4_0": 256 - 72}[kv_type]
    assert f16 - quantized == len(tokens) * per_token
    assert any(answer)  # it decodes: quantized V with flash attention turned on


def test_bad_kv_type_is_one_line(tiny_gguf):
    result = run_cli("run", str(tiny_gguf("q8_0")), "Hi", "--kv-type", "q5_1")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--kv-type 'q5_1' is not a KV cache type: use one of f16, q8_0, q4_0" in result.stderr


def test_plan_shows_the_context_arithmetic(tiny_gguf):
    result = run_cli("plan", str(tiny_gguf("f16")), "--kv-type", "q8_0", "--prompt-tokens", "300",
                     "--max-tokens", "100", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["ctx"] == 401 and plan["llama"]["n_ctx"] == 512 and plan["memory"]["kv_cache"] == 512 * 136
    assert plan["context"] == {"trained": 4096, "kv_bytes_per_token": 136, "largest": 4096, "largest_q8_0": 4096,
                               "auto": True}
    table = run_cli("plan", str(tiny_gguf("f16")), "--kv-type", "q4_0")
    assert "KV cache (4096 cells, q4_0)" in table.stdout and "72 B per token (q4_0)" in table.stdout


# -- reading progress --------------------------------------------------------------------------------------------


def test_the_engine_reports_prompt_reading_between_batches(tiny_gguf):
    seen: list[tuple[int, int]] = []
    tokens = [10 + i % 900 for i in range(1300)]
    with Engine(LoadedModel(tiny_gguf("q8_0")), n_ctx=2048, owns_model=True) as engine:
        engine.generate(Request(tokens, GREEDY, max_tokens=1, on_progress=lambda d, t: seen.append((d, t))))
    assert seen == [(512, 1300), (1024, 1300), (1300, 1300)]


def test_run_shows_reading_progress_on_a_terminal(tiny_gguf, tmp_path):
    """stderr a real pseudo-terminal: one updating line while a long prompt is read, erased at the end."""
    import os
    import pty
    import subprocess

    from conftest import CLI

    doc = tmp_path / "doc.txt"
    doc.write_text("word " * 600)  # about 3,000 tokens
    master, slave = pty.openpty()
    child = subprocess.Popen([*CLI, "run", str(tiny_gguf("q8_0")), "-f", str(doc), "Count", "--max-tokens", "2",
                              "--json", "--no-think", "--temperature", "0", "--ignore-eos"],
                             stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL,
                             env={**os.environ, "COLUMNS": "200"})
    os.close(slave)
    err = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        err += chunk
    out, _ = child.communicate(timeout=120)
    os.close(master)
    assert child.returncode == 0 and json.loads(out)["usage"]["completion_tokens"] == 2
    text = err.decode(errors="replace")
    assert re.search(r"reading the prompt: 512/\d,\d{3} tokens\r", text)
    assert re.search(r"reading the prompt: 1,536/\d,\d{3} tokens, [\d,]+ tokens/s, \d+ s left", text)
    assert text.rstrip("\r\n").endswith("\r\x1b[K")  # erased once read: the answer's line stays clean
