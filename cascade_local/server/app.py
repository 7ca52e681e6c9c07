"""The HTTP layer: Starlette routes over the scheduler. Every refusal is JSON in the API's own error shape.

Starlette (with uvicorn) rather than FastAPI: the two APIs' request bodies are validated by hand in
`openai_api` / `anthropic_api` anyway (to answer in each API's error shape), so FastAPI's pydantic
layer would add a second schema without adding safety. Server-sent events are a few lines of framing
over StreamingResponse, so no SSE library either.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from cascade_local.engine import Engine, Event, Result
from cascade_local.errors import CascadeError
from cascade_local.prompt_store import DEFAULT_MIN_TOKENS, PromptStore
from cascade_local.server import anthropic_api, openai_api
from cascade_local.server.chat import ApiError, ChatJob, ReasoningFormat, Reply, build_request, joined
from cascade_local.server.scheduler import QueueFull, Scheduler, Ticket

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class ServeOptions:
    name: str  # the model id clients ask for
    aliases: tuple[str, ...] = ()  # other ids accepted (the file name)
    api_key: str | None = None  # None: no authentication
    reasoning_format: ReasoningFormat = "reasoning_content"
    queue_limit: int = 64
    cache_bytes: int = 2 << 30
    prompt_store: PromptStore | None = None  # prompt states on disk, shared with run and batch
    cache_min_tokens: int = DEFAULT_MIN_TOKENS
    max_body_bytes: int = 8 << 20
    max_messages: int = 2048
    sampling_defaults: Mapping[bool, Mapping[str, Any]] = field(default_factory=dict)  # per thinking mode


class Service:
    """What the routes share: the engine's scheduler and the server's settings."""

    def __init__(self, engine: Engine, options: ServeOptions):
        self.engine = engine
        self.options = options
        self.scheduler = Scheduler(engine, queue_limit=options.queue_limit, cache_bytes=options.cache_bytes,
                                   disk=options.prompt_store, disk_min_tokens=options.cache_min_tokens)
        self.context = engine.n_ctx // engine.n_seq_max  # each sequence's share
        self.started = time.time()

    def defaults(self, thinking: bool) -> Mapping[str, Any]:
        return self.options.sampling_defaults.get(thinking, {})

    def check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is None:
            return
        if not isinstance(model, str):
            raise ApiError(400, "'model' must be a string", param="model")
        if model not in (self.options.name, *self.options.aliases):
            raise ApiError(404, f"model {model!r} is not served here; this server serves {self.options.name!r}",
                           param="model", kind="model_not_found")

    def check_key(self, request: Request) -> None:
        key = self.options.api_key
        if key is None:
            return
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        # Constant time: how much of a guess matched must not show in the response time.
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY, or x-api-key)",
                           kind="authentication_error")

    async def read_json(self, request: Request) -> dict[str, Any]:
        limit = self.options.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is {declared} bytes; the limit is {limit}")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise ApiError(413, f"the request body is over the limit of {limit} bytes")
        try:
            body = json.loads(bytes(data))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise ApiError(400, "the request body nests too deeply") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    async def submit(self, job: ChatJob) -> tuple[Ticket, asyncio.Queue[Event | BaseException]]:
        try:
            request = await run_in_threadpool(build_request, self.engine.model, job, context=self.context)
        except CascadeError as exc:  # the template refused the messages
            raise ApiError(400, str(exc), param="messages") from None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event | BaseException] = asyncio.Queue()

        def deliver(item: Event | BaseException) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone (shutting down): nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, item)

        ticket = Ticket(request, deliver)
        try:
            self.scheduler.submit(ticket)
        except QueueFull as exc:
            raise ApiError(429, f"busy: {exc}; retry shortly", kind="rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        return ticket, queue

    async def replies(self, ticket: Ticket, queue: asyncio.Queue[Event | BaseException], reply: Reply,
                      request: Request | None = None) -> AsyncIterator[tuple[list[Any], Result | None]]:
        """(outputs, None) as the model writes, then ([], result). The ticket is cancelled if the reader leaves."""
        finished = False
        asked = time.monotonic()
        try:
            while True:
                # A non-streamed request notices a client that left only by asking: every half second, whether
                # or not the model is writing (a busy queue must not hide the hang-up).
                if request is not None and time.monotonic() - asked >= 0.5:
                    asked = time.monotonic()
                    if await request.is_disconnected():
                        return
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=0.5)
                except TimeoutError:
                    continue
                if isinstance(item, BaseException):
                    raise ApiError(500, f"generation failed: {item}", kind="server_error")
                if item.kind == "done":
                    finished = True
                    yield reply.finish(), None
                    yield [], item.result
                    return
                outs = reply.feed(item)
                if reply.stopped is not None:
                    self.scheduler.cancel(ticket)  # a stop string: the rest is not wanted
                yield outs, None
        finally:
            if not finished:
                self.scheduler.cancel(ticket)


    async def collect(self, ticket: Ticket, queue: asyncio.Queue[Event | BaseException], reply: Reply,
                      request: Request) -> tuple[list[Any], Result | None]:
        """The whole reply of a non-streamed request (result None: the client left before the end)."""
        outs: list[Any] = []
        async for got, result in self.replies(ticket, queue, reply, request):
            outs += got
            if result is not None:
                return outs, result
        return outs, None


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"{head}data: {payload}\n\n".encode()


def _guarded(service: Service, error_body: Callable[[ApiError], dict[str, Any]],
             handler: Callable[[Service, Request], Awaitable[Response]], *,
             auth: bool = True) -> Callable[[Request], Awaitable[Response]]:
    """Runs a route; an ApiError becomes its status and JSON, anything else a 500 without a traceback."""

    async def route(request: Request) -> Response:
        try:
            if auth:
                service.check_key(request)
            return await handler(service, request)
        except ApiError as err:
            return JSONResponse(error_body(err), status_code=err.status, headers=err.headers)
        except Exception as exc:
            print(f"cascade-local serve: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
            failure = ApiError(500, "internal server error", kind="server_error")
            return JSONResponse(error_body(failure), status_code=500)

    return route


# -- routes --------------------------------------------------------------------------------------------


async def chat_completions(service: Service, request: Request) -> Response:
    body = await service.read_json(request)
    service.check_model(body)
    job, stream, include_usage = openai_api.parse_chat(body, defaults=service.defaults,
                                                       max_messages=service.options.max_messages)
    ticket, queue = await service.submit(job)
    fmt = service.options.reasoning_format
    reply = Reply(tools=job.tools, stop=job.stop, reasoning_format=fmt)
    completion = openai_api.Completion(service.options.name, fmt)
    if not stream:
        outs, result = await service.collect(ticket, queue, reply, request)
        if result is None:  # the client left
            return Response(status_code=499)
        content, reasoning, calls = joined(outs)
        return JSONResponse(completion.whole(content, reasoning, calls, result, reply.stopped is not None))

    async def chunks() -> AsyncIterator[bytes]:
        yield _sse(completion.chunk({"role": "assistant", "content": ""}))
        try:
            async for got, result in service.replies(ticket, queue, reply):
                for out in got:
                    yield _sse(completion.delta(out))
                if result is not None:
                    reason = openai_api.finish_reason(result, reply.calls, reply.stopped is not None)
                    yield _sse(completion.chunk({}, reason))
                    if include_usage:
                        yield _sse(completion.usage_chunk(result))
        except ApiError as err:
            yield _sse(openai_api.error_body(err))
        yield _sse("[DONE]")

    return StreamingResponse(chunks(), media_type="text/event-stream", headers=SSE_HEADERS)


async def messages(service: Service, request: Request) -> Response:
    body = await service.read_json(request)
    service.check_model(body)
    job, stream = anthropic_api.parse_messages_request(body, defaults=service.defaults,
                                                       max_messages=service.options.max_messages)
    ticket, queue = await service.submit(job)
    reply = Reply(tools=job.tools, stop=job.stop)
    message = anthropic_api.MessageReply(service.options.name)
    if not stream:
        outs, result = await service.collect(ticket, queue, reply, request)
        if result is None:
            return Response(status_code=499)
        content, reasoning, calls = joined(outs)
        return JSONResponse(message.whole(content, reasoning, calls, result, reply.stopped))

    async def events() -> AsyncIterator[bytes]:
        for name, data in message.start(len(ticket.request.prompt_tokens)):
            yield _sse(data, name)
        try:
            async for got, result in service.replies(ticket, queue, reply):
                for out in got:
                    for name, data in message.events(out):
                        yield _sse(data, name)
                if result is not None:
                    for name, data in message.end(result, reply.calls, reply.stopped):
                        yield _sse(data, name)
        except ApiError as err:
            yield _sse(anthropic_api.error_body(err), "error")

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


async def models(service: Service, request: Request) -> Response:
    # One shape for both SDKs: OpenAI reads object/created/owned_by, Anthropic type/display_name/created_at.
    created = datetime.fromtimestamp(service.started, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    name = service.options.name
    return JSONResponse({"object": "list", "data": [
        {"id": name, "object": "model", "created": int(service.started), "owned_by": "cascade-local",
         "type": "model", "display_name": name, "created_at": created}],
        "has_more": False, "first_id": name, "last_id": name})


async def health(service: Service, request: Request) -> Response:
    return JSONResponse({"status": "ok", "model": service.options.name, "parallel": service.engine.n_seq_max,
                         "ctx": service.engine.n_ctx})


async def metrics(service: Service, request: Request) -> Response:
    m, s = service.scheduler.metrics, service.scheduler
    rows = [
        ("requests_total", "counter", "Requests answered (including cancelled ones).", m.requests),
        ("requests_cancelled_total", "counter", "Requests ended early: client gone or stop string.", m.cancelled),
        ("prompt_tokens_total", "counter", "Prompt tokens, cached ones included.", m.prompt_tokens),
        ("prompt_tokens_cached_total", "counter", "Prompt tokens restored from the prefix cache.", m.cached_tokens),
        ("completion_tokens_total", "counter", "Tokens generated.", m.completion_tokens),
        ("prefix_cache_hits_total", "counter", "Requests that reused an earlier prompt's state.", m.prefix_hits),
        ("prefix_cache_misses_total", "counter", "Requests evaluated from the start.", m.prefix_misses),
        ("prefix_cache_entries", "gauge", "Prompt snapshots kept.", len(s.prefixes)),
        ("prefix_cache_bytes", "gauge", "Bytes of prompt snapshots kept.", s.prefixes.nbytes),
        ("queue_depth", "gauge", "Requests waiting for a free sequence.", s.queue_depth),
        ("active_sequences", "gauge", "Requests being decoded now.", s.active),
        ("generation_tokens_per_second", "gauge", "Tokens generated per second over the last 30 s.",
         round(m.tokens_per_second(), 3)),
        ("decode_errors_total", "counter", "Failed decodes (each ends the requests then running).", m.errors),
    ]
    lines = []
    for name, kind, help_, value in rows:
        lines += [f"# HELP cascade_{name} {help_}", f"# TYPE cascade_{name} {kind}", f"cascade_{name} {value}"]
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


def create_app(service: Service) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service.scheduler.start()
        yield
        # uvicorn has waited for open requests to finish; nothing is queued now.
        await run_in_threadpool(service.scheduler.stop)

    oa, an = openai_api.error_body, anthropic_api.error_body
    routes = [
        Route("/health", _guarded(service, oa, health, auth=False), methods=["GET"]),
        Route("/v1/models", _guarded(service, oa, models), methods=["GET"]),
        Route("/v1/chat/completions", _guarded(service, oa, chat_completions), methods=["POST"]),
        Route("/v1/messages", _guarded(service, an, messages), methods=["POST"]),
        Route("/metrics", _guarded(service, oa, metrics), methods=["GET"]),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        err = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
        return JSONResponse(openai_api.error_body(err), status_code=exc.status_code)

    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
