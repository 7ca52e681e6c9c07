"""The remote engine: the SSE parser on recorded chunks, and a real OpenAI-compatible server on loopback.

The server is llama-cpp-python's own (`python -m llama_cpp.server`) serving the tiny model; its
output is random text, so the tests check the protocol, never the words.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cascade_local.endpoints import Endpoint, load_endpoints, resolve_endpoint
from cascade_local.errors import CascadeError, UsageError
from cascade_local.remote import (
    AuthenticationError,
    ChatRequest,
    EndpointUnreachableError,
    RemoteEngine,
    RemoteModelNotFoundError,
    RemoteServerError,
    build_body,
    events_from_lines,
    normalize_base_url,
)
from cascade_local.sampling import SamplingParams

HI = [{"role": "user", "content": "Hello"}]


# -- the parser, on recorded streams --------------------------------------------------------------------


def sse(*deltas: dict, finish: str | None = "stop", usage: dict | None = None, done: bool = True) -> list[str]:
    lines: list[str] = []
    for delta in deltas:
        lines += ["data: " + json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}), ""]
    if finish:
        lines += ["data: " + json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}), ""]
    if usage:
        lines += ["data: " + json.dumps({"choices": [], "usage": usage}), ""]
    if done:
        lines += ["data: [DONE]", ""]
    return lines


def run(lines: list[str], thinking: bool) -> tuple[list[tuple[str, str]], object]:
    events = list(events_from_lines(lines, thinking=thinking, tag="t"))
    assert events[-1].kind == "done" and all(e.tag == "t" for e in events)
    return [(e.kind, e.text) for e in events[:-1]], events[-1].result


def joined(pieces: list[tuple[str, str]], kind: str) -> str:
    return "".join(text for k, text in pieces if k == kind)


def test_reasoning_content_deltas_are_reasoning_and_content_stays_whole():
    lines = sse({"role": "assistant"}, {"reasoning_content": "Let me "}, {"reasoning_content": "think."},
                {"content": "The answer "}, {"content": "is <think> 4."},
                usage={"prompt_tokens": 7, "completion_tokens": 9,
                       "completion_tokens_details": {"reasoning_tokens": 4}})
    pieces, result = run(lines, thinking=True)
    assert joined(pieces, "reasoning") == "Let me think."
    assert joined(pieces, "content") == "The answer is <think> 4."  # a parsed stream never carries tags
    assert (result.reasoning, result.content) == ("Let me think.", "The answer is <think> 4.")
    assert (result.prompt_tokens, result.completion_tokens, result.reasoning_tokens) == (7, 9, 4)
    assert result.finish_reason == "stop"


def test_inline_reasoning_after_a_template_that_opened_think():
    lines = sse({"content": "Hmm, "}, {"content": "two plus two.</th"}, {"content": "ink>\n\nFour."}, finish="length")
    pieces, result = run(lines, thinking=True)
    assert joined(pieces, "reasoning") == "Hmm, two plus two."
    assert result.content == "Four."
    assert result.finish_reason == "length"
    assert (result.completion_tokens, result.reasoning_tokens) == (3, 2)  # no usage: counted chunks


def test_inline_think_tags_written_by_the_model():
    lines = sse({"content": "\n<th"}, {"content": "ink>Plan.</think>"}, {"content": "Done."})
    pieces, result = run(lines, thinking=True)
    assert (result.reasoning, result.content) == ("Plan.", "Done.")
    assert "<think>" not in joined(pieces, "reasoning")


def test_thinking_off_content_is_the_answer():
    pieces, result = run(sse({"content": "Just "}, {"content": "this."}), thinking=False)
    assert pieces == [("content", "Just "), ("content", "this.")]
    assert result.reasoning == "" and result.reasoning_tokens == 0


def test_a_stream_cut_short_is_an_error_not_a_short_answer():
    with pytest.raises(RemoteServerError, match="ended before the answer was finished"):
        list(events_from_lines(sse({"content": "Half"}, finish=None, done=False), thinking=False))


def test_an_error_event_in_the_stream_is_raised():
    lines = ["data: " + json.dumps({"error": {"message": "out of memory"}}), ""]
    with pytest.raises(RemoteServerError, match="out of memory"):
        list(events_from_lines(lines, thinking=False))


def test_request_body_carries_thinking_and_sampling():
    sampling = SamplingParams(temperature=0.6, top_p=0.9, top_k=20, seed=3)
    for thinking in (True, False):
        body = build_body(HI, thinking=thinking, sampling=sampling, max_tokens=55, model="m")
        assert body["chat_template_kwargs"] == {"enable_thinking": thinking}
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert (body["model"], body["max_tokens"], body["temperature"], body["top_p"]) == ("m", 55, 0.6, 0.9)
        assert (body["top_k"], body["seed"]) == (20, 3)
    assert "model" not in build_body(HI, thinking=True, sampling=SamplingParams(), max_tokens=1)


@pytest.mark.parametrize(("url", "base"), [
    ("http://127.0.0.1:8000", "http://127.0.0.1:8000/v1"),
    ("127.0.0.1:8000/v1/", "http://127.0.0.1:8000/v1"),
    ("https://h/v1/chat/completions", "https://h/v1"),
])
def test_base_url_is_normalized(url, base):
    assert normalize_base_url(url) == base


def test_429_and_5xx_are_retried_with_back_off_honoring_retry_after():
    calls: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(time.monotonic())
        if len(calls) == 1:
            return httpx.Response(429, headers={"Retry-After": "0.2"}, json={"error": {"message": "slow down"}})
        if len(calls) == 2:
            return httpx.Response(503, text="busy")
        return httpx.Response(200, text="\n".join(sse({"content": "ok"})),
                              headers={"content-type": "text/event-stream"})

    engine = RemoteEngine("http://127.0.0.1:9", transport=httpx.MockTransport(handler), backoff=0.05)
    assert engine.generate_chat(HI, thinking=False).content == "ok"
    assert len(calls) == 3 and calls[1] - calls[0] >= 0.19


def test_retries_are_bounded():
    transport = httpx.MockTransport(lambda request: httpx.Response(500, json={"detail": "boom"}))
    engine = RemoteEngine("http://127.0.0.1:9", transport=transport, max_attempts=3, backoff=0.01)
    with pytest.raises(RemoteServerError, match="answered 500 after 3 attempts: boom"):
        engine.generate_chat(HI)


def test_404_names_the_model():
    transport = httpx.MockTransport(lambda request: httpx.Response(404, json={"error": {"message": "no such"}}))
    engine = RemoteEngine("http://127.0.0.1:9", model="nemo", transport=transport)
    with pytest.raises(RemoteModelNotFoundError, match="no model 'nemo'"):
        engine.generate_chat(HI)


def test_the_key_comes_from_the_named_variable_and_is_never_shown(monkeypatch):
    monkeypatch.setenv("CASCADE_TEST_KEY", "sk-secret")
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization", ""))
        return httpx.Response(401, json={"error": {"message": "bad key sk-secret"}})

    engine = RemoteEngine("http://127.0.0.1:9", api_key_env="CASCADE_TEST_KEY", transport=httpx.MockTransport(handler))
    with pytest.raises(AuthenticationError) as info:
        engine.generate_chat(HI)
    assert seen == ["Bearer sk-secret"]
    assert "sk-secret" not in str(info.value) and "sk-secret" not in repr(engine)


# -- endpoints in models.toml ------------------------------------------------------------------------


def test_endpoints_from_the_user_file(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("CASCADE_LOCAL_HOME", str(tmp_path))
    (tmp_path / "models.toml").write_text(
        '[endpoints.box]\nurl = "http://127.0.0.1:8000/v1"\nmodel = "nemo"\napi_key_env = "BOX_KEY"\n',
        encoding="utf-8")
    assert load_endpoints()["box"] == Endpoint("box", "http://127.0.0.1:8000/v1", "nemo", "BOX_KEY")
    assert resolve_endpoint("box").model == "nemo"
    assert resolve_endpoint("http://127.0.0.1:1/v1").url == "http://127.0.0.1:1/v1"
    with pytest.raises(UsageError, match=r"unknown endpoint 'nope'.*known: box"):
        resolve_endpoint("nope")


def test_an_endpoint_with_a_key_in_the_file_is_refused(tmp_path: Path):
    user = tmp_path / "models.toml"
    user.write_text('[endpoints.box]\nurl = "http://127.0.0.1:8000"\napi_key = "sk-1"\n', encoding="utf-8")
    with pytest.raises(CascadeError, match="api_key_env"):
        load_endpoints(user)


# -- a real server on loopback ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, log: Path, api_key: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        args = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
                "--port", str(self.port), "--n_ctx", "2048", "--verbose", "False"]
        if api_key:
            args += ["--api_key", api_key]
        self._log = log.open("wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited: {log.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(self.url + "/models", headers=headers, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("llama_cpp.server did not answer /v1/models within 60 s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


@pytest.fixture(scope="module")
def server_model(tiny_gguf) -> Path:
    pytest.importorskip("llama_cpp.server.app", reason="needs llama-cpp-python[server]")
    # llama-cpp-python's server cannot be told to avoid ggml's extra CPU buffer types, and on Intel VMs that
    # advertise AMX but cannot run it, Q8_0 and Q4_0 weights would go to AMX and kill the server (SIGILL).
    # F32 weights never go to an extra buffer type, so this model runs on every machine kind.
    return tiny_gguf("f32")


@pytest.fixture(scope="module")
def server(server_model: Path, tmp_path_factory) -> Iterator[Server]:
    srv = Server(server_model, tmp_path_factory.mktemp("server") / "log.txt")
    yield srv
    srv.stop()


@pytest.fixture
def doomed_server(server_model: Path, tmp_path: Path) -> Iterator[Server]:
    """A server of the test's own, which it may kill."""
    srv = Server(server_model, tmp_path / "log.txt")
    yield srv
    srv.kill()
    srv.stop()


GREEDY = SamplingParams(temperature=0, seed=1)
LONG = SamplingParams(ignore_eos=True)


@pytest.mark.parametrize("thinking", [True, False])
def test_streaming_from_a_real_server(server: Server, thinking: bool):
    with RemoteEngine(server.url) as engine:
        assert engine.list_models()
        events = list(engine.stream_chat(HI, thinking=thinking, sampling=GREEDY, max_tokens=24, tag=7))
    assert all(e.tag == 7 for e in events)
    assert [e.kind for e in events][-1] == "done" and [e.kind for e in events].count("done") == 1
    result = events[-1].result
    text = [e for e in events if e.kind in ("reasoning", "content")]
    assert text, "no text streamed"
    assert 0 < result.completion_tokens <= 24 + 8
    assert result.finish_reason in ("stop", "length")
    assert "".join(e.text for e in text if e.kind == "reasoning").strip() == result.reasoning
    if not thinking:  # the tiny model never writes a tag by chance
        assert result.reasoning == "" and result.content


def test_many_requests_at_once(server: Server):
    requests = [ChatRequest(HI, thinking=False, sampling=GREEDY, max_tokens=8, tag=i) for i in range(3)]
    with RemoteEngine(server.url) as engine:
        done = {e.tag for e in engine.stream_many(requests, parallel=3) if e.kind == "done"}
    assert done == {0, 1, 2}


def test_a_closed_port_is_reported_quickly():
    start = time.monotonic()
    with RemoteEngine(f"http://127.0.0.1:{free_port()}/v1") as engine, \
            pytest.raises(EndpointUnreachableError, match=r"cannot reach http://127\.0\.0\.1:.*refused"):
        engine.generate_chat(HI)
    assert time.monotonic() - start < 2


def test_a_wrong_key_is_rejected(server_model: Path, tmp_path: Path, monkeypatch):
    srv = Server(server_model, tmp_path / "log.txt", api_key="right-key")
    try:
        monkeypatch.setenv("CASCADE_TEST_KEY", "wrong-key")
        with RemoteEngine(srv.url, api_key_env="CASCADE_TEST_KEY") as engine, \
                pytest.raises(AuthenticationError, match="rejected the API key"):
            engine.generate_chat(HI, max_tokens=4)
        with RemoteEngine(srv.url, api_key="right-key") as engine:
            assert engine.generate_chat(HI, thinking=False, max_tokens=4).completion_tokens > 0
    finally:
        srv.stop()


def test_a_server_killed_mid_stream_is_a_clear_error(doomed_server: Server):
    # ignore_eos keeps the tiny model from ending early: the answer is still being written at the kill.
    with RemoteEngine(doomed_server.url) as engine:
        stream = engine.stream_chat(HI, thinking=False, sampling=LONG, max_tokens=1500)
        next(stream)
        doomed_server.kill()
        with pytest.raises(RemoteServerError, match=r"in the middle of an answer|ended before the answer"):
            list(stream)


def test_a_server_killed_mid_batch_is_a_clear_error(doomed_server: Server):
    requests = [ChatRequest(HI, thinking=False, sampling=LONG, max_tokens=1500, tag=i) for i in range(3)]
    with RemoteEngine(doomed_server.url) as engine:
        events = engine.stream_many(requests, parallel=2)
        next(events)
        doomed_server.kill()
        with pytest.raises((RemoteServerError, EndpointUnreachableError)):
            list(events)


def test_run_with_an_endpoint(server: Server):
    from conftest import run_cli

    done = run_cli("run", "--endpoint", server.url, "--no-think", "--max-tokens", "6", "--json", "Hello", input="")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["usage"]["completion_tokens"] > 0
    closed = run_cli("run", "--endpoint", f"http://127.0.0.1:{free_port()}", "Hello", input="")
    assert closed.returncode == 2 and "cannot reach" in closed.stderr


def test_batch_against_a_server_killed_midway_resumes_once_it_is_back(server_model: Path, tmp_path: Path):
    """batch --endpoint: the server dies mid-job (exit 2, what was answered is kept); a resume against
    the server restarted elsewhere answers the rest, every id exactly once."""
    from conftest import CLI

    prompts = tmp_path / "in.txt"
    prompts.write_text("".join(f"Question number {i}?\n" for i in range(30)))
    out = tmp_path / "out.jsonl"
    first = Server(server_model, tmp_path / "first.log")
    try:
        job = subprocess.Popen([*CLI, "batch", str(prompts), "-o", str(out), "--endpoint", first.url, "--parallel", "2",
                                "--max-tokens", "400", "--no-think"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 2):
            time.sleep(0.05)
        first.kill()
        _, stderr = job.communicate(timeout=60)
    finally:
        first.stop()
    done_before = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert job.returncode == 2 and len(done_before) < 30, stderr
    assert "Traceback" not in stderr and len([s for s in stderr.splitlines() if s.strip()]) == 1

    second = Server(server_model, tmp_path / "second.log")
    try:
        from conftest import run_cli

        resumed = run_cli("batch", str(prompts), "-o", str(out), "--endpoint", second.url, "--parallel", "2",
                          "--max-tokens", "40", "--no-think", timeout=300)
    finally:
        second.stop()
    assert resumed.returncode == 0, resumed.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    answered = [r["id"] for r in records if r["error"] is None]
    assert sorted(answered) == list(range(1, 31)) and len(answered) == 30


def test_chat_with_an_endpoint(server: Server):
    from conftest import run_cli

    done = run_cli("chat", "--endpoint", server.url, "--no-think", "--max-tokens", "5", input="Hi\n/stats\n/exit\n")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count(">>> ") == 3 and "served by http://127.0.0.1" in " ".join(done.stderr.split())
    closed = run_cli("chat", "--endpoint", f"http://127.0.0.1:{free_port()}", "--no-think", input="Hi\n/exit\n")
    assert "cannot reach" in closed.stderr and "Traceback" not in closed.stderr
