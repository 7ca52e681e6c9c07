"""The prompt-state cache on disk ("read once, ask many"): real llama.cpp states of the tiny fixture, real files.

Exactness is tested end to end: the greedy answer after a restore from disk equals a full evaluation, thinking
on and off. Hit, miss, eviction, corrupted/truncated/foreign files and concurrent writers are tested on the store.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest
from conftest import run_cli

from cascade_local.engine import Engine, PromptCache, Request
from cascade_local.llama_model import LoadedModel
from cascade_local.prompt_store import MAGIC, PromptStore, entries, model_identity
from cascade_local.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def states(tiny_gguf):
    """Real sequence states of the tiny model after prefixes of 100, 200 and 300 tokens."""
    tokens = [10 + (i * 7) % 900 for i in range(301)]
    out = {}
    with Engine(LoadedModel(tiny_gguf("q8_0")), n_ctx=512, owns_model=True) as engine:
        for n in (100, 200, 300):
            cache = PromptCache()
            engine.generate(Request(tokens[: n + 1], GREEDY, max_tokens=1, cache=cache, cache_prefix=n))
            out[n] = (cache.tokens, cache.state)
    return tokens, out


def store(tmp_path: Path, tiny_gguf, budget: int = 1 << 30) -> PromptStore:
    return PromptStore(tmp_path / "prompts", model_identity(tiny_gguf("q8_0")), budget=budget)


def test_hit_returns_the_longest_stored_prefix(tmp_path, tiny_gguf, states):
    tokens, by_n = states
    s = store(tmp_path, tiny_gguf)
    s.save(*by_n[100])
    s.save(*by_n[200])
    assert s.lookup(tokens[:250]) == (tokens[:200], by_n[200][1])
    assert s.lookup(tokens[:150]) == (tokens[:100], by_n[100][1])
    assert s.lookup(tokens[:200]) == (tokens[:100], by_n[100][1])  # a prefix must leave something to evaluate


def test_lookup_skips_prefixes_the_caller_already_holds(tmp_path, tiny_gguf, states):
    tokens, by_n = states
    s = store(tmp_path, tiny_gguf)
    s.save(*by_n[100])
    held = s.save(*by_n[200])
    assert held is not None
    held.write_bytes(held.read_bytes()[:-10])  # damaged: reading it would remove it
    assert s.lookup(tokens[:250], longer_than=200) is None
    assert held.exists() and not s.removed  # never opened
    assert s.lookup(tokens[:250], longer_than=99) == (tokens[:100], by_n[100][1])
    assert not held.exists()  # this time read: found damaged, removed


def test_miss_for_other_tokens_and_other_model_files(tmp_path, tiny_gguf, states):
    tokens, by_n = states
    s = store(tmp_path, tiny_gguf)
    s.save(*by_n[100])
    assert s.lookup([tokens[0] + 1, *tokens[1:150]]) is None
    other = PromptStore(s.folder, model_identity(tiny_gguf("f16")))
    assert other.lookup(tokens[:150]) is None
    assert len(entries(s.folder)) == 1 and not s.removed  # a miss removes nothing


def test_identity_changes_with_the_file(tmp_path, tiny_gguf):
    copy = tmp_path / "m.gguf"
    copy.write_bytes(tiny_gguf("q8_0").read_bytes())
    before = model_identity(copy)
    os.utime(copy, ns=(1, 1))
    assert model_identity(copy) != before


def test_eviction_is_least_recently_used(tmp_path, tiny_gguf, states):
    tokens, by_n = states
    s = store(tmp_path, tiny_gguf)
    first, second = s.save(*by_n[100]), s.save(*by_n[200])
    s.budget = first.stat().st_size + len(by_n[300][1]) + 4 * 300 + 500  # the first and the third, not all three
    os.utime(first, (1, 1))
    os.utime(second, (2, 2))
    assert s.lookup(tokens[:150]) is not None  # a hit makes the first the most recently used
    s.save(*by_n[300])
    names = {e.path for e in entries(s.folder)}
    assert first in names and second not in names and len(names) == 2
    assert sum(e.nbytes for e in entries(s.folder)) <= s.budget


@pytest.mark.parametrize("damage,why", [
    (lambda b: b[: len(b) // 2], "truncated"),
    (lambda b: b[:-10] + bytes(x ^ 0xFF for x in b[-10:]), "checksum mismatch"),
    (lambda b: b"GGUF" + b[4:], "not a prompt-state file"),
    (lambda b: b[: len(MAGIC) + 3], "not a prompt-state file"),
])
def test_damaged_files_are_removed_and_never_loaded(tmp_path, tiny_gguf, states, damage, why):
    tokens, by_n = states
    s = store(tmp_path, tiny_gguf)
    path = s.save(*by_n[100])
    path.write_bytes(damage(path.read_bytes()))
    assert s.lookup(tokens[:150]) is None
    assert not path.exists() and len(s.removed) == 1 and why in s.removed[0]


def test_a_foreign_file_under_this_name_is_refused(tmp_path, tiny_gguf, states):
    """Another model's state copied under this model's name: its header names the other file."""
    tokens, by_n = states
    mine = store(tmp_path, tiny_gguf)
    theirs = PromptStore(tmp_path / "other", model_identity(tiny_gguf("f16")))
    foreign = theirs.save(*by_n[100])
    target = mine.folder / mine._name(tokens[:100])
    mine.folder.mkdir(parents=True)
    foreign.replace(target)
    assert mine.lookup(tokens[:150]) is None
    assert not target.exists() and "another model file" in mine.removed[0]


def _writer(folder: str, identity: str, blobs: list[tuple[list[int], bytes]], budget: int) -> None:
    s = PromptStore(Path(folder), identity, budget=budget)
    for _ in range(5):
        for tokens, state in blobs:
            s.save(tokens, state)


def _reader(folder: str, identity: str, tokens: list[int], rounds: int) -> None:
    """Looks up while others write: a half-written file would be seen as damaged (exit 3)."""
    s = PromptStore(Path(folder), identity)
    for _ in range(rounds):
        s.lookup(tokens)
        if s.removed:
            raise SystemExit(3)


def test_concurrent_writers_leave_only_whole_files(tmp_path, tiny_gguf, states):
    # The store treats states as opaque bytes: large ones (8 MiB) keep each write long enough for readers to
    # catch a half-written file, were writes not atomic.
    tokens, _ = states
    by_n = {n: (tokens[:n], os.urandom(8 << 20)) for n in (100, 200, 300)}
    s = store(tmp_path, tiny_gguf)
    budget = int((len(by_n[300][1]) + 2000) * 2.5)
    blobs = [by_n[n] for n in (100, 200, 300)]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(s.folder), s.identity, blobs[i:] + blobs[:i], budget))
             for i in range(3)]
    procs += [ctx.Process(target=_reader, args=(str(s.folder), s.identity, tokens, 100)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0] * 5
    left = entries(s.folder)
    assert left and sum(e.nbytes for e in left) <= budget
    assert not list(s.folder.glob(".*.tmp"))  # every temporary file renamed or removed
    for e in left:  # every file that remains is whole and verifies
        prefix = tokens[: e.n_tokens]
        assert s.lookup([*prefix, 1]) == (prefix, by_n[e.n_tokens][1])
    assert not s.removed


# -- end to end: run -f doc "question" ------------------------------------------------------------------------------


def _ask(gguf: Path, doc: Path, question: str, *extra: str) -> dict:
    # --budget: with thinking on, the thought is closed in time for an answer (a run without one exits 3).
    result = run_cli("run", str(gguf), "-f", str(doc), question, "--json", "--temperature", "0", "--max-tokens",
                     "12", "--budget", "4", "--cache-min-tokens", "256", *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("think", ["--think", "--no-think"])
def test_read_once_ask_many_is_exact(tiny_gguf, tmp_path, think):
    gguf, doc = tiny_gguf("q8_0"), tmp_path / "doc.txt"
    doc.write_text("The ledger lists forty barrels of oil and nine of wine. " * 40)
    first = _ask(gguf, doc, "How many barrels of oil?", think)
    assert first["usage"]["cached_tokens"] == 0
    again = _ask(gguf, doc, "How many of wine?", think)
    fresh = _ask(gguf, doc, "How many of wine?", think, "--cache-size", "0")  # full evaluation, no cache
    # Everything before the question came from disk; the answer is the one a full evaluation gives.
    assert again["usage"]["cached_tokens"] > 0.9 * again["usage"]["prompt_tokens"]
    assert fresh["usage"]["cached_tokens"] == 0
    assert (again["content"], again["reasoning"]) == (fresh["content"], fresh["reasoning"])
    assert again["reasoning"] or again["content"]


def test_short_prompts_are_not_stored_and_damage_is_one_warning(tiny_gguf, tmp_path):
    gguf, doc = tiny_gguf("q8_0"), tmp_path / "doc.txt"
    doc.write_text("Short note. " * 3)
    _ask(gguf, doc, "Why?")
    folder = Path(os.environ["CASCADE_LOCAL_PROMPT_CACHE"])
    assert not entries(folder)  # under --cache-min-tokens: a miss, nothing written
    doc.write_text("A longer note about the ledger. " * 40)
    _ask(gguf, doc, "Why?")
    (stored,) = entries(folder)
    stored.path.write_bytes(stored.path.read_bytes()[:-100])
    result = run_cli("run", str(gguf), "-f", str(doc), "Who?", "--json", "--temperature", "0", "--max-tokens", "4",
                     "--budget", "2", "--cache-min-tokens", "256")
    assert result.returncode == 0 and json.loads(result.stdout)["usage"]["cached_tokens"] == 0
    assert "warning: removed a damaged prompt state" in result.stderr and "truncated" in result.stderr
    assert [e.n_tokens for e in entries(folder)] == [stored.n_tokens]  # evaluated again, and stored again whole


def test_cache_list_and_clear(tiny_gguf, tmp_path):
    gguf, doc = tiny_gguf("q8_0"), tmp_path / "doc.txt"
    doc.write_text("A longer note about the ledger. " * 40)
    _ask(gguf, doc, "Why?")
    listed = run_cli("cache", "list", "--json")
    (item,) = json.loads(listed.stdout)
    assert item["tokens"] > 256 and item["bytes"] == Path(item["path"]).stat().st_size
    assert run_cli("cache", "list").stdout.count(".state") == 1
    cleared = run_cli("cache", "clear")
    assert cleared.returncode == 0 and "removed 1 prompt states" in cleared.stderr
    assert json.loads(run_cli("cache", "list", "--json").stdout) == []


def test_each_kv_type_keeps_its_own_states(tiny_gguf, tmp_path):
    """llama.cpp refuses a state saved with another KV type: a q8_0 run must not take (and lose to) an f16 file."""
    gguf, doc = tiny_gguf("q8_0"), tmp_path / "doc.txt"
    doc.write_text("A longer note about the ledger. " * 40)
    _ask(gguf, doc, "Why?")
    quantized = _ask(gguf, doc, "Who?", "--kv-type", "q8_0")
    again = _ask(gguf, doc, "When?", "--kv-type", "q8_0")
    assert quantized["usage"]["cached_tokens"] == 0 and again["usage"]["cached_tokens"] > 256
    assert len(entries(Path(os.environ["CASCADE_LOCAL_PROMPT_CACHE"]))) == 2


# -- batch: a document every item shares ------------------------------------------------------------------------


def _batch(gguf: Path, tmp_path: Path, name: str, *extra: str) -> list[dict]:
    doc = "The ledger lists forty barrels of oil and nine of wine. " * 40
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": f"{doc}\n\n{q}", "think": False}) + "\n"
                           for i, q in enumerate(["How much oil?", "How much wine?", "Which ledger?"])))
    out = tmp_path / name
    result = run_cli("batch", str(inp), "-o", str(out), "--parallel", "2", "--temperature", "0", "--max-tokens",
                     "8", "--cache-min-tokens", "256", "-m", str(gguf), *extra)
    assert result.returncode == 0, result.stderr
    return sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["id"])


def test_batch_reads_a_shared_document_once_and_answers_exactly(tiny_gguf, tmp_path):
    gguf = tiny_gguf("q8_0")
    first = _batch(gguf, tmp_path, "a.jsonl")
    again = _batch(gguf, tmp_path, "b.jsonl")  # a new process: the document's state comes from disk
    fresh = _batch(gguf, tmp_path, "c.jsonl", "--cache-size", "0")
    assert all(r["usage"]["cached_tokens"] > 0.9 * r["usage"]["prompt_tokens"] for r in first + again)
    assert all(r["usage"]["cached_tokens"] == 0 for r in fresh)
    assert [(r["content"], r["reasoning"]) for r in first] == [(r["content"], r["reasoning"]) for r in fresh]
    assert [(r["content"], r["reasoning"]) for r in again] == [(r["content"], r["reasoning"]) for r in fresh]
    assert len(entries(Path(os.environ["CASCADE_LOCAL_PROMPT_CACHE"]))) == 1


# -- serve: long prompts survive a restart ------------------------------------------------------------------------


def test_a_restarted_server_restores_a_long_prompt_from_disk(tiny_gguf, tmp_path):
    import httpx
    from test_serve import start_server, stop_server

    doc = "The ledger lists forty barrels of oil and nine of wine. " * 40

    def ask_server(question: str, *extra: str) -> dict:
        served = start_server(tiny_gguf("q8_0"), "--parallel", "1", "--cache-min-tokens", "256", *extra)
        try:
            body = {"model": "tiny-q8_0", "temperature": 0, "max_tokens": 8,
                    "messages": [{"role": "user", "content": f"{doc}\n\n{question}"}]}
            reply = httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=120).json()
        finally:
            assert stop_server(served) == 0
        return reply

    first = ask_server("How much oil?")
    again = ask_server("How much oil?")  # a new process: its memory is empty, the disk is not
    fresh = ask_server("How much oil?", "--cache-size", "0")
    cached = [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in (first, again, fresh)]
    assert cached[0] == 0 and cached[1] > 0.9 * again["usage"]["prompt_tokens"] and cached[2] == 0
    assert again["choices"][0]["message"] == fresh["choices"][0]["message"]


# -- chat /read: the same states as run -f ----------------------------------------------------------------------------


def _chat_turns(engine: Engine, disk: PromptStore | None, doc: str, questions: list[str]) -> list:
    from cascade_local.conversation import Conversation, TurnSettings

    chat = Conversation(engine, disk=disk, disk_min_tokens=256)
    chat.attach(doc)
    settings = TurnSettings(thinking=False, max_tokens=8, sampling=GREEDY)
    results = []
    for question in questions:
        results.extend(e.result for e in chat.reply(question, settings) if e.kind == "done")
    return results


def test_a_chat_reads_an_attached_document_once(tmp_path, tiny_gguf):
    doc = "The ledger lists forty barrels of oil and nine of wine. " * 40
    disk = store(tmp_path, tiny_gguf)
    with Engine(LoadedModel(tiny_gguf("q8_0")), n_ctx=2048, owns_model=True) as engine:
        first = _chat_turns(engine, disk, doc, ["How many barrels of oil?", "And of salt?"])
        (saved,) = entries(tmp_path / "prompts")  # the document's turn left everything before its question
        again = _chat_turns(engine, disk, doc, ["How many of wine?", "And of salt?"])
        fresh = _chat_turns(engine, None, doc, ["How many of wine?", "And of salt?"])
    assert first[0].cached_tokens == 0 and first[1].cached_tokens >= saved.n_tokens  # turn 2: kept in memory
    assert again[0].cached_tokens == saved.n_tokens > 0.9 * again[0].prompt_tokens  # a new chat: from disk
    assert fresh[0].cached_tokens == 0
    assert [(r.content, r.reasoning) for r in again] == [(r.content, r.reasoning) for r in fresh]
    assert len(entries(tmp_path / "prompts")) == 1  # nothing new to save: the state came from there


def test_chat_read_and_run_file_share_the_document_state(tiny_gguf, tmp_path):
    gguf, doc = tiny_gguf("q8_0"), tmp_path / "doc.txt"
    doc.write_text("The ledger lists forty barrels of oil and nine of wine. " * 40)
    chat = run_cli("chat", str(gguf), "--no-think", "--temperature", "0", "--max-tokens", "8", "--no-log",
                   "--cache-min-tokens", "256", input=f"/read {doc}\nHow many barrels of oil?\n")
    assert chat.returncode == 0, chat.stderr
    assert f"read {doc}" in chat.stderr and "Traceback" not in chat.stderr
    asked = _ask(gguf, doc, "How many of wine?", "--no-think")
    fresh = _ask(gguf, doc, "How many of wine?", "--no-think", "--cache-size", "0")
    assert asked["usage"]["cached_tokens"] > 0.9 * asked["usage"]["prompt_tokens"]
    assert (asked["content"], asked["reasoning"]) == (fresh["content"], fresh["reasoning"])


def test_chat_read_errors_are_one_line_and_the_chat_goes_on(tiny_gguf, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    chat = run_cli("chat", str(tiny_gguf("q8_0")), "--no-think", "--max-tokens", "2", "--no-log",
                   input=f"/read {tmp_path / 'missing.txt'}\n/read {empty}\n/read\n/settings\n")
    assert "missing.txt" in chat.stderr and "is empty" in chat.stderr and "usage: /read FILE" in chat.stderr
    assert "Traceback" not in chat.stderr and "thinking" in chat.stderr  # /settings still ran
