"""Tool calls in the chat: the confirmation before each call, and a tool turn's history and statistics."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.console import Console

if TYPE_CHECKING:

    from cascade_local.engine import Result
    from cascade_local.tools import Answer, CallRecord, ToolCall


def ask_to_run(err: Console, read: Callable[[], str] = input) -> Callable[[ToolCall], bool]:
    """The confirmation before each call: 'Run this code? [y/N]' on stderr, answered by the next input line.

    On a terminal that is the user typing; from a pipe it is the next line of the script. "y" or "yes" runs the
    call; anything else (the end of input too) declines it, and the loop tells the model so.
    """

    def confirm(call: ToolCall) -> bool:
        err.print("Run this code? [y/N] ", end="", highlight=False, markup=False)
        try:
            reply = read()
        except EOFError:
            err.print()
            return False
        if not sys.stdin.isatty():  # a piped answer is not echoed: show it, so the log reads as a dialogue
            err.print(reply, highlight=False, markup=False)
        return reply.strip().lower() in ("y", "yes")

    return confirm


def answer_result(answer: Answer) -> Result:
    """A tool turn's stats as one Result: the rounds' counts added up; the finish of the last round."""
    from cascade_local.engine import Result

    rounds = answer.rounds
    last = rounds[-1] if rounds else Result()
    return Result(content=answer.content, reasoning=answer.reasoning,
                  prompt_tokens=sum(r.prompt_tokens for r in rounds),
                  cached_tokens=sum(r.cached_tokens for r in rounds),
                  completion_tokens=sum(r.completion_tokens for r in rounds),
                  reasoning_tokens=sum(r.reasoning_tokens for r in rounds),
                  finish_reason=last.finish_reason if answer.finish_reason == "max_calls" else answer.finish_reason,
                  budget_closed=any(r.budget_closed for r in rounds),
                  prompt_seconds=sum(r.prompt_seconds for r in rounds),
                  generation_seconds=sum(r.generation_seconds for r in rounds))


def exchange_messages(call: CallRecord, part: dict[str, str]) -> list[dict[str, Any]]:
    """The messages one call adds to the history (as the loop writes them), rebuilt from the streamed text."""
    assistant: dict[str, Any] = {"role": "assistant", "content": part["content"].strip(),
                                 "reasoning_content": part["reasoning"].strip()}
    if call.name is not None:
        assistant["tool_calls"] = [{"type": "function", "function": {"name": call.name,
                                                                     "arguments": dict(call.arguments)}}]
    return [assistant, {"role": "tool", "content": call.output}]
