"""The engine on the real tiny model: raw-loop equality, batching, thinking budget, stops, UTF-8."""

from __future__ import annotations

import numpy as np
import pytest

from cascade_local.engine import Engine, Request
from cascade_local.errors import ModelLoadError, UsageError
from cascade_local.llama_model import LoadedModel
from cascade_local.sampling import SamplingParams
from cascade_local.testing.scripted import ScriptedSampler

GREEDY = SamplingParams(temperature=0.0)
IM_END, THINK_CLOSE = 11, 13


@pytest.fixture(scope="module")
def model(tiny_gguf) -> LoadedModel:
    return LoadedModel(tiny_gguf("f32"))


@pytest.fixture(scope="module")
def engine(model) -> Engine:
    return Engine(model, n_ctx=1024, n_seq_max=4, threads=2)


def prompt(model: LoadedModel, text: str, thinking: bool = False) -> list[int]:
    return model.encode_prompt(model.template.render([{"role": "user", "content": text}], enable_thinking=thinking))


def raw_greedy(model: LoadedModel, tokens: list[int], n: int) -> list[int]:
    """A minimal loop over llama.cpp's low-level API: the reference the engine must reproduce."""
    import llama_cpp

    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_threads, params.n_threads_batch = 256, 256, 2, 2
    ctx = llama_cpp.llama_init_from_model(model.model, params)
    batch = llama_cpp.llama_batch_init(256, 0, 1)
    out: list[int] = []
    try:
        feed, pos = list(tokens), 0
        for _ in range(n):
            for i, t in enumerate(feed):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos + i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, i == len(feed) - 1
            batch.n_tokens = len(feed)
            assert llama_cpp.llama_decode(ctx, batch) == 0
            pos += len(feed)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(model.n_vocab,))
            token = int(logits.argmax())
            if model.is_eog(token):
                break
            out.append(token)
            feed = [token]
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    return out


def test_greedy_output_equals_a_raw_llama_cpp_loop(engine, model):
    for text in ["Hello", "What is 2+2?", "def f(x):"]:
        tokens = prompt(model, text)
        reference = raw_greedy(model, tokens, 24)
        text_ref = b"".join(model.piece(t) for t in reference).decode("utf-8", errors="replace").strip()
        result = engine.generate(Request(tokens, GREEDY, max_tokens=24))
        assert result.completion_tokens == len(reference)
        assert result.content == text_ref


def test_batched_greedy_equals_one_at_a_time_with_admission(engine, model):
    texts = ["Hi", "What is 2+2?", "Tell me a story", "x", "café", "def f(x):"]
    requests = [Request(prompt(model, t), GREEDY, max_tokens=6 + 3 * i) for i, t in enumerate(texts)]
    alone = [engine.generate(r) for r in requests]
    together = engine.generate_many(requests)  # six requests through four sequences
    assert [r.content for r in together] == [r.content for r in alone]
    assert [r.completion_tokens for r in together] == [r.completion_tokens for r in alone]


def test_events_stream_in_order_and_join_to_the_result(engine, model):
    tokens = prompt(model, "Hello", thinking=True)
    events = list(engine.stream(Request(tokens, GREEDY, max_tokens=20, in_reasoning=True, tag="t")))
    assert events[-1].kind == "done" and all(e.tag == "t" for e in events)
    result = events[-1].result
    streamed = "".join(e.text for e in events if e.kind == "reasoning")
    assert streamed.strip() == result.reasoning and result.reasoning_tokens == 20 and result.content == ""
    assert result.finish_reason == "length" and result.prompt_tokens == len(tokens)
    assert result.prompt_tokens_per_second > 0 and result.generation_tokens_per_second > 0


def test_thinking_budget_closes_the_thought(engine, model):
    tokens = prompt(model, "Hello", thinking=True)
    result = engine.generate(Request(tokens, GREEDY, max_tokens=40, in_reasoning=True, thinking_budget=7))
    assert result.budget_closed and result.reasoning_tokens == 7
    assert result.content  # the model answered after the injected </think>
    assert "</think>" not in result.content and "</think>" not in result.reasoning


def scripted_engine(model, script, then=None) -> Engine:
    return Engine(model, n_ctx=256, n_seq_max=1, threads=2, sampler_factory=lambda _: ScriptedSampler(script, then))


def test_with_thinking_off_a_stray_close_tag_is_answer_text(model):
    """A scripted token source: answer, a stray </think>, more answer. The answer before it stays an answer."""
    first, second = model.tokenize("Paris"), model.tokenize(" is big")
    engine = scripted_engine(model, [*first, THINK_CLOSE, *second, IM_END])
    result = engine.generate(Request(prompt(model, "Capital?", thinking=False), max_tokens=50, in_reasoning=False))
    assert (result.reasoning, result.reasoning_tokens) == ("", 0)
    assert result.content.startswith("Paris") and result.content.endswith(" is big")


def test_stops_at_end_of_turn(model):
    """A scripted token source stands in for the model's choices: text, </think>, answer, <|im_end|>."""
    thought = model.tokenize("plan")
    answer = model.tokenize("Paris")
    engine = scripted_engine(model, [*thought, THINK_CLOSE, *answer, IM_END])
    result = engine.generate(Request(prompt(model, "Capital?", thinking=True), max_tokens=50, in_reasoning=True))
    assert (result.reasoning, result.content, result.finish_reason) == ("plan", "Paris", "stop")
    assert result.completion_tokens == len(thought) + 1 + len(answer)


def test_multibyte_characters_split_across_tokens_are_never_broken(model):
    byte_tokens = [t for ch in "é€🙂" for t in model.tokenize(ch)]
    assert len(byte_tokens) > 3  # the fixture vocabulary spells them in several byte tokens
    engine = scripted_engine(model, [*byte_tokens, IM_END])
    events = list(engine.stream(Request(prompt(model, "x"), max_tokens=50)))
    texts = [e.text for e in events if e.kind == "content"]
    assert "".join(texts) == "é€🙂" and not any("\ufffd" in t for t in texts)


def test_prompt_longer_than_the_context_is_refused(model):
    engine = Engine(model, n_ctx=64, n_seq_max=2)
    with pytest.raises(UsageError, match="does not fit the context"):
        engine.generate(Request([20 + i % 700 for i in range(engine.n_ctx)], GREEDY))


def test_other_architecture_is_named(llama_arch_gguf):
    with pytest.raises(ModelLoadError, match="is a llama model"):
        LoadedModel(llama_arch_gguf)


def test_follow_up_turns_reuse_the_evaluated_prompt(model):
    from cascade_local.conversation import Conversation, TurnSettings

    settings = TurnSettings(thinking=True, max_tokens=12, sampling=GREEDY)
    chat = Conversation(Engine(model, n_ctx=1024, threads=2))
    for text in ["Hello", "And then?", "Why?"]:
        list(chat.reply(text, settings))
    assert chat.last is not None and chat.last.cached_tokens > 0
    assert chat.last.cached_tokens < chat.last.prompt_tokens

    # The reused state gives exactly what evaluating the whole prompt from scratch gives.
    fresh = Engine(model, n_ctx=1024, threads=2)
    history = chat.messages[:-1]
    tokens = model.encode_prompt(model.template.render(history, enable_thinking=True))
    again = fresh.generate(Request(tokens, GREEDY, max_tokens=12, in_reasoning=True))
    assert again.reasoning == chat.last.reasoning and again.content == chat.last.content
    assert again.cached_tokens == 0


def test_expert_statistics_count_every_routed_token(model):
    from cascade_local.expert_stats import ExpertStats

    stats = ExpertStats(n_expert=8)
    engine = Engine(model, n_ctx=256, threads=2, expert_stats=stats)
    tokens = prompt(model, "Hello")
    result = engine.generate(Request(tokens, GREEDY, max_tokens=10))
    layers = dict(stats.layers())
    assert sorted(layers) == [1, 4]  # the MoE layers
    decoded = len(tokens) + result.completion_tokens - 1  # the last sampled token is never decoded
    for counts in layers.values():
        assert counts.sum() == 2 * decoded  # two experts per token
        assert (counts > 0).sum() >= 2  # routing varies across tokens


def test_ignore_eos_generates_past_the_end_of_turn(model):
    engine = Engine(model, n_ctx=2048, threads=2)
    tokens = prompt(model, "Hello", thinking=True)
    natural = engine.generate(Request(tokens, GREEDY, max_tokens=600, in_reasoning=True))
    assert natural.finish_reason == "stop" and natural.completion_tokens < 600
    forced = engine.generate(Request(tokens, SamplingParams(temperature=0, ignore_eos=True), max_tokens=600,
                                     in_reasoning=True))
    assert forced.finish_reason == "length" and forced.completion_tokens == 600


def test_a_cache_without_a_prefix_snapshots_all_but_the_last_token(model):
    from cascade_local.engine import PromptCache

    engine = Engine(model, n_ctx=512, threads=2)
    cache = PromptCache()
    tokens = prompt(model, "Hello")
    result = engine.generate(Request(tokens, GREEDY, max_tokens=4, cache=cache))
    assert result.completion_tokens == 4 and cache.tokens == tokens[:-1]
