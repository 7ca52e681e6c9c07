"""What both APIs share: a chat job (messages, tools, thinking, sampling), its prompt, and the reply.

`ChatJob` is what a request asks for, in the chat template's terms; `build_request` renders and
tokenizes it. `Reply` turns the engine's events into what a client sees: reasoning kept apart (or
inline in `<think>` tags), the answer trimmed, stop strings honoured, and the model's XML tool calls
parsed into structured calls. Calls are looked for in the answer only, never in the reasoning: a call
the model merely considered while thinking is not a call.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from cascade_local.chat_template import Message
from cascade_local.engine import Event, Request
from cascade_local.llama_model import LoadedModel
from cascade_local.sampling import SamplingParams
from cascade_local.tools.calls import Text, ToolCall, ToolCallError, ToolCallParser

ReasoningFormat = Literal["reasoning_content", "reasoning", "inline"]
REASONING_FORMATS: tuple[str, ...] = ("reasoning_content", "reasoning", "inline")


class ApiError(Exception):
    """A request the server refuses: the HTTP status and a one-line message for the client."""

    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}


@dataclass
class ChatJob:
    messages: list[Message]
    tools: list[dict[str, Any]] = field(default_factory=list)
    thinking: bool = True
    thinking_budget: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None  # None: up to the end of the sequence's context
    stop: list[str] = field(default_factory=list)


def build_request(model: LoadedModel, job: ChatJob, *, context: int) -> Request:
    """The tokenized prompt. Refuses (400) a prompt that leaves no room in a sequence's `context`."""
    tools = job.tools or None
    text = model.template.render(job.messages, tools=tools, add_generation_prompt=True, enable_thinking=job.thinking)
    tokens = model.encode_prompt(text)
    if len(tokens) + 1 > context:
        raise ApiError(400, f"the prompt is {len(tokens)} tokens; this server's context holds {context} per "
                       "request (serve --ctx / --parallel)", param="messages", kind="context_length_exceeded")
    # The history without the generation prompt starts the next request of the same conversation:
    # that is where the engine snapshots the state for reuse (when it is a token prefix of this prompt).
    history = model.encode_prompt(model.template.render(job.messages, tools=tools, add_generation_prompt=False))
    prefix = len(history) if 0 < len(history) < len(tokens) and tokens[: len(history)] == history else None
    room = context - len(tokens)
    max_tokens = room if job.max_tokens is None else min(job.max_tokens, room)
    return Request(tokens, job.sampling, max(1, max_tokens), in_reasoning=job.thinking,
                   thinking_budget=job.thinking_budget if job.thinking else None, cache_prefix=prefix)


@dataclass(frozen=True)
class OutCall:
    """A tool call as clients receive it: an id, the function, and arguments typed by the tool's schema."""

    id: str
    name: str
    arguments: dict[str, Any]


Out = tuple[Literal["reasoning", "content"], str] | OutCall


def _typed(value: str, schema: Any) -> Any:
    """The model writes every argument as text; a parameter declared non-string gets its JSON value."""
    kind = schema.get("type") if isinstance(schema, dict) else None
    if kind in (None, "string") or (isinstance(kind, list) and "string" in kind):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


class Reply:
    """Feeds on one request's events; returns what to send. `stopped` turns True when a stop string matched."""

    def __init__(self, *, tools: list[dict[str, Any]] | None = None, stop: list[str] | None = None,
                 reasoning_format: ReasoningFormat = "reasoning_content"):
        self._schemas: dict[str, dict[str, Any]] = {}
        for tool in tools or []:
            fn = tool.get("function", tool)
            self._schemas[fn["name"]] = (fn.get("parameters") or {}).get("properties") or {}
        self._parser = ToolCallParser(None) if tools else None
        self._stop = [s for s in stop or [] if s]
        self._inline = reasoning_format == "inline"
        self._started = False  # answer text has been sent (leading whitespace is dropped until then)
        self._held = ""  # text that may start a stop string, or trailing whitespace
        self._in_reasoning = False
        self._reasoning_started = False
        self._reasoning_held = ""
        self.stopped: str | None = None
        self.content = ""
        self.reasoning = ""
        self.calls: list[OutCall] = []

    def feed(self, event: Event) -> list[Out]:
        if self.stopped is not None or event.kind == "done":
            return []
        if event.kind == "reasoning":
            self.reasoning += event.text
            if self._inline:
                opening = "" if self._in_reasoning else "<think>\n"
                self._in_reasoning = True
                self._started = True
                return self._content(opening + event.text)
            # Streamed reasoning joins to exactly the whole reply's: no whitespace at either end.
            text = self._reasoning_held + event.text
            if not self._reasoning_started:
                text = text.lstrip()
            body = text.rstrip()
            self._reasoning_held = text[len(body) :]
            if not body:
                return []
            self._reasoning_started = True
            return [("reasoning", body)]
        text = event.text
        if self._inline and self._in_reasoning:
            self._in_reasoning = False
            text = "\n</think>\n\n" + text.lstrip()
        return self._answer(text)

    def finish(self) -> list[Out]:
        """End of stream: held text is released (after a stop string, nothing is)."""
        if self.stopped is not None:
            return []
        out: list[Out] = []
        if self._inline and self._in_reasoning:
            out += self._content("\n</think>")
        body = self._held.rstrip()
        self._held = ""
        out += self._route(body)
        if self._parser is not None:
            out += self._content("".join(t.text for t in self._parser.flush()))
        return out

    # -- the answer: stop strings, whitespace, tool calls ---------------------------------------------

    def _answer(self, text: str) -> list[Out]:
        if not self._started:
            text = text.lstrip()
            if not text:
                return []
            self._started = True
        buf = self._held + text
        for stop in self._stop:
            at = buf.find(stop)
            if at >= 0:
                self.stopped = stop
                self._held = ""
                return self._route(buf[:at].rstrip())
        # Hold back what may start a stop string, and the whitespace before it (it may end the answer).
        keep = max([_partial(buf, s) for s in self._stop], default=0)
        rest = buf[: len(buf) - keep]
        keep += len(rest) - len(rest.rstrip())
        self._held = buf[len(buf) - keep :]
        return self._route(buf[: len(buf) - keep])

    def _route(self, text: str) -> list[Out]:
        if not text:
            return []
        if self._parser is None:
            return self._content(text)
        out: list[Out] = []
        for item in self._parser.feed(text):
            if isinstance(item, Text):
                out += self._content(item.text)
            elif isinstance(item, ToolCall):
                out.append(self._call(item))
            elif isinstance(item, ToolCallError):  # not a usable call: the client sees what the model wrote
                out += self._content(item.raw)
        return out

    def _call(self, call: ToolCall) -> OutCall:
        schema = self._schemas.get(call.name, {})
        args = {k: _typed(v, schema.get(k)) for k, v in call.arguments.items()}
        made = OutCall(f"call_{secrets.token_hex(12)}", call.name, args)
        self.calls.append(made)
        return made

    def _content(self, text: str) -> list[Out]:
        if not text:
            return []
        self.content += text
        return [("content", text)]


def _partial(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def joined(outs: list[Out]) -> tuple[str, str, list[OutCall]]:
    """(content, reasoning, calls) of a whole reply, for non-streamed answers."""
    content = "".join(o[1] for o in outs if not isinstance(o, OutCall) and o[0] == "content")
    reasoning = "".join(o[1] for o in outs if not isinstance(o, OutCall) and o[0] == "reasoning")
    return content.strip(), reasoning.strip(), [o for o in outs if isinstance(o, OutCall)]
