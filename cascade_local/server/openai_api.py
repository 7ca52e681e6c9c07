"""OpenAI Chat Completions: request JSON to a ChatJob, and replies back as completions or chunks."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from cascade_local.chat_template import Message
from cascade_local.engine import Result
from cascade_local.errors import UsageError
from cascade_local.oneshot import sampling_for
from cascade_local.server.chat import ApiError, ChatJob, OutCall, ReasoningFormat
from cascade_local.server.fields import get, number_in, text_of

ROLES = ("system", "developer", "user", "assistant", "tool")


def parse_messages(raw: Any, max_messages: int) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    if len(raw) > max_messages:
        raise ApiError(400, f"{len(raw)} messages; this server accepts at most {max_messages}", param="messages")
    out: list[Message] = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"'{where}' must be an object", param=where)
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"'{where}.role' must be one of {', '.join(ROLES)}", param=f"{where}.role")
        message: Message = {"role": "system" if role == "developer" else role,
                            "content": text_of(m.get("content"), f"{where}.content")}
        if role == "assistant":
            # Earlier turns may carry their reasoning under either name; the template wants reasoning_content.
            reasoning = m.get("reasoning_content", m.get("reasoning"))
            if reasoning is not None:
                message["reasoning_content"] = text_of(reasoning, f"{where}.reasoning_content")
            calls = get(m, "tool_calls", list, [], where=f"{where}.")
            if calls:
                message["tool_calls"] = [_call_in(c, f"{where}.tool_calls[{k}]") for k, c in enumerate(calls)]
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            message["tool_call_id"] = m["tool_call_id"]
        out.append(message)
    return out


def _call_in(call: Any, where: str) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ApiError(400, f"'{where}.function.name' must be a string", param=where)
    args = fn.get("arguments") or {}
    if isinstance(args, str):  # OpenAI sends the arguments as a JSON string; the template wants the object
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise ApiError(400, f"'{where}.function.arguments' is not valid JSON", param=where) from None
    if not isinstance(args, dict):
        raise ApiError(400, f"'{where}.function.arguments' must be a JSON object", param=where)
    return {"type": "function", "id": call.get("id"), "function": {"name": fn["name"], "arguments": args}}


def parse_tools(raw: Any, where: str = "tools") -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ApiError(400, f"'{where}' must be an array", param=where)
    tools = []
    for i, tool in enumerate(raw):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ApiError(400, f"'{where}[{i}].function.name' must be a non-empty string", param=f"{where}[{i}]")
        if not isinstance(fn.get("parameters", {}), dict):
            raise ApiError(400, f"'{where}[{i}].function.parameters' must be an object", param=f"{where}[{i}]")
        tools.append({"type": "function", "function": fn})
    return tools


def sampling(body: dict[str, Any], thinking: bool, defaults: Callable[[bool], Mapping[str, Any]]) -> Any:
    given = {"temperature": number_in(body, "temperature", 0, 2), "top_p": number_in(body, "top_p", 1e-9, 1),
             "top_k": number_in(body, "top_k", 0, 1 << 20, integer=True),
             "min_p": number_in(body, "min_p", 0, 0.999999),
             "seed": number_in(body, "seed", -(1 << 63), (1 << 63) - 1, integer=True),
             # llama-server's extension: never end the turn before max_tokens (benchmarks, tests)
             "ignore_eos": get(body, "ignore_eos", bool)}
    try:
        return sampling_for(thinking, defaults=defaults(thinking), **given)
    except UsageError as exc:
        raise ApiError(400, str(exc)) from None


def stops(body: dict[str, Any], key: str) -> list[str]:
    stop = body.get(key)
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16:
        return list(stop)
    raise ApiError(400, f"'{key}' must be a string or an array of at most 16 strings", param=key)


def parse_chat(body: dict[str, Any], *, defaults: Callable[[bool], Mapping[str, Any]],
               max_messages: int) -> tuple[ChatJob, bool, bool]:
    """(job, stream, include_usage)."""
    messages = parse_messages(body.get("messages"), max_messages)
    kwargs = get(body, "chat_template_kwargs", dict, {})
    thinking = get(kwargs, "enable_thinking", bool, True, where="chat_template_kwargs.")
    effort = get(body, "reasoning_effort", str)
    if effort is not None:
        if effort not in ("none", "minimal", "low", "medium", "high"):
            raise ApiError(400, "'reasoning_effort' must be none, minimal, low, medium or high",
                           param="reasoning_effort")
        thinking = thinking and effort != "none"
    budget = number_in(body, "thinking_budget", 1, 1 << 30, integer=True)
    if get(body, "n", int, 1) != 1:
        raise ApiError(400, "'n' must be 1: one answer per request", param="n")
    max_tokens = number_in(body, "max_completion_tokens", 1, 1 << 30, integer=True)
    if max_tokens is None:
        max_tokens = number_in(body, "max_tokens", 1, 1 << 30, integer=True)
    tools = parse_tools(body.get("tools"))
    if body.get("tool_choice") == "none":
        tools = []
    job = ChatJob(messages, tools, thinking, budget, sampling(body, thinking, defaults), max_tokens,
                  stops(body, "stop"))
    stream = get(body, "stream", bool, False)
    include_usage = get(get(body, "stream_options", dict, {}), "include_usage", bool, False,
                        where="stream_options.")
    return job, stream, include_usage


# -- replies -------------------------------------------------------------------------------------------


def finish_reason(result: Result, calls: list[OutCall], stopped: bool) -> str:
    if calls:
        return "tool_calls"
    if stopped:
        return "stop"
    return "length" if result.finish_reason == "length" else "stop"


def usage(result: Result) -> dict[str, Any]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": result.reasoning_tokens}}


def call_json(call: OutCall, index: int | None = None) -> dict[str, Any]:
    out = {"id": call.id, "type": "function",
           "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
    return out if index is None else {"index": index, **out}


class Completion:
    """Ids and shapes of one completion: the whole object, or its stream of chunks."""

    def __init__(self, model: str, reasoning_format: ReasoningFormat):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.reasoning_key = "reasoning" if reasoning_format == "reasoning" else "reasoning_content"
        self._calls = 0

    def whole(self, content: str, reasoning: str, calls: list[OutCall], result: Result, stopped: bool) -> dict:
        message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else "")}
        if reasoning:
            message[self.reasoning_key] = reasoning
        if calls:
            message["tool_calls"] = [call_json(c) for c in calls]
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(result, calls, stopped),
                             "logprobs": None}],
                "usage": usage(result)}

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    def delta(self, out: Any) -> dict[str, Any]:
        if isinstance(out, OutCall):
            self._calls += 1
            return self.chunk({"tool_calls": [call_json(out, self._calls - 1)]})
        kind, text = out
        return self.chunk({self.reasoning_key if kind == "reasoning" else "content": text})

    def usage_chunk(self, result: Result) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": usage(result)}


def error_body(err: ApiError) -> dict[str, Any]:
    return {"error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.status}}
