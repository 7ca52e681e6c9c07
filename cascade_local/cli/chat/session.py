"""A chat's state and what it does: slash commands executed, turns asked and shown."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from cascade_local.cli.chat.commands import BLOCK, Command, SlashError, help_text
from cascade_local.cli.chat.interrupts import Interrupts
from cascade_local.cli.chat.record import ChatRecorder
from cascade_local.cli.chat.stats import Totals, model_text, stats_text
from cascade_local.cli.chat.tools import answer_result, ask_to_run, exchange_messages
from cascade_local.cli.chat.view import TurnView

if TYPE_CHECKING:

    from cascade_local.conversation import Conversation, TurnSettings
    from cascade_local.engine import Result
    from cascade_local.placement import Plan
    from cascade_local.sampling import SamplingParams
    from cascade_local.tools import Answer, Tool, ToolCall


@dataclass
class Outcome:
    """What a command did: a message to show, a question to ask the model, or the end of the chat."""

    message: str | None = None
    ask: str | None = None
    exit: bool = False


@dataclass
class ChatSession:
    """A chat's state: the conversation, the next turn's settings, display choices and session totals.

    `sampling(thinking)` gives the sampling for a mode (the user's flags over the model's recommendation):
    switching thinking on or off switches to that mode's sampling.
    """

    conversation: Conversation
    settings: TurnSettings
    sampling: Callable[[bool], SamplingParams]
    show_thinking: bool = True
    plan: Plan | None = None
    out: Console = field(default_factory=Console)
    err: Console = field(default_factory=lambda: Console(stderr=True))
    totals: Totals = field(default_factory=Totals)
    # Tools: `tools` are the tool objects (None until tools are first switched on), `tools_on` whether the next
    # turns use them, `yes` runs every call without asking, else `confirm(call)` is asked before each one.
    tools: list[Tool] | None = None
    tools_on: bool = False
    yes: bool = False
    confirm: Callable[[ToolCall], bool] | None = None
    # Ctrl-C interrupts only while an answer streams (and at the prompt): see interrupts.py.
    interrupts: Interrupts = field(default_factory=Interrupts)
    # The automatic history (None: not logged, by --no-log, the setting, or a database that cannot be used).
    recorder: ChatRecorder | None = None

    def record(self, result: Result | None = None, asking: str | None = None) -> None:
        """Writes the messages completed since the last call (and `asking`, the question about to be asked)."""
        if self.recorder is not None:
            asked = [{"role": "user", "content": asking}] if asking is not None else []
            self.recorder.record([*self.conversation.messages, *asked], self.conversation.system, self.settings,
                                 result)

    def enable_tools(self, names: str = "python") -> None:
        """Makes the tools (the kernel starts at the first call); the next turns use them."""
        from cascade_local.tools import make_tools

        if not hasattr(self.conversation, "engine") or not hasattr(getattr(self.conversation, "model", None),
                                                                   "template"):
            raise SlashError("tools need the local engine and its chat template (not --endpoint)")
        if self.tools is None:
            self.tools = make_tools(names)
        self.tools_on = True

    def close_tools(self) -> None:
        """Shuts the Python kernel down (a later call starts a fresh one)."""
        for tool in self.tools or []:
            tool.close()

    def close(self) -> None:
        """The end of the chat: no kernel outlives it."""
        self.close_tools()

    def execute(self, command: Command) -> Outcome:
        """Runs a slash command. Domain errors (a bad file for /load...) propagate, for the loop to show."""
        from cascade_local import transcript

        name, value, settings, chat = command.name, command.value, self.settings, self.conversation
        if name == "/exit":
            return Outcome(exit=True)
        if name == "/help":
            return Outcome(help_text(self.err.width))
        if name == "/settings":
            return Outcome(self.settings_text())
        if name == "/think":
            if value is not None:
                settings.thinking, settings.sampling = value, self.sampling(value)
            return Outcome(f"thinking {'on' if settings.thinking else 'off'}")
        if name == "/thinking":
            if value is not None:
                self.show_thinking = value
            return Outcome("reasoning shown" if self.show_thinking else "reasoning hidden (only its summary is shown)")
        if name == "/tools" and value is None:
            return Outcome(f"tools {'on' if self.tools_on else 'off'}")
        if name == "/tools":
            if value:
                self.enable_tools()
                names = ", ".join(t.schema["function"]["name"] for t in self.tools or [])
                how = "every call runs without asking" if self.yes else "you confirm each call"
                return Outcome(f"tools on: {names} ({how})")
            self.tools_on = False
            self.close_tools()
            return Outcome("tools off (the Python kernel was shut down)")
        if name == "/budget":
            settings.thinking_budget = value
            return Outcome(f"thinking budget {value if value else 'off'}")
        if name == "/system":
            if value is None:
                return Outcome(f"system prompt: {chat.system}" if chat.system else "no system prompt")
            chat.system = value or None
            return Outcome("system prompt set" if value else "system prompt removed")
        if name == "/read":
            from cascade_local.oneshot import read_prompt_file

            text = read_prompt_file(value)
            if not text.strip():
                raise SlashError(f"{value} is empty")
            chat.attach(text)
            waiting = len(chat.attached)
            what = f"{waiting} files" if waiting > 1 else "it"
            return Outcome(f"read {value} ({len(text):,} characters); {what} will come before your next message")
        if name == "/clear":
            chat.clear()
            if self.recorder is not None:
                self.recorder.restart()
            self.close_tools()
            return Outcome("conversation cleared")
        if name == "/retry":
            previous = self._retry_tool_turn() if any(m.get("role") == "tool" for m in chat.messages[-3:]) else None
            previous = previous if previous is not None else chat.retry_last()
            return Outcome(ask=previous) if previous is not None else Outcome("nothing to retry yet")
        if name == "/save":
            path = transcript.save(chat, settings, value, force=command.force)
            return Outcome(f"saved {len(chat.messages)} messages to {path}")
        if name == "/load":
            if value.name.isdigit() and str(value) == value.name and not value.exists():
                return self.resume(int(value.name))  # the id of a logged conversation
            transcript.load(chat, settings, value, with_settings=command.with_settings)
            chat.last = None
            if self.recorder is not None:
                self.recorder.restart()  # the loaded messages are logged as a new conversation
            self.record()
            kept = ("with its settings" if command.with_settings
                    else "settings kept (/load FILE --settings takes the file's)")
            return Outcome(f"loaded {len(chat.messages)} messages from {value} · {kept} · thinking "
                           f"{'on' if settings.thinking else 'off'}")
        if name == "/stats":
            return Outcome(stats_text(chat.last, self.totals, self.plan, self.context_size(), chat.turns_left_out())
                           + "\n" + self._history_line())
        if name == "/model":
            model = chat.model
            return Outcome(model_text(model.path, model.metadata, getattr(chat.engine, "n_ctx", None)))
        raise SlashError(f"{name} is not implemented")  # COMMANDS and this method disagree

    def settings_text(self) -> str:
        """What the next turn will use, one line per topic."""
        s, p = self.settings, self.settings.sampling
        budget = s.thinking_budget if s.thinking_budget else "off"
        return "\n".join([
            f"thinking {'on' if s.thinking else 'off'} · budget {budget} · max tokens {s.max_tokens} · reasoning "
            f"{'shown' if self.show_thinking else 'hidden'} · tools {'on' if self.tools_on else 'off'}",
            f"sampling: temperature {p.temperature:g}, top-p {p.top_p:g}, top-k {p.top_k}, min-p {p.min_p:g}, "
            f"repeat penalty {p.repeat_penalty:g}, seed {p.seed if p.seed is not None else 'random'}"
            + (", ignore eos" if p.ignore_eos else ""),
            f"system prompt: {self.conversation.system}" if self.conversation.system else "no system prompt",
        ])

    def _retry_tool_turn(self) -> str | None:
        """Drops a last exchange that had tool calls (the question and everything after it); returns the question."""
        messages = self.conversation.messages
        for i in range(len(messages) - 1, -1, -1):
            if messages[i].get("role") == "user":
                text = messages[i]["content"]
                del messages[i:]
                return text
        return None

    def context_size(self) -> int | None:
        """Tokens in the local engine's context (None with a server, which keeps its own)."""
        size = getattr(self.conversation, "context_size", None)
        return size() if size is not None else None

    def _make_room(self, text: str) -> None:
        """Leaves out the oldest turns when the next prompt would not fit the context, and says so."""
        make_room = getattr(self.conversation, "make_room", None)
        dropped = make_room(text, self.settings) if make_room is not None else 0
        if dropped:
            self.err.print(f"the context is full: the {dropped} oldest turn{'s' if dropped != 1 else ''} left out "
                           "of the prompt (the system prompt stays); /clear starts afresh", style="dim",
                           highlight=False, soft_wrap=True)

    def turn(self, text: str) -> Result | None:
        """Asks the model; shows the answer as it streams. Ctrl-C stops it, and what was said stays."""
        if self.tools_on and self.tools:
            return self._tool_turn(text)
        self._make_room(text)
        view = TurnView(self.out, self.err, thinking=self.settings.thinking, show_thinking=self.show_thinking,
                        context=self.context_size())
        result, interrupted = None, False
        self.record(asking=text)  # the question is kept even if the chat is killed while it is answered
        try:
            events = self.conversation.reply(text, self.settings, progress=view.reading)
            # Closed at once (and no longer interruptible), so the partial answer joins the history before we go on.
            with closing(events), self.interrupts.armed():
                for event in events:
                    view.feed(event)
            result = self.conversation.last
        except KeyboardInterrupt:
            interrupted = True
            result = self.conversation.last  # the stopped answer's counts, where the backend knows them
        finally:
            view.close(result, interrupted)
        self.record(result)
        if result is not None:
            self.totals.add(result)
        return result

    def _tool_turn(self, text: str) -> Result | None:
        """A turn through the ToolLoop: calls shown as they run; the calls and the answer join the history."""
        from cascade_local.tools import ToolLoop

        chat, settings = self.conversation, self.settings
        self._make_room(text)
        chat.messages.append({"role": "user", "content": text})
        self.record()
        history = ([{"role": "system", "content": chat.system}] if chat.system else []) + chat.messages[chat.start:]
        loop = ToolLoop(chat.engine, list(self.tools or []), thinking=settings.thinking, sampling=settings.sampling,
                        max_tokens=settings.max_tokens, budget=settings.thinking_budget,
                        confirm=self.confirm or ask_to_run(self.err), yes=self.yes)
        view = TurnView(self.out, self.err, thinking=settings.thinking, show_thinking=self.show_thinking,
                        context=self.context_size())
        answer: Answer | None = None
        result, interrupted = None, False
        exchanges: list[dict[str, Any]] = []  # the calls so far, for an interrupted turn
        part = {"reasoning": "", "content": ""}  # the text of the round in progress
        try:
            events = loop.stream(history)
            with closing(events), self.interrupts.armed():
                for event in events:
                    if event.kind == "done":
                        answer = event.answer
                        break
                    if event.kind in part:
                        part[event.kind] += event.text
                    elif event.kind == "tool_result" and event.call is not None:
                        exchanges += exchange_messages(event.call, part)
                        part = {"reasoning": "", "content": ""}
                        if self.recorder is not None:  # a finished call and its output are kept at once
                            self.recorder.record([*chat.messages, *exchanges], chat.system, settings)
                    view.feed(event)
            if answer is not None:
                exchanges = answer.messages[len(history):]
                result = answer_result(answer)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            view.close(result, interrupted)
            if answer is not None or interrupted:
                final = {"role": "assistant", "content": part["content"].strip(),
                         "reasoning_content": part["reasoning"].strip()}
                chat.messages.extend([*exchanges, final])
            chat.last = result
        self.record(result)
        if result is not None:
            self.totals.add(result)
        return result

    def resume(self, conversation_id: int | None) -> Outcome:
        """Replaces the conversation by a logged one (the last chat's when `conversation_id` is None), with its
        settings; the chat then goes on logging into it. Its prompt is evaluated again at the next turn."""
        from cascade_local import transcript
        from cascade_local.history import HistoryStore

        if self.recorder is None or self.recorder.log is None:
            raise SlashError("the history is off in this chat (--no-log, the setting, or a database error)")
        log = self.recorder.log
        store = HistoryStore(log.db)
        stored = store.get(store.last_id() if conversation_id is None else conversation_id)
        chat = self.conversation
        chat.clear()  # also drops the evaluated-prompt cache, which belonged to the old history
        self.close_tools()  # and the Python kernel's variables
        chat.messages.extend(stored.chat_messages())
        chat.system = stored.system
        chat.last = None
        transcript.apply_settings(self.settings, {k: v for k, v in stored.settings.items()
                                                  if k in ("thinking", "thinking_budget", "max_tokens")})
        self.settings.sampling = self.sampling(self.settings.thinking)  # this chat's sampling for that mode
        log.attach(stored.id, stored.chat_messages())
        turns = sum(m["role"] == "user" for m in chat.messages)
        return Outcome(f"conversation {stored.id} ({turns} question{'s' if turns != 1 else ''}, "
                       f"{len(chat.messages)} messages) · thinking {'on' if self.settings.thinking else 'off'}")

    def _history_line(self) -> str:
        logged = self.recorder.conversation_id if self.recorder is not None else None
        if logged is not None:
            return f"history: conversation {logged} (cascade-local logs show {logged})"
        return "history: nothing logged yet" if self.recorder is not None and self.recorder.log else "history: off"

    def drop_failed(self, text: str) -> None:
        """Removes the exchange of a turn that failed (its question, and any empty answer) from the history."""
        messages, asked = self.conversation.messages, {"role": "user", "content": text}
        if len(messages) >= 2 and messages[-1]["role"] == "assistant" and messages[-2] == asked:
            del messages[-2:]
        elif messages and messages[-1] == asked:
            messages.pop()
        self.record()

    def banner(self) -> str:
        name = Path(self.conversation.model.path).name
        tools = f"tools {'on, every call runs' if self.yes else 'on, each call asks'} · " if self.tools_on else ""
        return (f"[bold]{escape(name)}[/] · thinking {'on' if self.settings.thinking else 'off'} · {tools}"
                f"/help lists commands · {BLOCK} for multi-line · Ctrl-C stops an answer, Ctrl-D leaves")
