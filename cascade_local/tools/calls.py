"""The model's tool calls: found in its streamed output, parsed, and checked against the declared tools.

The model writes a call as XML inside its reasoning or its answer:

    <tool_call>
    <function=stateful_python_code_exec>
    <parameter=code>
    print(1+1)
    </parameter>
    </function>
    </tool_call>

The tags may arrive as special tokens or split across pieces (`<tool` + `_call>`); `ToolCallParser`
holds back any text that could still turn out to be the start of a tag. A call that is malformed or
names an unknown function becomes a `ToolCallError`, whose message is fed back to the model so it can
correct itself.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"

_FUNCTION = re.compile(r"<function=([^>\n]*)>(.*?)(?:</function>|$)", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\n]*)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.S)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, str]
    raw: str = ""  # the call as the model wrote it, tags included

    def message(self) -> dict[str, Any]:
        """The call as the chat template's `tool_calls` entry."""
        return {"type": "function", "function": {"name": self.name, "arguments": dict(self.arguments)}}


@dataclass(frozen=True)
class ToolCallError:
    """A call that cannot be run; `message` is what the model reads in the tool's place."""

    message: str
    raw: str = ""
    name: str | None = None  # the function it named, when it named one
    arguments: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Text:
    """Output outside any call."""

    text: str


def _strip_one_newline(value: str) -> str:
    # The template writes `<parameter=x>\nVALUE\n</parameter>`: those two newlines are framing.
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


def parse_call(body: str, tools: dict[str, Collection[str]] | None = None, raw: str = "") -> ToolCall | ToolCallError:
    """Parses the text between `<tool_call>` and `</tool_call>`.

    `tools` maps each declared function to its required parameters; a function not in it is an error
    (None: any name is accepted).
    """
    raw = raw or f"{OPEN}{body}{CLOSE}"
    found = _FUNCTION.search(body)
    if found is None:
        return ToolCallError("Error: malformed tool call: expected <function=NAME> inside <tool_call>...</tool_call>, "
                             "with each argument as <parameter=NAME>\nVALUE\n</parameter>.", raw)
    name = found.group(1).strip()
    arguments = {m.group(1).strip(): _strip_one_newline(m.group(2)) for m in _PARAMETER.finditer(found.group(2))}
    if not name:
        return ToolCallError("Error: malformed tool call: the function name is empty.", raw)
    if tools is not None:
        if name not in tools:
            known = ", ".join(sorted(tools)) or "none"
            return ToolCallError(f"Error: unknown function '{name}'. Available functions: {known}.", raw, name,
                                 arguments)
        missing = [p for p in tools[name] if p not in arguments]
        if missing:
            return ToolCallError(f"Error: the call to {name} is missing required parameter(s): "
                                 f"{', '.join(missing)}.", raw, name, arguments)
    return ToolCall(name, arguments, raw)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    """Feeds on streamed text; yields `Text` outside calls and a `ToolCall`/`ToolCallError` per finished call."""

    def __init__(self, tools: dict[str, Collection[str]] | None = None):
        self.tools = tools
        self._held = ""  # outside a call: text that may be the start of <tool_call>
        self._body: str | None = None  # inside a call: everything since <tool_call>

    @property
    def in_call(self) -> bool:
        return self._body is not None

    def feed(self, text: str) -> list[Text | ToolCall | ToolCallError]:
        out: list[Text | ToolCall | ToolCallError] = []
        buf = self._held + text
        self._held = ""
        while buf:
            if self._body is None:
                at = buf.find(OPEN)
                if at < 0:
                    keep = _partial_suffix(buf, OPEN)
                    if len(buf) > keep:
                        out.append(Text(buf[: len(buf) - keep]))
                    self._held = buf[len(buf) - keep :]
                    break
                if at:
                    out.append(Text(buf[:at]))
                self._body, buf = "", buf[at + len(OPEN) :]
            else:
                body = self._body + buf
                at = body.find(CLOSE)
                if at < 0:
                    self._body, buf = body, ""
                    break
                self._body, buf = None, body[at + len(CLOSE) :]
                out.append(parse_call(body[:at], self.tools))
        return out

    def flush(self) -> list[Text]:
        """At the end of the stream: held text, and an unfinished call, are returned as plain text."""
        text = self._held + (OPEN + self._body if self._body is not None else "")
        self._held, self._body = "", None
        return [Text(text)] if text else []

    def flush_held(self) -> list[Text]:
        """Held text that is not part of a call (before the stream changes from reasoning to answer)."""
        if self._body is not None or not self._held:
            return []
        text, self._held = self._held, ""
        return [Text(text)]
