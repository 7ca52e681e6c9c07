"""A conversation held with an OpenAI-compatible server: same interface as `conversation.Conversation`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cascade_local.chat_template import Message
from cascade_local.conversation import TurnSettings
from cascade_local.engine import Event, Result
from cascade_local.errors import UsageError
from cascade_local.remote import ChatRequest, RemoteEngine


@dataclass
class ServedModel:
    """What the chat shows for /model and names saved transcripts after, for a model behind a server."""

    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)


class RemoteConversation:
    """The history lives here; the server renders it with its own template on every turn."""

    def __init__(self, engine: RemoteEngine, system: str | None, label: str):
        self.engine = engine
        self.label = label  # the server's URL or endpoint name, as given
        self.system = system
        self.messages: list[Message] = []
        self.last: Result | None = None
        self.model = ServedModel(Path(label), {"general.architecture": "served over HTTP",
                                               "general.name": engine.model or label})

    def reply(self, user_text: str, settings: TurnSettings) -> Iterator[Event]:
        if settings.thinking_budget is not None:
            raise UsageError("a thinking budget needs the local engine (/budget off to continue)")
        self.messages.append({"role": "user", "content": user_text})
        history = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        request = ChatRequest(history, settings.thinking, settings.sampling, settings.max_tokens)
        reasoning: list[str] = []
        content: list[str] = []
        finished = False
        try:
            for event in self.engine.stream(request):
                if event.kind == "done":
                    self.last, finished = event.result, True
                else:
                    (reasoning if event.kind == "reasoning" else content).append(event.text)
                yield event
        finally:
            if not finished:
                self.last = None
            self.messages.append({"role": "assistant", "content": "".join(content).strip(),
                                  "reasoning_content": "".join(reasoning).strip()})

    def retry_last(self) -> str | None:
        if len(self.messages) >= 2 and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
            return self.messages.pop()["content"]
        return None

    def clear(self) -> None:
        self.messages.clear()
