"""Who frees what, and when: the engine before its model, each native object once, use after close an error.

Every case runs on the real tiny model; before these rules each of them freed memory still in use
(a segfault, exit 139) or could not be written at all.
"""

from __future__ import annotations

import pytest

from cascade_local.engine import Engine, Request
from cascade_local.errors import CascadeError, ClosedError
from cascade_local.llama_model import LoadedModel
from cascade_local.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def prompt(model: LoadedModel, text: str = "Hello") -> list[int]:
    return model.encode_prompt(model.template.render([{"role": "user", "content": text}], enable_thinking=True))


def test_closing_the_engine_under_a_suspended_stream(tiny_gguf):
    model = LoadedModel(tiny_gguf("f32"))
    engine = Engine(model, n_ctx=256, threads=2)
    events = engine.stream(Request(prompt(model), GREEDY, max_tokens=20, in_reasoning=True))
    assert next(events).kind == "reasoning"  # the stream is suspended with a live sequence
    engine.close()
    with pytest.raises(ClosedError, match="engine was closed"):
        next(events)  # resuming it would decode on the freed context
    events.close()  # its cleanup (llama_memory_seq_rm) must not touch the freed context
    with pytest.raises(ClosedError, match="engine was closed"):
        next(engine.stream(Request(prompt(model), GREEDY, max_tokens=4)))
    model.close()


def test_closing_the_engine_then_dropping_the_stream(tiny_gguf):
    model = LoadedModel(tiny_gguf("f32"))
    engine = Engine(model, n_ctx=256, threads=2)
    events = engine.stream(Request(prompt(model), GREEDY, max_tokens=20, in_reasoning=True))
    next(events)
    engine.close()
    events.close()
    with pytest.raises(ClosedError, match="engine was closed"):
        engine.generate(Request(prompt(model), GREEDY, max_tokens=4))
    model.close()


def test_generating_after_the_model_was_closed(tiny_gguf):
    model = LoadedModel(tiny_gguf("f32"))
    engine = Engine(model, n_ctx=256, threads=2)
    tokens = prompt(model)
    assert engine.generate(Request(tokens, GREEDY, max_tokens=4)).completion_tokens == 4
    model.close()  # the engine's context depends on the model: it goes first
    with pytest.raises(ClosedError, match=r"model tiny-f32\.gguf was closed"):
        engine.generate(Request(tokens, GREEDY, max_tokens=4))
    with pytest.raises(ClosedError, match=r"model tiny-f32\.gguf was closed"):
        model.tokenize("Hello")
    with pytest.raises(ClosedError):
        Engine(model, n_ctx=256)
    assert issubclass(ClosedError, CascadeError)  # one line and an exit code in the CLI, never a traceback


def test_context_managers_free_the_engine_before_its_model(tiny_gguf):
    with LoadedModel(tiny_gguf("f32")) as model, Engine(model, n_ctx=256, threads=2) as engine:
        result = engine.generate(Request(prompt(model), GREEDY, max_tokens=4))
        assert result.completion_tokens == 4
        assert not engine.closed and not model.closed
    assert engine.closed and model.closed
    engine.close()  # closing again frees nothing twice
    model.close()


def test_an_engine_that_owns_its_model_frees_both(tiny_gguf):
    model = LoadedModel(tiny_gguf("f32"))
    with Engine(model, n_ctx=256, threads=2, owns_model=True) as engine:
        engine.generate(Request(prompt(model), GREEDY, max_tokens=2))
    assert engine.closed and model.closed
