"""Tool-integrated reasoning: the model runs Python while it thinks.

Each round streams from the engine until the model finishes a `<tool_call>` (in its reasoning or its
answer). Generation stops there; the call runs (once `confirm` allows it), the assistant message with
its `tool_calls` and the tool's answer are appended to the conversation, the template renders it
again with the tools declared, and the model continues. Rounds repeat until it answers without a
call, or `max_calls` calls have been made.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from cascade_local.engine import Engine, FinishReason, PromptCache, Request
from cascade_local.engine import Result as RoundResult
from cascade_local.errors import UsageError
from cascade_local.sampling import SamplingParams
from cascade_local.tools.calls import Text, ToolCall, ToolCallError, ToolCallParser

PYTHON_TOOL_NAME = "stateful_python_code_exec"
PYTHON_TOOL_DESCRIPTION = ("Call this function to execute Python code in a stateful Jupyter notebook environment. "
                           "Python will respond with the output of the execution or time out after 120.0 seconds.")
DECLINED = "The user declined to run this code."
MAX_CALLS = 100


class Tool(Protocol):
    """A function the model may call: its schema for the template, and how to run it."""

    schema: dict[str, Any]

    def run(self, arguments: dict[str, str]) -> str: ...
    def close(self) -> None: ...


PYTHON_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": PYTHON_TOOL_NAME,
        "description": PYTHON_TOOL_DESCRIPTION,
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "The Python code to execute."}},
            "required": ["code"],
        },
    },
}


class PythonTool:
    """`stateful_python_code_exec`: one kernel per conversation, started at the first call.

    `kernel_options` go to PythonKernel (timeout, output_limit, memory_bytes, cpu_seconds).
    """

    def __init__(self, **kernel_options: Any):
        self.schema = copy.deepcopy(PYTHON_TOOL)
        self._options = kernel_options
        self.kernel: Any = None

    def run(self, arguments: dict[str, str]) -> str:
        if self.kernel is None:
            from cascade_local.tools.python_kernel import PythonKernel

            self.kernel = PythonKernel(**self._options)
        return self.kernel.execute(arguments["code"]).output

    def close(self) -> None:
        if self.kernel is not None:
            self.kernel.close()
            self.kernel = None


TOOL_NAMES = {"python": PythonTool}


def make_tools(names: str, **kernel_options: Any) -> list[Tool]:
    """Tools by their command-line names ("python", comma-separated); an unknown name is a UsageError."""
    import importlib.util

    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in TOOL_NAMES]
    if unknown or not chosen:
        raise UsageError(f"unknown tool {', '.join(unknown) or repr(names)}: supported: {', '.join(TOOL_NAMES)}")
    if "python" in chosen and not all(importlib.util.find_spec(m) for m in ("jupyter_client", "ipykernel")):
        from cascade_local.tools.python_kernel import KernelError

        raise KernelError("the Python tool needs jupyter_client and ipykernel: pip install 'cascade-local[tools]'")
    return [TOOL_NAMES[n](**kernel_options) for n in dict.fromkeys(chosen)]


@dataclass
class CallRecord:
    """One call the model made and what it was told."""

    name: str | None
    arguments: dict[str, str]
    output: str
    status: Literal["ok", "declined", "invalid"] = "ok"
    in_reasoning: bool = False

    @property
    def code(self) -> str:
        return self.arguments.get("code", "")


@dataclass
class Answer:
    """The whole answer across rounds: text, every call with its result, the conversation, token counts."""

    content: str = ""
    reasoning: str = ""
    calls: list[CallRecord] = field(default_factory=list)
    rounds: list[RoundResult] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: FinishReason | Literal["max_calls"] = "stop"

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.rounds)

    @property
    def completion_tokens(self) -> int:
        return sum(r.completion_tokens for r in self.rounds)

    def to_dict(self) -> dict[str, Any]:
        """For `run --json`."""
        return {
            "content": self.content,
            "reasoning": self.reasoning,
            "finish_reason": self.finish_reason,
            "tool_calls": [{**asdict(c), "code": c.code} for c in self.calls],
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                      "rounds": len(self.rounds)},
        }


@dataclass(frozen=True)
class LoopEvent:
    """`reasoning`/`content` text, `tool_call` (text: the code) before it runs, `tool_result` (text: the
    output) after, then `done` with the Answer."""

    kind: Literal["reasoning", "content", "tool_call", "tool_result", "done"]
    text: str = ""
    call: CallRecord | None = None
    answer: Answer | None = None


@dataclass
class ToolLoop:
    """Runs a conversation with tools. `confirm(call)` is asked before each call unless `yes`."""

    engine: Engine
    tools: list[Tool]
    thinking: bool = True
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 4096  # in total, across rounds
    budget: int | None = None  # reasoning tokens per round
    confirm: Callable[[ToolCall], bool] | None = None
    yes: bool = False
    max_calls: int = MAX_CALLS

    def __post_init__(self) -> None:
        if not self.yes and self.confirm is None:
            raise UsageError("running the model's code needs a confirmation callback, or yes=True to allow every call")
        self._by_name = {t.schema["function"]["name"]: t for t in self.tools}
        self._required = {name: t.schema["function"].get("parameters", {}).get("required", [])
                          for name, t in self._by_name.items()}

    def close(self) -> None:
        """Shuts down every tool (the Python kernel ends with the conversation)."""
        for tool in self.tools:
            tool.close()

    def __enter__(self) -> ToolLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, messages: list[dict[str, Any]], max_tokens: int, cache: PromptCache) -> Request:
        model = self.engine.model
        text = model.template.render(messages, tools=[t.schema for t in self.tools], add_generation_prompt=True,
                                     enable_thinking=self.thinking)
        tokens = model.encode_prompt(text)
        # Each round's prompt extends the last one: reuse its evaluated prefix. The snapshot stops one
        # token short, so the engine still evaluates (and gets logits for) the prompt's last token.
        return Request(tokens, self.sampling, max_tokens, in_reasoning=self.thinking,
                       thinking_budget=self.budget if self.thinking else None, cache=cache,
                       cache_prefix=len(tokens) - 1)

    def stream(self, messages: list[dict[str, Any]]) -> Iterator[LoopEvent]:
        """Answers the last message of `messages` (not modified), running tools as the model calls them."""
        answer = Answer(messages=list(messages))
        cache = PromptCache()
        while True:
            left = self.max_tokens - answer.completion_tokens
            request = self._request(answer.messages, max(left, 1), cache)
            parser = ToolCallParser(self._required)
            text = {"reasoning": "", "content": ""}
            kind: Literal["reasoning", "content"] = "reasoning" if self.thinking else "content"
            found: ToolCall | ToolCallError | None = None
            found_in_reasoning = False
            round_result: RoundResult | None = None
            events = self.engine.stream(request)
            try:
                for event in events:
                    if event.kind == "done":
                        round_result = event.result
                        break
                    if event.kind != kind:  # held text belongs to the part it came from
                        for item in parser.flush_held():
                            text[kind] += item.text
                            yield LoopEvent(kind, item.text)
                        kind = event.kind
                    for item in parser.feed(event.text):
                        if isinstance(item, Text):
                            text[kind] += item.text
                            yield LoopEvent(kind, item.text)
                        else:
                            found, found_in_reasoning = item, kind == "reasoning"
                            break
                    if found is not None:
                        break
            finally:
                events.close()  # stops generation at the call; the engine frees the sequence
            if found is None:
                for item in parser.flush():
                    text[kind] += item.text
                    yield LoopEvent(kind, item.text)
            answer.rounds.append(round_result or self._cut_round(request, text, found))
            answer.reasoning = "\n\n".join(p for p in (answer.reasoning, text["reasoning"].strip()) if p)
            if found is None:
                answer.content = text["content"].strip()
                answer.finish_reason = answer.rounds[-1].finish_reason
                break
            record = yield from self._run(found, found_in_reasoning)
            answer.calls.append(record)
            answer.messages += self._messages(found, record, text)
            if len(answer.calls) >= self.max_calls:
                answer.content = text["content"].strip()
                answer.finish_reason = "max_calls"
                break
            if answer.completion_tokens >= self.max_tokens:
                answer.content = text["content"].strip()
                answer.finish_reason = "length"
                break
        yield LoopEvent("done", answer=answer)

    def run(self, messages: list[dict[str, Any]]) -> Answer:
        """Runs to the end and returns the Answer."""
        for event in self.stream(messages):
            if event.kind == "done":
                assert event.answer is not None
                return event.answer
        raise AssertionError("the loop ended without its done event")

    def _run(self, found: ToolCall | ToolCallError, in_reasoning: bool) -> Iterator[LoopEvent]:
        if isinstance(found, ToolCallError):
            record = CallRecord(found.name, found.arguments, found.message, "invalid", in_reasoning)
            yield LoopEvent("tool_call", record.code, record)
        else:
            record = CallRecord(found.name, found.arguments, "", "ok", in_reasoning)
            yield LoopEvent("tool_call", record.code, record)
            if self.yes or (self.confirm is not None and self.confirm(found)):
                record.output = self._by_name[found.name].run(found.arguments)
            else:
                record.output, record.status = DECLINED, "declined"
        yield LoopEvent("tool_result", record.output, record)
        return record

    def _cut_round(self, request: Request, text: dict[str, str], found: Any) -> RoundResult:
        # Stopped at a call, the engine sends no `done`: count the tokens from the text (close enough).
        written = text["reasoning"] + text["content"] + getattr(found, "raw", "")
        return RoundResult(prompt_tokens=len(request.prompt_tokens), reasoning=text["reasoning"],
                           content=text["content"], completion_tokens=len(self.engine.model.tokenize(written)))

    @staticmethod
    def _messages(found: ToolCall | ToolCallError, record: CallRecord, text: dict[str, str]) -> list[dict[str, Any]]:
        assistant: dict[str, Any] = {"role": "assistant", "content": text["content"].strip(),
                                     "reasoning_content": text["reasoning"].strip()}
        if record.name is not None:
            assistant["tool_calls"] = [{"type": "function",
                                        "function": {"name": record.name, "arguments": dict(record.arguments)}}]
        else:  # nothing the template can render as a call: show the model what it wrote
            assistant["content"] = (assistant["content"] + "\n" + found.raw).strip()
        return [assistant, {"role": "tool", "content": record.output}]
