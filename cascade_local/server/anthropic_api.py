"""Anthropic Messages: request JSON to a ChatJob, and replies back as a message or its stream of events."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from cascade_local.chat_template import Message
from cascade_local.engine import Result
from cascade_local.server.chat import ApiError, ChatJob, OutCall
from cascade_local.server.fields import get, number_in, text_of
from cascade_local.server.openai_api import sampling, stops


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ApiError(400, f"'{where}' must be a string or an array of content blocks", param=where)
    for k, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise ApiError(400, f"'{where}[{k}]' must be a content block with a type", param=f"{where}[{k}]")
    return content


def parse_messages(body: dict[str, Any], max_messages: int) -> list[Message]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    if len(raw) > max_messages:
        raise ApiError(400, f"{len(raw)} messages; this server accepts at most {max_messages}", param="messages")
    out: list[Message] = []
    system = body.get("system")
    if system is not None:
        out.append({"role": "system", "content": text_of(system, "system")})
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise ApiError(400, f"'{where}.role' must be user or assistant", param=f"{where}.role")
        blocks = _blocks(m.get("content"), f"{where}.content")
        if m["role"] == "assistant":
            out.append(_assistant(blocks, where))
            continue
        text = []
        for k, block in enumerate(blocks):
            if block["type"] == "tool_result":
                # Each result is a `tool` message, which the template renders inside a user turn.
                out.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                            "content": text_of(block.get("content"), f"{where}.content[{k}].content")})
            elif block["type"] == "text":
                text.append(text_of([block], f"{where}.content[{k}]"))
            else:
                raise ApiError(400, f"'{where}.content[{k}]' is a {block['type']!r} block; a user turn takes "
                               "text and tool_result blocks here", param=f"{where}.content")
        if text:
            out.append({"role": "user", "content": "".join(text)})
    return out


def _assistant(blocks: list[dict[str, Any]], where: str) -> Message:
    text, thinking, calls = [], [], []
    for k, block in enumerate(blocks):
        kind = block["type"]
        if kind == "text":
            text.append(text_of([block], f"{where}.content[{k}]"))
        elif kind == "thinking":
            thinking.append(str(block.get("thinking", "")))
        elif kind == "tool_use":
            args = block.get("input", {})
            if not isinstance(block.get("name"), str) or not isinstance(args, dict):
                raise ApiError(400, f"'{where}.content[{k}]' needs a name and an input object",
                               param=f"{where}.content")
            calls.append({"type": "function", "id": block.get("id"),
                          "function": {"name": block["name"], "arguments": args}})
        elif kind != "redacted_thinking":
            raise ApiError(400, f"'{where}.content[{k}]' is a {kind!r} block, which an assistant turn cannot hold",
                           param=f"{where}.content")
    message: Message = {"role": "assistant", "content": "".join(text)}
    if thinking:
        message["reasoning_content"] = "".join(thinking)
    if calls:
        message["tool_calls"] = calls
    return message


def parse_tools(raw: Any) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ApiError(400, "'tools' must be an array", param="tools")
    tools = []
    for i, tool in enumerate(raw):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
            raise ApiError(400, f"'tools[{i}].name' must be a non-empty string", param=f"tools[{i}]")
        schema = tool.get("input_schema", {})
        if not isinstance(schema, dict):
            raise ApiError(400, f"'tools[{i}].input_schema' must be an object", param=f"tools[{i}]")
        fn = {"name": tool["name"], "parameters": schema}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        tools.append({"type": "function", "function": fn})
    return tools


def parse_messages_request(body: dict[str, Any], *, defaults: Callable[[bool], Mapping[str, Any]],
                           max_messages: int) -> tuple[ChatJob, bool]:
    """(job, stream). Without a `thinking` field the model thinks, as it does by default."""
    messages = parse_messages(body, max_messages)
    max_tokens = number_in(body, "max_tokens", 1, 1 << 30, integer=True)
    if max_tokens is None:
        raise ApiError(400, "'max_tokens' is required", param="max_tokens")
    thinking, budget = True, None
    spec = get(body, "thinking", dict)
    if spec is not None:
        kind = spec.get("type")
        if kind not in ("enabled", "disabled", "adaptive"):
            raise ApiError(400, "'thinking.type' must be enabled, disabled or adaptive", param="thinking.type")
        thinking = kind != "disabled"
        if kind == "enabled":
            budget = number_in(spec, "budget_tokens", 1, 1 << 30, integer=True)
    tools = parse_tools(body.get("tools"))
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "none":
        tools = []
    job = ChatJob(messages, tools, thinking, budget, sampling(body, thinking, defaults), max_tokens,
                  stops(body, "stop_sequences"))
    return job, get(body, "stream", bool, False)


# -- replies -------------------------------------------------------------------------------------------


def stop_reason(result: Result, calls: list[OutCall], stopped: str | None) -> str:
    if calls:
        return "tool_use"
    if stopped is not None:
        return "stop_sequence"
    return "max_tokens" if result.finish_reason == "length" else "end_turn"


def usage(result: Result) -> dict[str, int]:
    # Anthropic counts input read from the cache apart from the input evaluated.
    return {"input_tokens": result.prompt_tokens - result.cached_tokens, "output_tokens": result.completion_tokens,
            "cache_read_input_tokens": result.cached_tokens, "cache_creation_input_tokens": 0}


def tool_use(call: OutCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": call.id.replace("call_", "toolu_", 1), "name": call.name,
            "input": call.arguments}


class MessageReply:
    """Ids and shapes of one reply: the whole message, or its events (block starts, deltas, stops)."""

    def __init__(self, model: str):
        self.id = f"msg_{uuid.uuid4().hex}"
        self.model = model
        self._open: str | None = None  # the kind of the block being streamed
        self._index = -1

    def whole(self, content: str, reasoning: str, calls: list[OutCall], result: Result,
              stopped: str | None) -> dict[str, Any]:
        blocks: list[dict[str, Any]] = []
        if reasoning:
            blocks.append({"type": "thinking", "thinking": reasoning, "signature": ""})
        if content:
            blocks.append({"type": "text", "text": content})
        blocks += [tool_use(c) for c in calls]
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": blocks,
                "stop_reason": stop_reason(result, calls, stopped), "stop_sequence": stopped,
                "usage": usage(result)}

    def start(self, prompt_tokens: int) -> list[tuple[str, dict[str, Any]]]:
        return [("message_start", {"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}})]

    def events(self, out: Any) -> list[tuple[str, dict[str, Any]]]:
        if isinstance(out, OutCall):
            block = tool_use(out)
            events = self._close()
            self._index += 1
            return [
                *events,
                ("content_block_start", {"type": "content_block_start", "index": self._index,
                                         "content_block": {**block, "input": {}}}),
                ("content_block_delta", {"type": "content_block_delta", "index": self._index,
                                         "delta": {"type": "input_json_delta",
                                                   "partial_json": json.dumps(out.arguments, ensure_ascii=False)}}),
                ("content_block_stop", {"type": "content_block_stop", "index": self._index})]
        kind, text = out
        shape = "thinking" if kind == "reasoning" else "text"
        events = []
        if self._open != shape:
            events = self._close()
            self._index += 1
            self._open = shape
            empty = {"type": "thinking", "thinking": "", "signature": ""} if shape == "thinking" else \
                {"type": "text", "text": ""}
            events.append(("content_block_start", {"type": "content_block_start", "index": self._index,
                                                   "content_block": empty}))
        delta = {"type": "thinking_delta", "thinking": text} if shape == "thinking" else \
            {"type": "text_delta", "text": text}
        events.append(("content_block_delta", {"type": "content_block_delta", "index": self._index, "delta": delta}))
        return events

    def _close(self) -> list[tuple[str, dict[str, Any]]]:
        if self._open is None:
            return []
        events: list[tuple[str, dict[str, Any]]] = []
        if self._open == "thinking":
            events.append(("content_block_delta", {"type": "content_block_delta", "index": self._index,
                                                   "delta": {"type": "signature_delta", "signature": ""}}))
        self._open = None
        return [*events, ("content_block_stop", {"type": "content_block_stop", "index": self._index})]

    def end(self, result: Result, calls: list[OutCall], stopped: str | None) -> list[tuple[str, dict[str, Any]]]:
        return [
            *self._close(),
            ("message_delta", {"type": "message_delta",
                               "delta": {"stop_reason": stop_reason(result, calls, stopped), "stop_sequence": stopped},
                               "usage": usage(result)}),
            ("message_stop", {"type": "message_stop"})]


def error_body(err: ApiError) -> dict[str, Any]:
    kind = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large",
            429: "rate_limit_error"}.get(err.status, "invalid_request_error" if err.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}
