"""The server's pure parts: the prefix store's lookups and eviction, and how a reply is assembled from events."""

from __future__ import annotations

from cascade_local.engine import Event, PromptCache
from cascade_local.server.chat import OutCall, Reply, joined
from cascade_local.server.prefix_cache import PrefixStore


def test_lookup_finds_the_longest_strict_prefix_as_a_copy():
    store = PrefixStore(1000)
    store.put(PromptCache([1, 2], b"ab"))
    store.put(PromptCache([1, 2, 3, 4], b"abcd"))
    store.put(PromptCache([9], b"z"))
    found = store.lookup([1, 2, 3, 4, 5])
    assert (found.tokens, found.state) == ([1, 2, 3, 4], b"abcd")
    assert store.lookup([1, 2, 3, 4]).tokens == [1, 2]  # strictly longer: one token must be left to evaluate
    assert store.lookup([7, 7]).tokens == []
    found.tokens.append(99)  # the engine rewrites the cache it is given; the store keeps its own entry
    assert store.lookup([1, 2, 3, 4, 5]).tokens == [1, 2, 3, 4]


def test_eviction_is_least_recently_used_within_the_byte_budget():
    store = PrefixStore(10)
    store.put(PromptCache([1], b"aaaa"))
    store.put(PromptCache([2], b"bbbb"))
    store.lookup([1, 5])  # [1] is now the most recently used
    store.put(PromptCache([3], b"cccc"))
    assert store.nbytes == 8 and len(store) == 2
    assert store.lookup([2, 5]).tokens == [] and store.lookup([1, 5]).tokens == [1]
    store.put(PromptCache([4], b"x" * 11))  # larger than the whole budget: not kept
    assert store.lookup([4, 5]).tokens == [] and store.nbytes == 8


def _reply(reply: Reply, pieces: list[tuple[str, str]]) -> list:
    outs = []
    for kind, text in pieces:
        outs += reply.feed(Event(None, kind, text))  # type: ignore[arg-type]
    return outs + reply.finish()


def test_a_stop_string_split_across_pieces_is_never_sent():
    reply = Reply(stop=["END"])
    outs = _reply(reply, [("content", "\n\nHello E"), ("content", "N"), ("content", "D and more")])
    assert outs == [("content", "Hello")] and reply.stopped == "END"


def test_whitespace_at_the_ends_is_trimmed_in_streams_as_in_whole_replies():
    outs = _reply(Reply(), [("reasoning", "\n  think"), ("reasoning", "ing \n"), ("reasoning", "more\n"),
                            ("content", "\n\n"), ("content", "Answer  "), ("content", "\n")])
    assert outs == [("reasoning", "think"), ("reasoning", "ing"), ("reasoning", " \nmore"), ("content", "Answer")]
    assert joined(outs)[:2] == ("Answer", "thinking \nmore")


def test_a_call_split_across_pieces_becomes_one_call_and_bad_calls_stay_text():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"n": {"type": "number"}}}}}]
    reply = Reply(tools=tools)
    outs = _reply(reply, [("content", "ok <tool"), ("content", "_call>\n<function=f>\n<parameter=n>\n2.5\n"),
                          ("content", "</parameter>\n</function>\n</tool_call>"),
                          ("content", "<tool_call>nonsense</tool_call>")])
    calls = [o for o in outs if isinstance(o, OutCall)]
    assert [(c.name, c.arguments) for c in calls] == [("f", {"n": 2.5})]
    assert "".join(o[1] for o in outs if not isinstance(o, OutCall)) == "ok <tool_call>nonsense</tool_call>"


def test_stream_live_admits_while_running_and_ends_cancelled_requests(tiny_gguf):
    """Engine.stream_live on the real tiny model: a request taken mid-stream answers as it does alone,
    and a cancelled one ends at once with finish_reason "cancelled"."""
    from cascade_local.engine import Engine, Request
    from cascade_local.llama_model import LoadedModel
    from cascade_local.sampling import SamplingParams

    model = LoadedModel(tiny_gguf("q8_0"))
    engine = Engine(model, n_ctx=1024, n_seq_max=2, threads=2)
    greedy = SamplingParams(temperature=0)
    first = Request(model.tokenize("<|im_start|>user\nOne<|im_end|>\n"), greedy, 40, tag="first")
    late = Request(model.tokenize("<|im_start|>user\nTwo<|im_end|>\n"), greedy, 12, tag="late")
    alone = engine.generate(late)
    pending, cancelled, steps = [first], set(), {"first": 0}
    results = {}

    def take(idle: bool):
        return pending.pop(0) if pending else None

    for event in engine.stream_live(take, lambda tag: tag in cancelled):
        if event.kind == "done":
            results[event.tag] = event.result
            continue
        steps[event.tag] = steps.get(event.tag, 0) + 1
        if event.tag == "first" and steps["first"] == 3:
            pending.append(late)  # arrives while "first" is decoding
        if event.tag == "late" and steps["late"] == 2:
            cancelled.add("first")
    assert results["first"].finish_reason == "cancelled" and results["first"].completion_tokens < 40
    assert (results["late"].reasoning, results["late"].content) == (alone.reasoning, alone.content)
    assert results["late"].completion_tokens == alone.completion_tokens
    engine.close()
    model.close()


def test_sampling_left_out_comes_from_the_modes_defaults():
    from cascade_local.server.anthropic_api import parse_messages_request
    from cascade_local.server.openai_api import parse_chat

    defaults = {True: {"temperature": 1.0, "top_p": 0.95}, False: {"temperature": 0.6, "top_p": 0.9}}.__getitem__
    messages = [{"role": "user", "content": "hi"}]
    off, _, _ = parse_chat({"messages": messages, "reasoning_effort": "none"}, defaults=defaults, max_messages=8)
    on, _, _ = parse_chat({"messages": messages, "top_k": 5}, defaults=defaults, max_messages=8)
    given, _, _ = parse_chat({"messages": messages, "temperature": 0, "chat_template_kwargs": {
        "enable_thinking": False}}, defaults=defaults, max_messages=8)
    assert (off.thinking, off.sampling.temperature, off.sampling.top_p) == (False, 0.6, 0.9)
    assert (on.thinking, on.sampling.temperature, on.sampling.top_k) == (True, 1.0, 5)
    assert (given.sampling.temperature, given.sampling.top_p) == (0.0, 0.9)
    job, _ = parse_messages_request({"messages": messages, "max_tokens": 5, "thinking": {"type": "disabled"}},
                                    defaults=defaults, max_messages=8)
    assert (job.thinking, job.sampling.temperature, job.max_tokens) == (False, 0.6, 5)
