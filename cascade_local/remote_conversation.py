"""A conversation held with an OpenAI-compatible server: same interface as `conversation.Conversation`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cascade_local.conversation import History, TurnSettings
from cascade_local.engine import Event
from cascade_local.errors import UsageError
from cascade_local.remote import ChatRequest, RemoteEngine


@dataclass
class ServedModel:
    """What the chat shows for /model and names saved transcripts after, for a model behind a server."""

    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)


class RemoteConversation(History):
    """The history lives here; the server renders it with its own template on every turn."""

    def __init__(self, engine: RemoteEngine, system: str | None, label: str):
        super().__init__(system)
        self.engine = engine
        self.label = label  # the server's URL or endpoint name, as given
        self.model = ServedModel(Path(label), {"general.architecture": "served over HTTP",
                                               "general.name": engine.model or label})

    def reply(self, user_text: str, settings: TurnSettings,
              progress: Callable[[int, int], None] | None = None) -> Iterator[Event]:
        """As Conversation.reply; a server reads the prompt on its side, so `progress` is never told."""
        if settings.thinking_budget is not None:
            raise UsageError("a thinking budget needs the local engine (/budget off to continue)")
        self._ask(user_text)
        request = ChatRequest(self._history(), settings.thinking, settings.sampling, settings.max_tokens)
        yield from self._recorded(self.engine.stream(request))
