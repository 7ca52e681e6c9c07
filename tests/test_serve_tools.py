"""Tool calls through `serve`: a scripted token stream stands in for the model's choices (the tiny model's own
are random), while the real engine evaluates every token and the real server answers over loopback HTTP."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from cascade_local.engine import Engine
from cascade_local.llama_model import LoadedModel
from cascade_local.server.app import ServeOptions
from cascade_local.server.run import bind, make_server
from cascade_local.testing.scripted import ScriptedSampler

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

IM_END = 11
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather forecast for a city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}}}}}
# The model is known to leave out the last </parameter>: the parser must cope.
CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
        "</function>\n</tool_call>")


@dataclass
class ScriptedServer:
    url: str
    scripts: list[str]  # the texts the "model" writes, one per request, in order
    prompts: list[list[int]]  # the prompt tokens each request was given
    model: LoadedModel


@contextlib.contextmanager
def scripted_server(gguf, options: ServeOptions) -> Iterator[ScriptedServer]:
    """A real server in this process (a thread), its engine's choices scripted."""
    model = LoadedModel(gguf)
    state = ScriptedServer("", [], [], model)

    def sampler(params):
        text = state.scripts.pop(0)
        return ScriptedSampler([*model.tokenize(text), IM_END], then=IM_END)

    engine = Engine(model, n_ctx=2048, n_seq_max=1, threads=2, sampler_factory=sampler)
    original = engine._admit

    def admit(seq, request):  # records what the server asked the engine to evaluate
        state.prompts.append(list(request.prompt_tokens))
        return original(seq, request)

    engine._admit = admit  # type: ignore[method-assign]
    sock = bind("127.0.0.1", 0)
    server = make_server(engine, options)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        thread.join(0.05)
    state.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield state
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        engine.close()
        model.close()


@pytest.fixture(scope="module")
def scripted(tiny_gguf) -> Iterator[ScriptedServer]:
    with scripted_server(tiny_gguf("q8_0"), ServeOptions("scripted")) as state:
        yield state


def _oai(s: ScriptedServer):
    return openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0, timeout=60)


def test_openai_tool_call_parsed_and_typed(scripted):
    scripted.scripts.append("I will look it up.\n" + CALL)
    done = _oai(scripted).chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
        reasoning_effort="none")
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I will look it up."
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}  # days typed by the schema


def test_openai_tool_call_streamed_as_a_delta(scripted):
    scripted.scripts.append(CALL)
    calls, finish = [], None
    for chunk in _oai(scripted).chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
            reasoning_effort="none", stream=True):
        for choice in chunk.choices:
            calls += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (0, "get_weather", {"city": "Paris", "days": 3})]


def test_calls_written_while_thinking_are_not_calls(scripted):
    scripted.scripts.append(f"Maybe {CALL} no, I know it.</think>It is sunny.")
    done = _oai(scripted).chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER])
    message = done.choices[0].message
    assert done.choices[0].finish_reason == "stop" and not message.tool_calls
    assert message.content == "It is sunny."
    assert "<function=get_weather>" in message.model_extra["reasoning_content"]


def test_tool_result_goes_back_through_the_template(scripted):
    scripted.scripts.append("It will be sunny for 3 days.")
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24C"}]
    done = _oai(scripted).chat.completions.create(model="scripted", messages=messages, tools=[WEATHER],
                                                  reasoning_effort="none")
    assert done.choices[0].message.content == "It will be sunny for 3 days."
    prompt = _detok(scripted, scripted.prompts[-1])
    assert "<tool_response>\nsunny, 24C\n</tool_response>" in prompt
    assert "<function=get_weather>\n<parameter=city>\nParis\n</parameter>" in prompt


def test_anthropic_tool_use_round_trip(scripted):
    client = anthropic.Anthropic(base_url=scripted.url, api_key="x", max_retries=0, timeout=60)
    tool = {"name": "get_weather", "description": "The weather forecast for a city.",
            "input_schema": WEATHER["function"]["parameters"]}
    scripted.scripts.append(CALL)
    first = client.messages.create(model="scripted", max_tokens=200, tools=[tool], thinking={"type": "disabled"},
                                   messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert first.stop_reason == "tool_use"
    [use] = [b for b in first.content if b.type == "tool_use"]
    assert (use.name, use.input) == ("get_weather", {"city": "Paris", "days": 3})
    scripted.scripts.append("Sunny.")
    with client.messages.stream(model="scripted", max_tokens=200, tools=[tool], thinking={"type": "disabled"},
                                messages=[{"role": "user", "content": "Weather in Paris?"},
                                          {"role": "assistant", "content": first.content},
                                          {"role": "user", "content": [{"type": "tool_result",
                                                                        "tool_use_id": use.id,
                                                                        "content": "sunny, 24C"}]}]) as stream:
        final = stream.get_final_message()
    assert [(b.type, b.text) for b in final.content] == [("text", "Sunny.")] and final.stop_reason == "end_turn"
    assert "<tool_response>\nsunny, 24C\n</tool_response>" in _detok(scripted, scripted.prompts[-1])


def test_anthropic_streams_a_tool_use_block(scripted):
    client = anthropic.Anthropic(base_url=scripted.url, api_key="x", max_retries=0, timeout=60)
    tool = {"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}
    scripted.scripts.append("Checking." + CALL)
    with client.messages.stream(model="scripted", max_tokens=200, tools=[tool], thinking={"type": "disabled"},
                                messages=[{"role": "user", "content": "Weather in Paris?"}]) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["text", "tool_use"]
    assert final.content[1].input == {"city": "Paris", "days": 3} and final.stop_reason == "tool_use"


def _detok(s: ScriptedServer, tokens: list[int]) -> str:
    """The prompt as text, through the model's own pieces."""
    return b"".join(s.model.piece(t) for t in tokens).decode("utf-8", "replace")


@pytest.mark.parametrize(("fmt", "key", "content"), [
    ("reasoning", "reasoning", "It is sunny."),
    ("inline", None, "<think>\nHmm, Paris.\n</think>\n\nIt is sunny."),
])
def test_reasoning_format(tiny_gguf, fmt, key, content):
    with scripted_server(tiny_gguf("q8_0"), ServeOptions("scripted", reasoning_format=fmt)) as s:
        s.scripts += ["Hmm, Paris.</think>It is sunny."] * 2
        done = _oai(s).chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Paris?"}])
        streamed = ""
        for chunk in _oai(s).chat.completions.create(model="scripted", stream=True,
                                                     messages=[{"role": "user", "content": "Paris?"}]):
            streamed += "".join(c.delta.content or "" for c in chunk.choices)
    message = done.choices[0].message
    assert message.content == content and streamed == content
    assert (message.model_extra or {}).get(key) == ("Hmm, Paris." if key else None)
    assert "reasoning_content" not in (message.model_extra or {})
