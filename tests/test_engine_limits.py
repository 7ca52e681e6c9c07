"""The engine at its limits on the real tiny model: a step larger than one batch, and llama_decode's failures."""

from __future__ import annotations

import pytest

from cascade_local.engine import CLOSE_THINKING, DecodeError, Engine, Request, decode_error
from cascade_local.llama_model import LoadedModel
from cascade_local.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
TEXTS = ["Hi", "What is 2+2?", "Tell me a story", "café"]


@pytest.fixture(scope="module")
def model(tiny_gguf) -> LoadedModel:
    return LoadedModel(tiny_gguf("f32"))


def thinking_prompt(model: LoadedModel, text: str) -> list[int]:
    return model.encode_prompt(model.template.render([{"role": "user", "content": text}], enable_thinking=True))


@pytest.mark.parametrize(("n_seq", "n_batch"), [(8, 8), (200, 512)])
def test_thoughts_closing_in_the_same_step_never_overfill_the_batch(model, n_seq, n_batch):
    """Every sequence's budget closes at its first token, so one step feeds 1 + len(</think> tokens) per sequence."""
    close = model.tokenize(CLOSE_THINKING)
    engine = Engine(model, n_ctx=64 * n_seq, n_seq_max=n_seq, n_batch=n_batch, threads=2)
    assert n_seq * (1 + len(close)) > engine.n_batch  # more rows than one llama_batch holds
    requests = [Request(thinking_prompt(model, TEXTS[i % len(TEXTS)]), GREEDY, max_tokens=6, in_reasoning=True,
                        thinking_budget=1) for i in range(n_seq)]
    together = engine.generate_many(requests)
    alone = [engine.generate(r) for r in requests[: len(TEXTS)]]
    assert all(r.budget_closed and r.reasoning_tokens == 1 for r in together)
    # Split over several decodes, each sequence still gets exactly what it gets decoded alone.
    expected = [(alone[i % len(TEXTS)].reasoning, alone[i % len(TEXTS)].content) for i in range(n_seq)]
    assert [(r.reasoning, r.content) for r in together] == expected
    assert all(r.content for r in alone)  # the model answered after the injected </think>


def test_a_full_context_is_named_with_what_to_do(model):
    """llama_decode returns 1 when no KV cell is left for the batch."""
    with Engine(model, n_ctx=256, threads=2) as engine:
        tokens = [20 + i % 700 for i in range(engine.n_ctx)]
        engine._evaluate(0, tokens, 0, len(tokens), logits_at_end=False)  # every cell of the context in use
        with pytest.raises(DecodeError, match=r"returned 1: no room left in the context .*--ctx") as caught:
            engine._evaluate(0, [*tokens, 20], engine.n_ctx, engine.n_ctx + 1, logits_at_end=True)
    assert caught.value.code == 1 and caught.value.exit_code == 2


def test_an_invalid_batch_is_reported_as_a_bug(model):
    """llama_decode returns -1 for a batch it rejects (here a sequence id past n_seq_max)."""
    with Engine(model, n_ctx=256, n_seq_max=1, threads=2) as engine:
        engine._fill([(3, 20, 0, True)])
        with pytest.raises(DecodeError, match=r"returned -1: llama.cpp rejected the batch as invalid"):
            engine._decode()


@pytest.mark.parametrize(("code", "says"), [(2, "aborted"), (-3, "computation failed"), (-2, "--gpu-mem")])
def test_other_decode_failures_are_named(code, says):
    error = decode_error(code, 4096, 2)
    assert says in str(error) and error.code == code and "context is full" not in str(error)
