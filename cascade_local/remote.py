"""A second engine: an OpenAI-compatible server (vLLM, SGLang, llama.cpp's llama-server) instead of llama.cpp here.

The local `Engine` takes prompt tokens; a server renders its own chat template, so this one takes
messages. It yields the same `Event`s and `Result`s:

    engine = RemoteEngine("http://127.0.0.1:8000/v1", api_key_env="OPENAI_API_KEY")
    for event in engine.stream_chat([{"role": "user", "content": "Hi"}], thinking=True):
        ...

Reasoning arrives in one of two ways. A server with a reasoning parser (vLLM, SGLang) sends it as
`delta.reasoning_content` and never sends the tags; one without (llama-server with
`--reasoning-format none`, llama-cpp-python) streams it inline in `delta.content`, either after a
template that already opened `<think>` (reasoning first, then `</think>`) or with the tags in the text.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from cascade_local.engine import Event, FinishReason, Result
from cascade_local.errors import CascadeError
from cascade_local.sampling import SamplingParams
from cascade_local.thinking import OPEN, Piece, ThinkingSplitter

Message = Mapping[str, Any]


class RemoteError(CascadeError):
    """The server could not be used, or failed while answering."""

    exit_code = 2


class EndpointUnreachableError(RemoteError):
    """Nothing answers at the URL (wrong host or port, server not started, DNS failure)."""


class AuthenticationError(RemoteError):
    """401/403: the API key is missing or wrong."""


class RemoteModelNotFoundError(RemoteError):
    """404: the server does not serve the model asked for (or the URL's path is wrong)."""


class RemoteServerError(RemoteError):
    """The server failed (5xx, 429 after retries, a broken stream, a malformed reply)."""


@dataclass(frozen=True)
class ChatRequest:
    """One conversation to continue, the message-level counterpart of `engine.Request`."""

    messages: Sequence[Message]
    thinking: bool = True
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 4096
    tag: Any = None


RETRY_STATUS = frozenset({429, 500, 502, 503, 504})

# After stream_many cancels its requests, how long it waits for its workers to notice before it returns anyway
# (they are daemon threads: one stuck connecting to a dead host cannot keep the process alive).
CANCEL_GRACE = 2.0


class RemoteEngine:
    """Talks to `base_url` (".../v1" or the server's root) with the chat-completions API, streaming.

    `api_key` wins over `api_key_env`, the name of an environment variable holding the key; the key
    is only ever sent in the Authorization header. `model` may be left out for a server that serves
    one model (llama-server, llama-cpp-python); vLLM and SGLang need the served name.
    """

    def __init__(self, base_url: str, *, api_key: str | None = None, api_key_env: str | None = None,
                 model: str | None = None, timeout: float = 600.0, connect_timeout: float = 5.0,
                 max_attempts: int = 4, backoff: float = 0.5, max_backoff: float = 30.0,
                 transport: httpx.BaseTransport | None = None):
        self.base_url = normalize_base_url(base_url)
        self.model = model
        self.max_attempts = max(1, max_attempts)
        self.backoff = backoff
        self.max_backoff = max_backoff
        key = api_key if api_key is not None else (os.environ.get(api_key_env) if api_key_env else None)
        headers = {"Accept": "text/event-stream"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.Client(base_url=self.base_url, headers=headers, transport=transport,
                                    timeout=httpx.Timeout(timeout, connect=connect_timeout))

    def __repr__(self) -> str:  # never the key
        return f"RemoteEngine({self.base_url!r}, model={self.model!r})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RemoteEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the API ---------------------------------------------------------------------------------------

    def stream_chat(self, messages: Sequence[Message], *, thinking: bool = True,
                    sampling: SamplingParams | None = None, max_tokens: int = 4096, tag: Any = None) -> Iterator[Event]:
        """Reasoning and content pieces as the server sends them, then `done` with the Result."""
        body = build_body(messages, thinking=thinking, sampling=sampling or SamplingParams(), max_tokens=max_tokens,
                          model=self.model)
        return self._events(body, thinking, tag, None)

    def _events(self, body: dict[str, Any], thinking: bool, tag: Any, inflight: _InFlight | None) -> Iterator[Event]:
        started = time.perf_counter()
        with _StreamContext(self, body, inflight) as response:
            yield from events_from_lines(self._lines(response), thinking=thinking, tag=tag, started=started,
                                         where=self.base_url)

    def generate_chat(self, messages: Sequence[Message], *, thinking: bool = True,
                      sampling: SamplingParams | None = None, max_tokens: int = 4096) -> Result:
        """Runs one chat turn to the end and returns its Result."""
        for event in self.stream_chat(messages, thinking=thinking, sampling=sampling, max_tokens=max_tokens):
            if event.kind == "done":
                assert event.result is not None
                return event.result
        raise AssertionError("a stream ended without a result")

    def stream(self, request: ChatRequest) -> Iterator[Event]:
        return self.stream_chat(request.messages, thinking=request.thinking, sampling=request.sampling,
                                max_tokens=request.max_tokens, tag=request.tag)

    def stream_many(self, requests: Iterable[ChatRequest], *, parallel: int = 4) -> Iterator[Event]:
        """Up to `parallel` requests in flight at once (the server batches them); events interleave.

        The first error is raised here. It, or the consumer stopping (its own error, Ctrl-C, closing this
        iterator), cancels the requests in flight at once: their connections are shut down, so no one waits
        for a server that has stopped sending, and the server sees the client go.
        """
        pending = list(requests)
        work: queue.Queue[ChatRequest] = queue.Queue()
        for request in pending:
            work.put(request)
        items: queue.Queue[tuple[str, Any]] = queue.Queue()
        inflight = _InFlight()

        def worker() -> None:
            while not inflight.cancelled.is_set():
                try:
                    request = work.get_nowait()
                except queue.Empty:
                    return
                try:
                    body = build_body(request.messages, thinking=request.thinking, sampling=request.sampling,
                                      max_tokens=request.max_tokens, model=self.model)
                    for event in self._events(body, request.thinking, request.tag, inflight):
                        if inflight.cancelled.is_set():
                            return  # no one reads these any more
                        items.put(("event", event))
                except BaseException as exc:  # handed to the consumer, which raises it (unless it has gone)
                    items.put(("error", exc))
                finally:
                    items.put(("finished", None))

        threads = [threading.Thread(target=worker, name=f"remote-{i}", daemon=True)
                   for i in range(min(max(1, parallel), len(pending)))]
        for thread in threads:
            thread.start()
        try:
            left = len(pending)
            while left:
                kind, value = items.get()
                if kind == "finished":
                    left -= 1
                elif kind == "error":
                    raise value
                else:
                    yield value
        finally:
            inflight.cancel()
            deadline = time.monotonic() + CANCEL_GRACE
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))

    def list_models(self) -> list[str]:
        """The model ids the server offers (GET /models)."""
        response = self._send("GET", "/models")
        try:
            return [m["id"] for m in response.json().get("data", [])]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise RemoteServerError(f"{self.base_url}/models did not answer with a model list") from None

    # -- HTTP ------------------------------------------------------------------------------------------

    def _send(self, method: str, path: str, body: dict[str, Any] | None = None, *, stream: bool = False,
              inflight: _InFlight | None = None) -> httpx.Response:
        """The response, once its status is 2xx; retries 429 and 5xx with back-off, raises typed errors."""
        for attempt in range(1, self.max_attempts + 1):
            if inflight is not None and inflight.cancelled.is_set():
                raise RemoteCancelled("cancelled")
            request = self._client.build_request(method, path, json=body)
            try:
                response = self._client.send(request, stream=stream)
            except httpx.TimeoutException as exc:
                if isinstance(exc, httpx.ConnectTimeout):
                    raise EndpointUnreachableError(f"cannot reach {self.base_url}: connection timed out") from None
                raise RemoteServerError(f"{self.base_url} did not answer in time") from None
            except httpx.TransportError as exc:
                raise EndpointUnreachableError(f"cannot reach {self.base_url}: {_reason(exc)}") from None
            if response.status_code < 400:
                return response
            if stream:
                response.read()
            response.close()
            if response.status_code in RETRY_STATUS and attempt < self.max_attempts:
                delay = self._delay(attempt, response.headers.get("retry-after"))
                if inflight is not None:
                    inflight.cancelled.wait(delay)  # a cancel ends the back-off at once
                else:
                    time.sleep(delay)
                continue
            raise self._status_error(response, attempt)
        raise AssertionError("unreachable")

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(max(float(retry_after), 0.0), self.max_backoff)
            except ValueError:
                pass  # an HTTP date: fall back to our own schedule
        return min(self.backoff * 2 ** (attempt - 1), self.max_backoff)

    def _status_error(self, response: httpx.Response, attempts: int) -> RemoteError:
        code, detail = response.status_code, _error_detail(response)
        if code in (401, 403):
            return AuthenticationError(f"the server at {self.base_url} rejected the API key ({code}); set the key's "
                                       "environment variable (api_key_env) to the right key")
        if code == 404:
            what = f"model {self.model!r}" if self.model else "the chat-completions endpoint"
            return RemoteModelNotFoundError(f"{self.base_url} has no {what} (404{': ' + detail if detail else ''}); "
                                            "check the model name (GET /v1/models lists them) and the URL")
        tried = f" after {attempts} attempts" if attempts > 1 else ""
        if code == 429:
            return RemoteServerError(f"{self.base_url} is rate limiting (429){tried}; try again later")
        return RemoteServerError(f"{self.base_url} answered {code}{tried}{': ' + detail if detail else ''}")

    def _lines(self, response: httpx.Response) -> Iterator[str]:
        try:
            yield from response.iter_lines()
        except httpx.TimeoutException:
            raise RemoteServerError(f"{self.base_url} stopped sending in the middle of an answer (timed out)") from None
        except (httpx.TransportError, httpx.StreamError) as exc:
            raise RemoteServerError(f"the connection to {self.base_url} broke in the middle of an answer "
                                    f"({_reason(exc)})") from None


class RemoteCancelled(RemoteError):
    """A request of `stream_many` that was cancelled because another failed or the consumer stopped."""


class _InFlight:
    """The open responses of one `stream_many`, so that the consumer can cut them all at once from its thread.

    Cutting shuts the connection's socket down: a worker blocked reading it wakes with end-of-stream (closing
    an httpx response from another thread is not safe, and a plain close() would not wake the reader). Each
    worker still closes its own response.
    """

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self._lock = threading.Lock()
        self._open: set[httpx.Response] = set()

    def add(self, response: httpx.Response) -> None:
        with self._lock:
            if not self.cancelled.is_set():
                self._open.add(response)
                return
        _cut(response)  # opened just as everything was cancelled
        raise RemoteCancelled("cancelled")

    def discard(self, response: httpx.Response) -> None:
        with self._lock:
            self._open.discard(response)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled.set()
            responses = list(self._open)
        for response in responses:
            _cut(response)


def _cut(response: httpx.Response) -> None:
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class _StreamContext:
    def __init__(self, engine: RemoteEngine, body: dict[str, Any], inflight: _InFlight | None = None):
        self._engine, self._body, self._inflight = engine, body, inflight
        self._response: httpx.Response | None = None

    def __enter__(self) -> httpx.Response:
        response = self._engine._send("POST", "/chat/completions", self._body, stream=True, inflight=self._inflight)
        if self._inflight is not None:
            try:
                self._inflight.add(response)
            except BaseException:
                response.close()
                raise
        self._response = response
        return response

    def __exit__(self, *exc: object) -> None:
        if self._response is not None:
            if self._inflight is not None:
                self._inflight.discard(self._response)
            self._response.close()


def normalize_base_url(url: str) -> str:
    """"http://host:8000", ".../v1/" or ".../v1/chat/completions" -> "http://host:8000/v1"."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    for suffix in ("/chat/completions", "/completions"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    return url if url.endswith("/v1") or "/v1/" in url else url + "/v1"


def build_body(messages: Sequence[Message], *, thinking: bool, sampling: SamplingParams, max_tokens: int,
               model: str | None = None) -> dict[str, Any]:
    """The chat-completions request. Unknown fields are ignored by the servers that do not use them."""
    body: dict[str, Any] = {
        "messages": [dict(m) for m in messages],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        # vLLM and SGLang pass these to the chat template, whose `enable_thinking` opens or closes <think>.
        "chat_template_kwargs": {"enable_thinking": thinking},
    }
    if model:
        body["model"] = model
    if sampling.top_k:
        body["top_k"] = sampling.top_k
    if sampling.min_p:
        body["min_p"] = sampling.min_p
    if sampling.repeat_penalty != 1.0:
        body["repetition_penalty"] = sampling.repeat_penalty  # vLLM / SGLang
        body["repeat_penalty"] = sampling.repeat_penalty  # llama.cpp
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if sampling.ignore_eos:
        body["ignore_eos"] = True  # vLLM, SGLang, llama-server
        body["min_tokens"] = max_tokens  # vLLM, llama-cpp-python
    return body


class _InlineThinking:
    """Splits `delta.content` that carries the reasoning inline.

    With thinking on, the server's template usually opened `<think>` already, so the text starts in
    the reasoning; a template that did not makes the model write `<think>` itself. The first
    non-blank characters decide which, before the splitter sees anything.
    """

    def __init__(self, thinking: bool):
        self._thinking = thinking
        self._start = ""
        self.splitter: ThinkingSplitter | None = None

    def feed(self, text: str) -> list[Piece]:
        if self.splitter is None:
            self._start += text
            head = self._start.lstrip()
            if len(head) < len(OPEN) and OPEN.startswith(head):
                return []  # could still become "<think>"
            self.splitter = ThinkingSplitter(in_reasoning=self._thinking and not head.startswith(OPEN),
                                             may_open=head.startswith(OPEN))
            text, self._start = self._start, ""
        return self.splitter.feed(text)

    def flush(self) -> list[Piece]:
        if self.splitter is None:
            self.splitter = ThinkingSplitter(in_reasoning=False)  # too short to be a thought: the answer
            return [*self.splitter.feed(self._start), *self.splitter.flush()]
        return self.splitter.flush()


def events_from_lines(lines: Iterable[str], *, thinking: bool, tag: Any = None, started: float | None = None,
                      where: str = "the server") -> Iterator[Event]:
    """Turns server-sent-event lines of a streamed chat completion into Events (the parser, without HTTP)."""
    started = time.perf_counter() if started is None else started
    first: float | None = None
    result = Result()
    reasoning: list[str] = []
    content: list[str] = []
    inline = _InlineThinking(thinking)
    usage: dict[str, Any] | None = None
    finish: str | None = None
    chunks = reasoning_chunks = 0
    saw_done = parsed = False

    def emit(pieces: list[Piece]) -> Iterator[Event]:
        for piece in pieces:
            (reasoning if piece.kind == "reasoning" else content).append(piece.text)
            yield Event(tag, piece.kind, piece.text)

    data_lines: list[str] = []
    for line in _with_end(lines):
        if line is None or line == "":  # an event ends at a blank line (or at the end of the stream)
            if not data_lines:
                if line is None:
                    break
                continue
            data, data_lines = "\n".join(data_lines), []
            if data.strip() == "[DONE]":
                saw_done = True
                break
            chunk = _parse_chunk(data, where)
            if "error" in chunk and not chunk.get("choices"):
                raise RemoteServerError(f"{where} failed in the middle of an answer: {_message_of(chunk['error'])}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                think_text = delta.get("reasoning_content") or delta.get("reasoning") or ""
                text = delta.get("content") or ""
                if think_text or text:
                    first = first or time.perf_counter()
                    chunks += 1
                if think_text:
                    parsed = True
                    reasoning_chunks += 1
                    yield from emit([Piece("reasoning", think_text)])
                if text:
                    # A server that parses reasoning sends it apart and never the tags; all content is answer.
                    pieces = emit_content(inline, text, parsed=parsed)
                    in_thought = inline.splitter is not None and inline.splitter.in_reasoning
                    if any(p.kind == "reasoning" for p in pieces) or (not pieces and in_thought):
                        reasoning_chunks += 1  # without usage, counted approximately: one chunk, one token
                    yield from emit(pieces)
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
            if line is None:
                break
            continue
        if line.startswith("data:"):
            data_lines.append(line[5:].removeprefix(" "))
        # other fields (event:, id:, retry:) and comments (":") carry nothing for us
    if finish is None and not saw_done:
        raise RemoteServerError(f"the stream from {where} ended before the answer was finished "
                                "(the server stopped or the connection broke)")
    yield from emit(inline.flush())
    end = time.perf_counter()
    first = first or end
    result.content = "".join(content).strip()
    result.reasoning = "".join(reasoning).strip()
    result.finish_reason = _finish_reason(finish)
    if usage:
        result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        result.completion_tokens = int(usage.get("completion_tokens") or chunks)
        details = usage.get("completion_tokens_details") or {}
        counted = min(reasoning_chunks, result.completion_tokens)
        result.reasoning_tokens = int(details.get("reasoning_tokens") or counted)
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        result.cached_tokens = int(cached or 0)
    else:
        result.completion_tokens, result.reasoning_tokens = chunks, reasoning_chunks
    result.prompt_seconds = first - started
    result.generation_seconds = end - first
    yield Event(tag, "done", result=result)


def emit_content(inline: _InlineThinking, text: str, *, parsed: bool) -> list[Piece]:
    if parsed and inline.splitter is None and not inline._start:
        return [Piece("content", text)]
    return inline.feed(text)


def _with_end(lines: Iterable[str]) -> Iterator[str | None]:
    yield from lines
    yield None


def _parse_chunk(data: str, where: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError:
        raise RemoteServerError(f"{where} sent a stream event that is not JSON: {data[:80]!r}") from None
    if not isinstance(chunk, dict):
        raise RemoteServerError(f"{where} sent a stream event that is not a JSON object: {data[:80]!r}")
    return chunk


def _finish_reason(value: str | None) -> FinishReason:
    return "length" if value == "length" else "stop"


def _message_of(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error.get("detail") or error)
    return str(error)


def _error_detail(response: httpx.Response) -> str:
    """The server's own one-line reason, if it gave one."""
    try:
        payload = response.json()
    except ValueError:
        return response.text.strip().splitlines()[0][:200] if response.text.strip() else ""
    if isinstance(payload, dict):
        for key in ("error", "detail", "message"):
            if key in payload:
                return _message_of(payload[key])[:200]
    return ""


def _reason(exc: Exception) -> str:
    if isinstance(exc, httpx.ConnectError):
        text = str(exc).lower()
        if "refused" in text:
            return "connection refused (is the server running, on this port?)"
        if "name or service" in text or "nodename" in text or "getaddrinfo" in text:
            return "unknown host"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "the server closed the connection"
    return str(exc) or type(exc).__name__
