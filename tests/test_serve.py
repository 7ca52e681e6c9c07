"""`cascade-local serve`: a real server on 127.0.0.1 serving the tiny GGUF, driven by the official SDKs."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
from conftest import CLI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")


@dataclass
class Served:
    proc: subprocess.Popen
    url: str
    stderr: list[str]

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(f"cascade_{name} "):
                return float(line.split()[1])
        raise AssertionError(f"no metric {name}")


def start_server(gguf, *args: str, env: dict | None = None) -> Served:
    """The real command in a child process, on a free port (it binds port 0 and says which it got)."""
    full_env = {**os.environ, "NO_COLOR": "1", **(env or {})}
    proc = subprocess.Popen([*CLI, "serve", str(gguf), "--port", "0", "--threads", "2", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            seen.append(line)
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited {proc.returncode}: {''.join(seen)}") from None
            continue
        if line.startswith("listening on "):
            return Served(proc, line.split()[2], seen)
    proc.kill()
    raise AssertionError(f"serve did not start: {''.join(seen)}")


def stop_server(served: Served) -> int:
    served.proc.send_signal(signal.SIGTERM)
    try:
        return served.proc.wait(timeout=30)
    finally:
        if served.proc.poll() is None:
            served.proc.kill()


@pytest.fixture(scope="module")
def server(tiny_gguf) -> Iterator[Served]:
    served = start_server(tiny_gguf("q8_0"), "--parallel", "2", "--ctx", "512", "--max-body", "64KiB")
    yield served
    assert stop_server(served) == 0


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def ask(oai, text: str, **kw):
    kw.setdefault("max_tokens", 12)
    return oai.chat.completions.create(model="tiny-q8_0", messages=[{"role": "user", "content": text}],
                                       temperature=0, **kw)


# -- the basics ----------------------------------------------------------------------------------------------


def test_health_and_models(server, oai):
    health = httpx.get(f"{server.url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["parallel"] == 2
    assert [m.id for m in oai.models.list()] == ["tiny-q8_0"]
    listed = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0).models.list()
    assert [(m.id, m.display_name) for m in listed] == [("tiny-q8_0", "tiny-q8_0")]
    assert "listening on http://127.0.0.1:" in "".join(server.stderr)


def test_chat_completion_keeps_reasoning_apart_and_counts_usage(oai):
    done = ask(oai, "Hello there")
    message = done.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning and not message.content  # 12 tokens end inside the thought: nothing leaks into content
    assert done.usage.prompt_tokens > 0 and done.usage.completion_tokens == 12
    assert done.usage.completion_tokens_details.reasoning_tokens == 12  # never closed its thought in 12 tokens
    assert done.choices[0].finish_reason == "length"


def test_thinking_off_per_request(oai):
    off = ask(oai, "Hello there", extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    effort = ask(oai, "Hello there", reasoning_effort="none")
    on = ask(oai, "Hello there")
    assert off.usage.completion_tokens_details.reasoning_tokens == 0
    assert off.choices[0].message.content == effort.choices[0].message.content != ""
    assert "reasoning_content" not in (off.choices[0].message.model_extra or {})
    assert on.usage.completion_tokens_details.reasoning_tokens > 0


def test_thinking_budget_closes_the_thought(oai):
    done = ask(oai, "Hello there", max_tokens=20, extra_body={"thinking_budget": 3})
    assert done.usage.completion_tokens_details.reasoning_tokens == 3
    assert done.choices[0].message.content  # the answer came after the closed thought


def test_streamed_equals_whole(oai):
    whole = ask(oai, "Tell me about cats", max_tokens=16)
    reasoning, content, usage, finish = "", "", None, None
    for chunk in ask(oai, "Tell me about cats", max_tokens=16, stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert reasoning.strip() == whole.choices[0].message.model_extra["reasoning_content"]
    assert content.strip() == (whole.choices[0].message.content or "")
    assert usage.completion_tokens == whole.usage.completion_tokens and finish == whole.choices[0].finish_reason


def test_parallel_answers_equal_one_at_a_time(server, oai):
    prompts = [f"Question number {i}: what is {i} + {i}?" for i in range(5)]
    alone = [ask(oai, p, max_tokens=10).choices[0].message.model_extra["reasoning_content"] for p in prompts]
    with ThreadPoolExecutor(5) as pool:
        together = list(pool.map(lambda p: ask(oai, p, max_tokens=10), prompts))
    assert [d.choices[0].message.model_extra["reasoning_content"] for d in together] == alone
    assert len(set(alone)) > 1  # the prompts are told apart, so a mix-up would show


def test_resent_conversation_hits_the_prefix_cache_with_identical_output(server, oai):
    messages = [{"role": "system", "content": "You are a terse assistant for prefix-cache checks."},
                {"role": "user", "content": "Name three rivers."}]
    hits = server.metric("prefix_cache_hits_total")
    first = oai.chat.completions.create(model="tiny-q8_0", messages=messages, temperature=0, max_tokens=10)
    second = oai.chat.completions.create(model="tiny-q8_0", messages=messages, temperature=0, max_tokens=10)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert 0 < second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    assert second.choices[0].message.model_extra == first.choices[0].message.model_extra
    assert second.choices[0].message.content == first.choices[0].message.content
    # An agent's next call: the same conversation, the reply and a new question appended.
    reply = first.choices[0].message
    grown = [*messages, {"role": "assistant", "content": reply.content or "ok",
                         "reasoning_content": reply.model_extra["reasoning_content"]},
             {"role": "user", "content": "And three lakes?"}]
    third = oai.chat.completions.create(model="tiny-q8_0", messages=grown, temperature=0, max_tokens=4)
    assert third.usage.prompt_tokens_details.cached_tokens >= second.usage.prompt_tokens_details.cached_tokens
    assert server.metric("prefix_cache_hits_total") == hits + 2


def test_stop_string_ends_the_answer(oai):
    free = ask(oai, "Hello there", max_tokens=16, reasoning_effort="none").choices[0].message.content
    stop = free.strip()[3:5]
    stopped = ask(oai, "Hello there", max_tokens=16, reasoning_effort="none", stop=[stop])
    assert stopped.choices[0].message.content == free[: free.index(stop)].strip()
    assert stopped.choices[0].finish_reason == "stop"


# -- Anthropic Messages --------------------------------------------------------------------------------------


def test_messages_whole_and_streamed(claude):
    whole = claude.messages.create(model="tiny-q8_0", max_tokens=12, extra_body={"temperature": 0},
                                   messages=[{"role": "user", "content": "Hello there"}])
    assert [b.type for b in whole.content] == ["thinking"] and whole.content[0].thinking
    assert whole.stop_reason == "max_tokens" and whole.usage.output_tokens == 12
    with claude.messages.stream(model="tiny-q8_0", max_tokens=12, extra_body={"temperature": 0},
                                messages=[{"role": "user", "content": "Hello there"}]) as stream:
        final = stream.get_final_message()
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in whole.content]
    assert final.stop_reason == whole.stop_reason


def test_messages_thinking_disabled_and_budget(claude):
    off = claude.messages.create(model="tiny-q8_0", max_tokens=8, thinking={"type": "disabled"},
                                 extra_body={"temperature": 0},
                                 messages=[{"role": "user", "content": "Hello there"}])
    assert [b.type for b in off.content] == ["text"]
    budget = claude.messages.create(model="tiny-q8_0", max_tokens=20, extra_body={"temperature": 0},
                                    thinking={"type": "enabled", "budget_tokens": 3},
                                    messages=[{"role": "user", "content": "Hello there"}])
    assert [b.type for b in budget.content] == ["thinking", "text"]  # the thought closed after 3 tokens


def test_messages_earlier_turns_with_thinking_and_cache_reads(claude):
    turns = [{"role": "user", "content": "Count to three, please, for the cache."}]
    first = claude.messages.create(model="tiny-q8_0", max_tokens=6, extra_body={"temperature": 0}, messages=turns)
    turns += [{"role": "assistant", "content": [{"type": "thinking", "thinking": "Easy.", "signature": ""},
                                                {"type": "text", "text": "1 2 3"}]},
              {"role": "user", "content": [{"type": "text", "text": "Now to four."}]}]
    second = claude.messages.create(model="tiny-q8_0", max_tokens=6, extra_body={"temperature": 0}, messages=turns)
    assert first.usage.cache_read_input_tokens == 0
    assert second.usage.cache_read_input_tokens > 0
    assert second.usage.input_tokens + second.usage.cache_read_input_tokens > first.usage.input_tokens


# -- bad input -----------------------------------------------------------------------------------------------

GOOD = {"model": "tiny-q8_0", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize(("path", "body", "status", "needle"), [
    ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
    ("/v1/chat/completions", b"[" * 30000 + b"]" * 30000, 400, "nests too deeply"),
    ("/v1/chat/completions", {**GOOD, "temperature": "hot"}, 400, "'temperature' must be a number"),
    ("/v1/chat/completions", {**GOOD, "max_tokens": True}, 400, "'max_tokens' must be an integer"),
    ("/v1/chat/completions", {**GOOD, "model": "gpt-4"}, 404, "'gpt-4' is not served here"),
    ("/v1/chat/completions", {**GOOD, "messages": []}, 400, "non-empty array"),
    ("/v1/chat/completions", {**GOOD, "messages": [{"role": "wizard", "content": "x"}]}, 400, ".role"),
    ("/v1/chat/completions", {**GOOD, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "text only"),
    ("/v1/chat/completions", {**GOOD, "n": 3}, 400, "'n' must be 1"),
    ("/v1/chat/completions", {**GOOD, "messages": [{"role": "user", "content": "word " * 20000}]}, 413,
     "limit"),
    ("/v1/chat/completions", {**GOOD, "messages": [{"role": "user", "content": "word " * 1000}]}, 400,
     "this server's context holds 512"),
    ("/v1/messages", {**GOOD, "max_tokens": None}, 400, "'max_tokens' is required"),
    ("/v1/messages", {**GOOD, "thinking": {"type": "sometimes"}}, 400, "thinking.type"),
    ("/v1/messages", b"{not json", 400, "not valid JSON"),
])
def test_bad_requests_get_their_status_and_a_json_error(server, path, body, status, needle):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = httpx.post(f"{server.url}{path}", content=data, headers={"content-type": "application/json"},
                       timeout=30)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert needle in error["message"] and "Traceback" not in reply.text
    if path == "/v1/messages":
        assert reply.json()["type"] == "error"
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200  # still answering


def test_too_long_prompt_names_both_numbers(server):
    body = {**GOOD, "messages": [{"role": "user", "content": "word " * 1000}]}
    error = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30).json()["error"]
    tokens = int(error["message"].split("the prompt is ")[1].split()[0])
    assert tokens > 512 and "512" in error["message"]


def test_openai_sdk_raises_its_own_error_types(oai):
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="tiny-q8_0", messages=[])


# -- lifecycle, keys, slots ----------------------------------------------------------------------------------


def test_sigterm_drains_an_open_stream_then_exits_0(tiny_gguf):
    served = start_server(tiny_gguf("q8_0"), "--parallel", "1", "--ctx", "512")
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0, timeout=60)
    stream = client.chat.completions.create(model="tiny-q8_0", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=200, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = iter(stream)
    next(chunks)
    served.proc.send_signal(signal.SIGTERM)
    rest = list(chunks)
    usage = [c.usage for c in rest if c.usage]
    assert usage and usage[0].completion_tokens > 0
    assert [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason]
    assert served.proc.wait(timeout=30) == 0
    assert "stopped" in "".join(served.stderr)


def test_a_client_that_leaves_frees_its_slot(tiny_gguf):
    served = start_server(tiny_gguf("q8_0"), "--parallel", "1", "--ctx", "2048", "--queue", "0")
    try:
        body = {**GOOD, "max_tokens": 1500, "stream": True, "temperature": 0}
        with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, timeout=30) as reply:
            lines = reply.iter_lines()
            for _ in range(6):
                next(lines)
        # With one slot and no queue, a second request is answered only if the first was cancelled.
        deadline = time.monotonic() + 20
        while served.metric("active_sequences") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert served.metric("requests_cancelled_total") == 1
        done = httpx.post(f"{served.url}/v1/chat/completions", json=GOOD, timeout=30)
        assert done.status_code == 200
    finally:
        assert stop_server(served) == 0


def test_a_non_streamed_client_that_leaves_is_cancelled_too(tiny_gguf):
    import socket

    served = start_server(tiny_gguf("q8_0"), "--parallel", "1", "--ctx", "32768")
    try:
        # ignore_eos: the answer runs until the hang-up, whatever the tiny model would choose.
        body = json.dumps({**GOOD, "max_tokens": 32000, "temperature": 0, "ignore_eos": True}).encode()
        host, port = served.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:  # send the request, then hang up
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.monotonic() + 20
            while not served.metric("active_sequences") and time.monotonic() < deadline:
                time.sleep(0.1)  # hang up only once it is decoding
            assert served.metric("active_sequences") == 1
        deadline = time.monotonic() + 20
        while served.metric("requests_cancelled_total") < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert served.metric("requests_cancelled_total") == 1
        assert served.metric("completion_tokens_total") < 32000
    finally:
        assert stop_server(served) == 0


def test_a_full_queue_answers_429_with_retry_after(tiny_gguf):
    served = start_server(tiny_gguf("q8_0"), "--parallel", "1", "--ctx", "32768", "--queue", "0")
    try:
        # ignore_eos and a long answer (seconds, even for the tiny model on an idle machine): the first request
        # holds the only slot until the second is refused, whatever the model says.
        body = {**GOOD, "max_tokens": 30000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, timeout=30) as reply:
            # Kept in a name: a temporary iterator, collected at once, would close the stream and the server
            # would cancel the request as a client that left.
            lines = reply.iter_lines()
            next(lines)
            deadline = time.monotonic() + 20
            while not served.metric("active_sequences") and time.monotonic() < deadline:
                time.sleep(0.05)  # the first request holds the slot, not only a place in the queue
            assert served.metric("active_sequences") == 1
            busy = httpx.post(f"{served.url}/v1/chat/completions", json=GOOD, timeout=30)
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        assert "busy" in busy.json()["error"]["message"]
    finally:
        assert stop_server(served) == 0


def test_api_key_is_required_when_set(tiny_gguf):
    served = start_server(tiny_gguf("q8_0"), "--ctx", "512", "--api-key-env", "CASCADE_TEST_KEY",
                          env={"CASCADE_TEST_KEY": "s3cret"})
    try:
        wrong = openai.OpenAI(base_url=f"{served.url}/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = anthropic.Anthropic(base_url=served.url, api_key="s3cret", max_retries=0)
        assert right.messages.create(model="tiny-q8_0", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
        assert httpx.get(f"{served.url}/health", timeout=10).status_code == 200  # health needs no key
    finally:
        assert stop_server(served) == 0


def test_other_hosts_need_a_key_or_no_auth(tiny_gguf):
    from conftest import run_cli

    done = run_cli("serve", str(tiny_gguf("q8_0")), "--host", "0.0.0.0", "--port", "0")
    assert done.returncode == 1 and "--api-key-env" in done.stderr and "Traceback" not in done.stderr


def test_a_taken_port_is_one_line(server, tiny_gguf):
    from conftest import run_cli

    port = server.url.rsplit(":", 1)[1]
    done = run_cli("serve", str(tiny_gguf("q8_0")), "--port", port, "--threads", "2")
    assert done.returncode == 1 and f"port {port} on 127.0.0.1 is taken" in done.stderr
    assert "Traceback" not in done.stderr


def test_bad_options_are_refused_before_loading(tmp_path):
    from conftest import run_cli

    missing = str(tmp_path / "absent.gguf")  # never loaded: each refusal comes first
    for args, needle in [(["--cache-mem", "lots"], "cannot read 'lots' as a memory size"),
                         (["--reasoning-format", "xml"], "--reasoning-format must be one of"),
                         (["--api-key-env", "CASCADE_TEST_UNSET"], "CASCADE_TEST_UNSET: that environment variable")]:
        done = run_cli("serve", missing, "--port", "0", *args)
        assert done.returncode == 1 and needle in done.stderr, done.stderr


def test_cascade_local_run_batch_and_chat_against_serve(server, tiny_gguf, tmp_path):
    from conftest import run_cli

    args = ["Hello", "--no-think", "--max-tokens", "8", "--temperature", "0", "--json"]
    local = run_cli("run", str(tiny_gguf("q8_0")), *args, "--threads", "2")
    remote = run_cli("run", "--endpoint", f"{server.url}/v1", *args)
    assert local.returncode == remote.returncode == 0, remote.stderr
    assert json.loads(remote.stdout)["content"] == json.loads(local.stdout)["content"] != ""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first\nsecond\nthird\n")
    done = run_cli("batch", str(prompts), "-o", str(tmp_path / "out.jsonl"), "--endpoint", f"{server.url}/v1",
                   "--parallel", "3", "--max-tokens", "4", "--no-think", "--temperature", "0")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == [1, 2, 3] and all(r["error"] is None for r in records)
    chat = run_cli("chat", "--endpoint", f"{server.url}/v1", "--no-think", "--max-tokens", "8", "--temperature",
                   "0", input="Hello\n")
    assert chat.returncode == 0, chat.stderr
    assert f"served by {server.url}/v1" in chat.stderr and "8 tokens (0 thinking)" in chat.stderr


@pytest.mark.slow
def test_load_32_streaming_clients_on_4_slots_and_steady_memory(tiny_gguf):
    import psutil

    served = start_server(tiny_gguf("q8_0"), "--parallel", "4", "--ctx", "256")
    try:
        client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0, timeout=120)
        prompts = [f"Client {i} asks about item {i * 7}." for i in range(32)]

        def streamed(prompt: str) -> str:
            text = ""
            for chunk in client.chat.completions.create(model="tiny-q8_0", messages=[{"role": "user",
                                                        "content": prompt}], max_tokens=8, temperature=0,
                                                        stream=True):
                for choice in chunk.choices:
                    text += (choice.delta.model_extra or {}).get("reasoning_content") or choice.delta.content or ""
            return text

        alone = [streamed(p) for p in prompts]
        with ThreadPoolExecutor(32) as pool:
            together = list(pool.map(streamed, prompts))
        assert together == alone and len(set(alone)) > 1
        rss = psutil.Process(served.proc.pid).memory_info().rss
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(streamed, prompts * 5))  # 160 more: 224 requests in all
        grown = psutil.Process(served.proc.pid).memory_info().rss - rss
        assert grown < 16 << 20, f"RSS grew by {grown / 2**20:.1f} MiB over 160 requests"
        assert served.metric("requests_total") == 224
    finally:
        assert stop_server(served) == 0


SCALARS = (st.none() | st.booleans() | st.integers(-3, 10**12) | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(max_size=8))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) |
                    st.dictionaries(st.sampled_from(["role", "content", "type", "text", "name", "function",
                                                     "arguments", "enable_thinking", "budget_tokens"]), inner,
                                    max_size=3), max_leaves=8)
FIELDS = ["messages", "model", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "n", "stream", "tools",
          "tool_choice", "chat_template_kwargs", "reasoning_effort", "thinking_budget", "thinking", "system",
          "stop_sequences", "stream_options", "max_completion_tokens"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/messages"]),
       body=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=4),
       content=st.one_of(st.none(), st.text(max_size=20), JSON))
def test_any_json_gets_an_answer_or_a_4xx_never_a_500(server, path, body, content):
    body = {**body, "max_tokens": 1}
    if content is not None:  # often a well-formed message, so that the other fields are reached
        body.setdefault("messages", [{"role": "user", "content": content}])
    reply = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert reply.status_code in (200, 400, 404), reply.text
    assert "Traceback" not in reply.text
    if reply.status_code != 200:
        assert reply.json()["error"]
