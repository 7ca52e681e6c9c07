"""Prompt snapshots (a sequence's Mamba state and KV cells) copied out of llama.cpp once, restored without a copy.

The real model's state is about 50 MB of Mamba state plus 6 KB of KV per token, taken on every chat
turn and tool round; through a Python list it cost 1.7 s and 580 MiB for 60 MB. tracemalloc sees
every allocation Python makes (ctypes buffers, lists, bytes), so the peak bounds the copies.
"""

from __future__ import annotations

import tracemalloc

import pytest

from cascade_local.engine import Engine, PromptCache, Request
from cascade_local.llama_model import LoadedModel
from cascade_local.sampling import SamplingParams

PROMPT = [20 + i * 7 % 700 for i in range(300)]  # ids the fixture vocabulary has


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    with LoadedModel(tiny_gguf("f32")) as model, Engine(model, n_ctx=1024, threads=2) as engine:
        yield engine


def peak_bytes(fn):
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_snapshot_is_copied_once_and_restored_without_a_copy(engine):
    engine._evaluate(0, PROMPT, 0, len(PROMPT), logits_at_end=False)
    state, taking = peak_bytes(lambda: engine._snapshot(0))
    assert isinstance(state, bytes) and len(state) > 100_000
    # llama.cpp's write into a buffer, one copy into bytes: twice the state, not a list of ints (8x and more).
    assert taking < 2.2 * len(state)
    cache = PromptCache(list(PROMPT), state)
    done, restoring = peak_bytes(lambda: engine._restore(0, cache, [*PROMPT, 21]))
    assert done == len(PROMPT)
    assert restoring < 0.5 * len(state)  # llama.cpp reads the bytes in place (a copy would be 1x)
    engine._forget(0)


def test_a_restored_snapshot_continues_exactly(engine):
    greedy = SamplingParams(temperature=0.0)
    cache = PromptCache()
    first = engine.generate(Request([*PROMPT, 22], greedy, max_tokens=8, cache=cache))
    assert cache.tokens == PROMPT and isinstance(cache.state, bytes)
    again = engine.generate(Request([*PROMPT, 22], greedy, max_tokens=8, cache=cache))
    assert again.cached_tokens == len(PROMPT) and first.cached_tokens == 0
    assert again.content == first.content and again.completion_tokens == first.completion_tokens
