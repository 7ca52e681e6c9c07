"""A conversation with the model: history, thinking mode, budget, and reuse of the evaluated prompt."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from cascade_local.chat_template import Message
from cascade_local.engine import Engine, Event, PromptCache, Request, Result
from cascade_local.prompt_store import DEFAULT_MIN_TOKENS, PromptStore, question_start
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
        self.attached: list[str] = []  # documents for the next message (/read)
        # The first message the prompt holds: the turns before it were left out to fit the context (they stay in
        # `messages`, so /save and the history keep them).
        self.start = 0

    def attach(self, text: str) -> None:
        """Puts a document before the next message, joined as `run -f FILE "question"` joins them."""
        self.attached.append(text.rstrip())

    def _message(self, user_text: str) -> tuple[str, bool]:
        """The user's message, attached documents first (they are used up); whether there were any."""
        documents, self.attached = self.attached, []
        return "\n\n".join([*documents, user_text.rstrip()]), bool(documents)

    def _ask(self, user_text: str) -> bool:
        """Appends the user's message, attached documents first; True when there were any."""
        text, has_document = self._message(user_text)
        self.messages.append({"role": "user", "content": text})
        return has_document

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
        self.attached = []
        self.start = 0


class Conversation(History):
    """Renders the history with the model's template and streams each reply through the engine.

    With a `disk` store, the turn that carries an attached document leaves the state of everything before the
    question on disk, and a later chat or run that starts the same way restores it instead of reading the
    document again.
    """

    def __init__(self, engine: Engine, system: str | None = None, *, disk: PromptStore | None = None,
                 disk_min_tokens: int = DEFAULT_MIN_TOKENS):
        super().__init__(system)
        self.engine = engine
        self.model = engine.model
        self._cache = PromptCache()
        self.disk, self.disk_min_tokens = disk, disk_min_tokens

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

    def reply(self, user_text: str, settings: TurnSettings,
              progress: Callable[[int, int], None] | None = None) -> Iterator[Event]:
        """Streams reasoning and answer; the reply joins the history once complete (or interrupted).

        `progress(done, total)` is told the prompt tokens read after each batch of them."""
        text, has_document = self._message(user_text)
        self.make_room(text, settings)
        self.messages.append({"role": "user", "content": text})
        tokens = self.model.encode_prompt(self.render(settings.thinking))
        # The history without the generation prompt is what the next turn's prompt will start with.
        stable = len(self.model.encode_prompt(self.render_history()))
        request = Request(tokens, settings.sampling, settings.max_tokens, in_reasoning=settings.thinking,
                          thinking_budget=settings.thinking_budget, cache=self._cache, cache_prefix=stable,
                          on_progress=progress)
        if self.disk is not None:
            request = self._with_disk(request, settings.thinking, user_text.rstrip() if has_document else None)
        yield from self._recorded(self.engine.stream(request))

    def _with_disk(self, request: Request, thinking: bool, question: str | None) -> Request:
        """A longer prefix from disk than the turn's own cache holds; a document's turn saves its prefix."""
        assert self.disk is not None
        tokens = request.prompt_tokens
        own = len(self._cache.tokens) if tokens[: len(self._cache.tokens)] == self._cache.tokens else 0
        hit = self.disk.lookup(tokens)
        if hit is not None and len(hit[0]) > own:
            self._cache = PromptCache(*hit)
            request = dataclasses.replace(request, cache=self._cache)
        if question is None or len(tokens) < self.disk_min_tokens:
            return request
        restored = len(hit[0]) if hit else 0
        disk = self.disk

        def save(prefix: list[int], state: bytes) -> None:
            if len(prefix) > restored:
                disk.save(prefix, state)

        # The snapshot is taken before the question: the state any other question about the document starts from.
        # The next turn restores it and reads this question and answer again: a few hundred tokens, not the document.
        return dataclasses.replace(request, cache_prefix=self._before_question(tokens, thinking, question),
                                   on_snapshot=save)

    def _before_question(self, tokens: list[int], thinking: bool, question: str) -> int:
        """Tokens shared with the same prompt asking something else (a token the question merges into is left out)."""
        last = self.messages[-1]
        if not question:
            return len(tokens) - 1
        other = [*self.messages[self.start : -1], {"role": "user", "content": last["content"][: -len(question)] + "?"}]
        system = [{"role": "system", "content": self.system}] if self.system else []
        alt = self.model.encode_prompt(self.model.template.render(system + other, add_generation_prompt=True,
                                                                  enable_thinking=thinking))
        return question_start(tokens, alt)

    def clear(self) -> None:
        super().clear()
        self._cache = PromptCache()
