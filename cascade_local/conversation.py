"""A conversation with the model: history, thinking mode, budget, and reuse of the evaluated prompt."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

from cascade_local.chat_template import Message
from cascade_local.engine import Engine, Event, PromptCache, Request, Result
from cascade_local.sampling import SamplingParams


@dataclass
class TurnSettings:
    thinking: bool = True
    thinking_budget: int | None = None
    max_tokens: int = 4096
    sampling: SamplingParams = field(default_factory=SamplingParams)


class History:
    """The messages of a chat and what every backend does with them: record replies, retry, clear."""

    def __init__(self, system: str | None = None):
        self.system = system
        self.messages: list[Message] = []
        self.last: Result | None = None
        # The first message the prompt holds: the turns before it were left out to fit the context (they stay in
        # `messages`, so /save and the history keep them).
        self.start = 0

    def _history(self) -> list[Message]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages[self.start:]

    def turns_left_out(self) -> int:
        return sum(m["role"] == "user" for m in self.messages[:self.start])

    def _recorded(self, events: Iterator[Event]) -> Iterator[Event]:
        """Passes the reply's events on; the reply joins the history once complete (or interrupted)."""
        reasoning: list[str] = []
        content: list[str] = []
        finished = False
        progress: Result | None = None
        try:
            for event in events:
                if event.kind == "done":
                    self.last = event.result
                    finished = True
                else:
                    (reasoning if event.kind == "reasoning" else content).append(event.text)
                    progress = event.progress or progress
                yield event
        finally:
            if not finished:  # interrupted: keep what was said, so the conversation goes on
                # Counted as what it is, a stopped answer, with the engine's counts so far (None: none known).
                self.last = None if progress is None else dataclasses.replace(
                    progress, content="".join(content).strip(), reasoning="".join(reasoning).strip(),
                    finish_reason="cancelled")
            self.messages.append({"role": "assistant", "content": "".join(content).strip(),
                                  "reasoning_content": "".join(reasoning).strip()})

    def retry_last(self) -> str | None:
        """Drops the last exchange and returns its user text, to ask again."""
        if len(self.messages) >= 2 and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
            text = self.messages.pop()["content"]
            self.start = min(self.start, len(self.messages))
            return text
        return None

    def clear(self) -> None:
        self.messages.clear()
        self.start = 0


class Conversation(History):
    """Renders the history with the model's template and streams each reply through the engine."""

    def __init__(self, engine: Engine, system: str | None = None):
        super().__init__(system)
        self.engine = engine
        self.model = engine.model
        self._cache = PromptCache()

    def render(self, thinking: bool) -> str:
        return self.model.template.render(self._history(), add_generation_prompt=True, enable_thinking=thinking)

    def render_history(self) -> str:
        return self.model.template.render(self._history(), add_generation_prompt=False)

    def context_size(self) -> int:
        """Tokens one sequence of the engine holds: the prompt and the answer together."""
        return self.engine.n_ctx // self.engine.n_seq_max

    def make_room(self, user_text: str, settings: TurnSettings) -> int:
        """Leaves out the oldest turns (never the system prompt) until the prompt that asks `user_text` fits the
        context with room for an answer (a quarter of the context, or max_tokens if less). Returns how many
        turns it left out; a question too long by itself is left for the engine to refuse."""
        limit = self.context_size()
        room = min(settings.max_tokens, limit // 4)
        asked: list[Message] = [{"role": "user", "content": user_text}]
        dropped = 0
        while True:
            prompt = self.model.template.render(self._history() + asked, add_generation_prompt=True,
                                                enable_thinking=settings.thinking)
            if len(self.model.encode_prompt(prompt)) + room <= limit:
                return dropped
            later = [i for i in range(self.start + 1, len(self.messages)) if self.messages[i]["role"] == "user"]
            if not later and self.start == len(self.messages):
                return dropped
            self.start = later[0] if later else len(self.messages)  # whole turns: a question and its answer
            dropped += 1

    def reply(self, user_text: str, settings: TurnSettings) -> Iterator[Event]:
        """Streams reasoning and answer; the reply joins the history once complete (or interrupted)."""
        self.make_room(user_text, settings)
        self.messages.append({"role": "user", "content": user_text})
        tokens = self.model.encode_prompt(self.render(settings.thinking))
        # The history without the generation prompt is what the next turn's prompt will start with.
        stable = len(self.model.encode_prompt(self.render_history()))
        request = Request(tokens, settings.sampling, settings.max_tokens, in_reasoning=settings.thinking,
                          thinking_budget=settings.thinking_budget, cache=self._cache, cache_prefix=stable)
        yield from self._recorded(self.engine.stream(request))

    def clear(self) -> None:
        super().clear()
        self._cache = PromptCache()
