"""One prompt, one answer: what `cascade-local run` does, callable from Python.

The pieces are separate so that each can be used (and tested) alone: `split_positionals` decides
what `run`'s positional arguments mean, `compose_prompt` joins the context (files, stdin) with the
instruction, `build_messages` and `render_prompt` turn the text into the model's chat format,
`build_request` tokenizes it, and `stream` / `generate` run it on an engine.

    engine, _ = open_engine("model.gguf")
    job = OneShot("Summarize:\\n\\n" + text, thinking=False, sampling=sampling_for(False))
    with engine:  # frees the context, then the model it owns
        result = generate(engine, job)  # result.content, result.reasoning, result.completion_tokens...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cascade_local.chat_template import ChatTemplate, Message
from cascade_local.engine import Engine, Event, PromptCache, Request, Result
from cascade_local.errors import UsageError
from cascade_local.llama_model import LoadedModel
from cascade_local.prompt_store import DEFAULT_MIN_TOKENS, PromptStore, question_start
from cascade_local.sampling import SamplingParams

OPEN_THINK, CLOSE_THINK = "<think>", "</think>"


# -- what the user typed -----------------------------------------------------------------------------


def looks_like_model(spec: str) -> bool:
    """A positional argument names a model if it is an existing path, a registry name, or a name ending in .gguf
    without spaces (`run "explain model.gguf"` is a prompt)."""
    from cascade_local.registry import load_registry

    if spec.endswith(".gguf") and not any(c.isspace() for c in spec):
        return True
    try:
        if Path(spec).expanduser().exists():
            return True
    except (OSError, ValueError):  # a long prompt is "File name too long"; one with a NUL byte a ValueError
        return False
    # A prompt with spaces or newlines is never a registry name; skip reading the registry for it.
    return not any(c.isspace() for c in spec) and spec in load_registry().models


def split_positionals(first: str | None, second: str | None) -> tuple[str | None, str | None]:
    """`run [MODEL] [PROMPT]` -> (model, prompt).

    With two arguments the first is the model. With one, it is the model only if `looks_like_model`
    says so (an existing path, a registry name, or a name ending in .gguf); otherwise it is the
    prompt and the default model is used: `cascade-local run "Hello"`.
    """
    if second is not None:
        return first, second
    if first is None:
        return None, None
    return (first, None) if looks_like_model(first) else (None, first)


def decode_text(data: bytes, origin: str) -> str:
    """UTF-8 text (a byte-order mark is dropped), or a UsageError naming where the bytes came from."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{origin} is not UTF-8 text (byte {exc.start}); convert it first, e.g. with iconv") from None


def read_prompt_file(path: Path) -> str:
    try:
        return decode_text(Path(path).read_bytes(), str(path))
    except OSError as exc:
        raise UsageError(f"cannot read prompt file {path}: {exc.strerror or exc}") from None


def compose_prompt(instruction: str | None = None, stdin: str | None = None, files: Sequence[Path] = ()) -> str:
    """The user message: the context (each -f file, then stdin) first, the instruction last, blank-line separated.

    So `git diff | cascade-local run "Review this"` asks "<the diff>\\n\\nReview this". Trailing
    whitespace of each part is dropped (stdin ends with a newline); empty parts are skipped.
    Raises UsageError when nothing is left.
    """
    parts = [read_prompt_file(p) for p in files] + [stdin or "", instruction or ""]
    kept = [p.rstrip() for p in parts if p.strip()]
    if not kept:
        raise UsageError("no prompt: give it as an argument (cascade-local run \"...\"), on stdin, or with -f FILE")
    return "\n\n".join(kept)


# -- the model's format ------------------------------------------------------------------------------


def build_messages(prompt: str, system: str | None = None) -> list[Message]:
    """A one-turn chat: an optional system message, then the prompt as the user's message."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def render_prompt(template: ChatTemplate, messages: list[Message], *, thinking: bool) -> str:
    """The prompt text as the model was trained to see it, ending with the assistant's turn opened."""
    return template.render(messages, add_generation_prompt=True, enable_thinking=thinking)


def sampling_for(thinking: bool, *, defaults: Mapping[str, Any] | None = None, **given: Any) -> SamplingParams:
    """SamplingParams: each field given (not None) wins, else the mode's default, else the built-in.

    `given` takes SamplingParams' field names (temperature, top_p, top_k, min_p, repeat_penalty, seed).
    `defaults` are the mode's recommended values; when None they are read from the registry
    (models.toml, [models.NAME.sampling] thinking / instruct) of the default model family.
    """
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    unknown = set(given) - names
    if unknown:
        raise TypeError(f"unknown sampling fields: {', '.join(sorted(unknown))}")
    if defaults is None:
        from cascade_local.registry import load_registry

        defaults = load_registry().get(None).sampling_defaults(thinking)
    known = {k: v for k, v in defaults.items() if k in names}
    return SamplingParams(**{**known, **{k: v for k, v in given.items() if v is not None}})


@dataclass(frozen=True)
class OneShot:
    """One prompt and how to answer it.

    `raw`: the prompt is tokenized as is, without the chat template or system message, and the whole
    output is content (think tags included, as the model wrote them); no thinking budget applies.
    """

    prompt: str
    system: str | None = None
    thinking: bool = True
    budget: int | None = None
    max_tokens: int = 4096
    sampling: SamplingParams = field(default_factory=SamplingParams)
    raw: bool = False

    def __post_init__(self) -> None:
        if self.raw and self.system:
            raise UsageError("--system has no effect with --raw (the prompt is sent as is); put it in the prompt")


def prompt_tokens(model: LoadedModel, job: OneShot) -> list[int]:
    """`job`'s prompt as `model` reads it: rendered with the chat template (unless raw), tokenized."""
    if job.raw:
        return model.encode_prompt(job.prompt)
    return model.encode_prompt(render_prompt(model.template, build_messages(job.prompt, job.system),
                                             thinking=job.thinking))


def build_request(engine: Engine, job: OneShot, tag: Any = None) -> Request:
    """Renders and tokenizes `job` for `engine`'s model."""
    tokens = prompt_tokens(engine.model, job)
    if job.raw:
        return Request(tokens, job.sampling, job.max_tokens, in_reasoning=False, tag=tag)
    return Request(tokens, job.sampling, job.max_tokens, in_reasoning=job.thinking,
                   thinking_budget=job.budget if job.thinking else None, tag=tag)


def stream(engine: Engine, job: OneShot, *, disk: PromptStore | None = None, question: str | None = None,
           min_tokens: int = DEFAULT_MIN_TOKENS, progress: Callable[[int, int], None] | None = None,
           ) -> Iterator[Event]:
    """Reasoning and content pieces as generated, then `done` with the Result.

    With `disk`, a stored state of the prompt's longest cached prefix is restored instead of evaluated, and a
    prompt of at least `min_tokens` leaves the state of its reusable prefix there (everything before
    `question`, the instruction at the end of the prompt; without one, all but the last token).
    `progress(done, total)` is told the prompt tokens read after each batch of them.
    """
    request = dataclasses.replace(build_request(engine, job), on_progress=progress)
    if disk is not None:
        request = _with_disk_cache(engine, job, request, disk, question, min_tokens)
    events = engine.stream(request)
    yield from _as_raw(events) if job.raw else events


def reusable_prefix(model: LoadedModel, job: OneShot, question: str | None) -> int:
    """How many of the job's prompt tokens come before `question`: the same for any other question asked.

    Found as the tokens the prompt shares with the same prompt asking something else, so a token that the
    question's first characters would merge into is left out.
    """
    tokens = prompt_tokens(model, job)
    q = (question or "").strip()
    if not q or not job.prompt.endswith(q) or len(job.prompt) == len(q):
        return len(tokens) - 1
    other = prompt_tokens(model, dataclasses.replace(job, prompt=job.prompt[: -len(q)] + "?"))
    return question_start(tokens, other)


def _with_disk_cache(engine: Engine, job: OneShot, request: Request, disk: PromptStore, question: str | None,
                     min_tokens: int) -> Request:
    tokens = request.prompt_tokens
    hit = disk.lookup(tokens)
    if hit is None and len(tokens) < min_tokens:
        return request
    restored = len(hit[0]) if hit else 0

    def save(prefix: list[int], state: bytes) -> None:
        if len(tokens) >= min_tokens and len(prefix) > restored:  # a new, longer prefix: worth a file
            disk.save(prefix, state)

    return dataclasses.replace(request, cache=PromptCache(*hit) if hit else PromptCache(),
                               cache_prefix=reusable_prefix(engine.model, job, question), on_snapshot=save)


def generate(engine: Engine, job: OneShot) -> Result:
    """Runs `job` to the end and returns its Result."""
    for event in stream(engine, job):
        if event.kind == "done":
            assert event.result is not None
            return event.result
    raise AssertionError("the engine ended a stream without a result")


def trim_content(events: Iterable[Event]) -> Iterator[Event]:
    """The same events, with content pieces trimmed so that they join to exactly `result.content`.

    The model starts its answer with blank lines after the thought, and may end it with some: a
    reader of stdout (`| head -1`) wants the answer's first line, not an empty one. Trailing
    whitespace is held back until more text follows it, so nothing is lost inside the answer.
    """
    started, held = False, ""
    for event in events:
        if event.kind != "content":
            yield event
            continue
        text = held + (event.text if started else event.text.lstrip())
        body = text.rstrip()
        held = text[len(body):]
        if body:
            started = True
            yield Event(event.tag, "content", body)


def _as_raw(events: Iterable[Event]) -> Iterator[Event]:
    """Undo the engine's reasoning/answer split: every piece is content, with the think tags put back."""
    kind = "content"
    text: list[str] = []
    for event in events:
        if event.kind == "done":
            assert event.result is not None
            result = dataclasses.replace(event.result, content="".join(text).strip(), reasoning="",
                                         reasoning_tokens=0)
            yield dataclasses.replace(event, result=result)
            continue
        # The splitter switches kind exactly where it removed a tag: the tag goes back there.
        piece = ((OPEN_THINK if event.kind == "reasoning" else CLOSE_THINK) if event.kind != kind else "") + event.text
        kind = event.kind
        text.append(piece)
        yield Event(event.tag, "content", piece)


# -- reporting ---------------------------------------------------------------------------------------


def cut_off_while_reasoning(result: Result) -> bool:
    """True when the token limit ended generation before the model wrote any answer."""
    return result.finish_reason == "length" and not result.content.strip()


def no_answer_message(result: Result) -> str:
    return (f"stopped after {result.completion_tokens} tokens while reasoning, before any answer: raise "
            "--max-tokens or set --budget")


def usage_json(result: Result) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "reasoning_tokens": result.reasoning_tokens, "cached_tokens": result.cached_tokens}


def result_json(result: Result, model: str) -> dict[str, Any]:
    """`run --json`'s object: the answer, the reasoning, token counts, speeds, why it stopped, the model file."""
    return {
        "content": result.content,
        "reasoning": result.reasoning,
        "usage": usage_json(result),
        "timings": {"prompt_tokens_per_second": round(result.prompt_tokens_per_second, 2),
                    "generation_tokens_per_second": round(result.generation_tokens_per_second, 2),
                    "prompt_seconds": round(result.prompt_seconds, 4),
                    "generation_seconds": round(result.generation_seconds, 4)},
        "finish_reason": result.finish_reason,
        "model": model,
    }
