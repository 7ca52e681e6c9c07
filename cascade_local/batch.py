"""Many prompts from a file; one JSONL record per item, appended as each completes; resumable after a crash.

INPUT is JSONL or plain text. It is JSONL when its name ends in `.jsonl` or its first non-empty line
parses as a JSON object; each line is then an object:

    {"id": "q1", "prompt": "...", "think": false, "budget": 256, "max_tokens": 512,
     "temperature": 0.6, "top_p": 0.95, "seed": 1, "system": "..."}

with `messages` (a chat: [{"role": "user", "content": "..."}, ...]) instead of `prompt`. Only the
prompt or messages is required; `id` defaults to the line number; unknown keys are ignored (they can
carry your own metadata). In plain text, each non-empty line is a prompt and its id is its line number
(counting from 1, blank lines included, so ids stay put when blank lines are skipped).

OUTPUT gets one line per item, in the order items complete:

    {"id": ..., "line": N, "content": ..., "reasoning": ..., "usage": {...}, "finish_reason": ..., "error": null}

A line that cannot be an item (invalid JSON, neither prompt nor messages, a bad option, an id seen
before) is recorded with its `error` (the id is null when none could be read) and the job goes on, as
it does for an item that fails when it is prepared (a chat template error, a prompt longer than the
context). Each record is written with one `write` and flushed to disk with fsync, so a crash loses at
most the items being decoded, and leaves at most one half-written last line.

An item whose `max_tokens` ran out while it was still reasoning has a record with an empty `content` and
`finish_reason` "length": it is counted as cut off, not answered.

Resuming (the default when OUTPUT exists): ids with an answer are skipped; ids whose records are all
errors or cut off are tried again (with a higher `max_tokens`, say), and a new record is appended (an
id's last record is its current state). A bad input line whose error is already recorded for the same
line is not recorded again (it still counts as failed). A half-written last line is cut off before
anything is appended.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cascade_local.chat_template import Message
from cascade_local.engine import Engine, Event, PromptCache, Request, Result
from cascade_local.errors import CascadeError, UsageError
from cascade_local.oneshot import (
    build_messages,
    cut_off_while_reasoning,
    decode_text,
    render_prompt,
    sampling_for,
    usage_json,
)
from cascade_local.prompt_store import DEFAULT_MIN_TOKENS, PromptStore
from cascade_local.remote import ChatRequest, RemoteEngine

Id = str | int


@dataclass(frozen=True)
class ItemSettings:
    """How to answer an item: the batch's options, which an item's own fields override."""

    thinking: bool = True
    budget: int | None = None
    max_tokens: int = 4096
    temperature: float | None = None  # None: the mode's default from models.toml
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None
    system: str | None = None  # for items without a system message of their own
    ignore_eos: bool = False


# The keys an input line may set: JSON name -> (ItemSettings field, accepted JSON types, may be null).
ITEM_OPTIONS: dict[str, tuple[str, tuple[type, ...], bool]] = {
    "think": ("thinking", (bool,), False),
    "budget": ("budget", (int,), True),
    "max_tokens": ("max_tokens", (int,), False),
    "temperature": ("temperature", (int, float), True),
    "top_p": ("top_p", (int, float), True),
    "seed": ("seed", (int,), True),
    "system": ("system", (str,), True),
}


RANGES = {"budget": "at least 1", "max_tokens": "at least 1", "temperature": "at least 0",
          "top_p": "above 0, at most 1", "seed": "any integer"}


def _in_range(key: str, value: float) -> bool:
    if key in ("budget", "max_tokens"):
        return value >= 1
    if key == "temperature":
        return value >= 0
    if key == "top_p":
        return 0 < value <= 1
    return True


@dataclass(frozen=True)
class BatchItem:
    """One input line: a chat to answer with its own options, or the error that makes it unusable."""

    id: Id | None
    line: int
    messages: list[Message] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)  # ItemSettings fields set by the line itself
    error: str | None = None


def id_key(value: Any) -> str:
    """Ids compare by their JSON text, so 1 and "1" are different ids, as they are in the files."""
    return json.dumps(value, ensure_ascii=False)


# -- reading INPUT -----------------------------------------------------------------------------------


def read_items(path: Path) -> list[BatchItem]:
    """Every non-empty line of INPUT as a BatchItem (with `error` set where the line is unusable)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    # Split on "\n" only: str.splitlines would also split inside JSON strings at U+2028 and friends.
    lines = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    jsonl = Path(path).suffix.lower() == ".jsonl" or _first_line_is_object(lines)
    items: list[BatchItem] = []
    first_seen: dict[str, int] = {}
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        item = _json_item(raw, number) if jsonl else _text_item(raw, number)
        if item.id is not None:  # an id read from the line (or its number): unusable lines count too
            key = id_key(item.id)
            if key not in first_seen:
                first_seen[key] = number
            elif item.error is None:
                item = dataclasses.replace(item, error=f"line {number}: duplicate id {item.id!r} "
                                                       f"(first on line {first_seen[key]})")
        items.append(item)
    return items


def _first_line_is_object(lines: list[bytes]) -> bool:
    for raw in lines:
        if raw.strip():
            try:
                return isinstance(json.loads(raw), dict)
            except ValueError:
                return False
    return False


def _text_item(raw: bytes, number: int) -> BatchItem:
    try:
        text = decode_text(raw.rstrip(b"\r"), f"line {number}")
    except UsageError as exc:
        return BatchItem(number, number, error=str(exc))
    return BatchItem(number, number, build_messages(text.strip()))


def _json_item(raw: bytes, number: int) -> BatchItem:
    try:
        obj = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
        return BatchItem(None, number, error=f"line {number} is not valid JSON: {exc}")
    if not isinstance(obj, dict):
        return BatchItem(None, number, error=f"line {number} is not a JSON object")
    item_id = obj.get("id", number)
    if isinstance(item_id, bool) or not isinstance(item_id, str | int):
        return BatchItem(None, number, error=f"line {number}: id must be a string or an integer")
    try:
        return BatchItem(item_id, number, _messages(obj), _options(obj))
    except UsageError as exc:
        return BatchItem(item_id, number, error=f"line {number}: {exc}")


def _messages(obj: dict[str, Any]) -> list[Message]:
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if prompt is None and messages is None:
        raise UsageError("no \"prompt\" (a string) or \"messages\" (a list of {\"role\", \"content\"})")
    if prompt is not None and messages is not None:
        raise UsageError("give \"prompt\" or \"messages\", not both")
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError("\"prompt\" must be a non-empty string")
        return build_messages(prompt)
    if not isinstance(messages, list) or not messages:
        raise UsageError("\"messages\" must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise UsageError("each message must be an object with a string \"role\"")
    if obj.get("system") is not None and messages[0]["role"] == "system":
        raise UsageError("\"system\" given twice: as an option and as the first message")
    return messages


def _options(obj: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, (name, types, nullable) in ITEM_OPTIONS.items():
        if key not in obj:
            continue
        value = obj[key]
        # bool is an int in Python, never in JSON: `"seed": true` is a mistake.
        ok = (value is None and nullable) or (isinstance(value, types) and (bool in types or
                                                                            not isinstance(value, bool)))
        if not ok:
            kind = {bool: "a boolean", str: "a string", float: "a number"}.get(types[-1], "an integer")
            raise UsageError(f"\"{key}\" must be {kind}" + (" or null" if nullable else ""))
        if value is not None and not isinstance(value, bool | str) and not _in_range(key, value):
            raise UsageError(f"\"{key}\" is out of range ({RANGES[key]})")
        options[name] = value
    return options


# -- OUTPUT ------------------------------------------------------------------------------------------


@dataclass
class OutputState:
    """What an existing OUTPUT already holds."""

    done: set[str] = field(default_factory=set)  # id keys with an answer
    errors: set[tuple[int, str]] = field(default_factory=set)  # (line, error) of recorded bad lines
    records: int = 0
    truncated_bytes: int = 0  # a half-written last line, cut off
    unreadable_lines: int = 0  # complete lines that are not records (edited by hand?); left as they are


def scan_output(data: bytes) -> tuple[OutputState, int]:
    """The state recorded in OUTPUT's bytes, and the length of its complete lines (what to keep)."""
    keep = data.rfind(b"\n") + 1  # a crash mid-write leaves a last line without its newline
    state = OutputState(truncated_bytes=len(data) - keep)
    for raw in data[:keep].split(b"\n")[:-1]:
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        if not isinstance(record, dict) or "id" not in record:
            state.unreadable_lines += 1
            continue
        state.records += 1
        if record.get("error") is None:
            if not _record_cut_off(record):
                state.done.add(id_key(record["id"]))
        elif isinstance(record.get("line"), int):
            state.errors.add((record["line"], str(record["error"])))
    return state, keep


class OutputFile:
    """OUTPUT, opened for appending whole records, each flushed to disk before the next is written.

    An exclusive lock (where the platform has flock) keeps two jobs from interleaving records in the
    same file; the kernel releases it when the process ends, however it ends.
    """

    def __init__(self, path: Path, *, resume: bool = True, force: bool = False):
        self.path = Path(path)
        if self.path.is_dir():
            raise UsageError(f"{self.path} is a folder; give a file name for the output")
        existed = self.path.exists()
        if existed and not resume and not force:
            raise UsageError(f"{self.path} exists; use --force to overwrite it, or leave out --no-resume to resume it")
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot open {self.path} for writing: {exc.strerror or exc}") from None
        try:
            self._lock()
            self.state = OutputState()
            if force:
                os.ftruncate(self._fd, 0)
            elif existed:
                self.state, keep = scan_output(self.path.read_bytes())
                if self.state.truncated_bytes:
                    os.ftruncate(self._fd, keep)
            os.fsync(self._fd)
            if not existed:
                _fsync_dir(self.path.parent)  # the new file's name survives a crash too
        except BaseException:
            os.close(self._fd)
            raise

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; the user keeps jobs apart
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UsageError(f"another batch job is writing {self.path}; wait for it or choose another -o") from None

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record as one line; returns once it is on disk."""
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> OutputFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems and platforms cannot sync a directory
    finally:
        os.close(fd)


def result_record(item: BatchItem, result: Result) -> dict[str, Any]:
    return {"id": item.id, "line": item.line, "content": result.content, "reasoning": result.reasoning,
            "usage": usage_json(result), "finish_reason": result.finish_reason, "error": None}


def _record_cut_off(record: Mapping[str, Any]) -> bool:
    """A record without an error whose max_tokens ran out before any answer (see cut_off_while_reasoning)."""
    return record.get("finish_reason") == "length" and not str(record.get("content") or "").strip()


def error_record(item: BatchItem, error: str) -> dict[str, Any]:
    return {"id": item.id, "line": item.line, "content": None, "reasoning": None, "usage": None,
            "finish_reason": None, "error": error}


# -- the job -----------------------------------------------------------------------------------------


@dataclass
class BatchJob:
    """INPUT read and OUTPUT opened: what is left to do. Open with `open_batch`."""

    items: list[BatchItem]
    output: OutputFile

    @property
    def todo(self) -> list[BatchItem]:
        """Usable items without an answer yet."""
        done = self.output.state.done
        return [i for i in self.items if i.error is None and id_key(i.id) not in done]

    @property
    def new_errors(self) -> list[BatchItem]:
        """Unusable lines whose error is not recorded yet."""
        seen = self.output.state.errors
        return [i for i in self.items if i.error is not None and (i.line, i.error) not in seen]

    @property
    def known_errors(self) -> int:
        """Unusable lines whose error an earlier run recorded: still failed, not recorded again."""
        seen = self.output.state.errors
        return sum(1 for i in self.items if i.error is not None and (i.line, i.error) in seen)

    @property
    def already_done(self) -> int:
        done = self.output.state.done
        return sum(1 for i in self.items if i.error is None and id_key(i.id) in done)


@contextlib.contextmanager
def open_batch(input_path: Path, output_path: Path, *, resume: bool = True, force: bool = False
               ) -> Iterator[BatchJob]:
    """Reads INPUT and opens OUTPUT (resumed, overwritten with `force`, or refused if it exists and not `resume`).

    Nothing needs a model yet: callers can skip loading one when `job.todo` is empty.
    """
    if Path(output_path).resolve() == Path(input_path).resolve():
        raise UsageError("the output file is the input file; choose another -o")
    items = read_items(input_path)
    with OutputFile(output_path, resume=resume, force=force) as output:
        yield BatchJob(items, output)


class BatchObserver(Protocol):
    """Told how many records this run will write, then about each one as it is written."""

    def start(self, total: int) -> None: ...
    def record(self, record: dict[str, Any], completion_tokens: int) -> None: ...


@dataclass
class BatchSummary:
    items: int = 0  # lines of INPUT (usable or not): always answered + cut_off + failed + already_done
    already_done: int = 0  # answered by an earlier run, skipped
    answered: int = 0
    cut_off: int = 0  # max_tokens ran out while reasoning: no answer
    failed: int = 0  # records written with an error in this run, and bad lines an earlier run recorded
    completion_tokens: int = 0
    seconds: float = 0.0
    truncated_bytes: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds else 0.0

    @property
    def unanswered(self) -> int:
        """Items left without an answer (failed or cut off): the command exits non-zero when there are any."""
        return self.failed + self.cut_off

    @property
    def items_per_second(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        """One line for a person (and for bench/batch_bench.py, which reads `in S s`)."""
        cut = f"; cut off a half-written last line ({self.truncated_bytes} bytes)" if self.truncated_bytes else ""
        cut_off = f"{self.cut_off} cut off while reasoning (raise --max-tokens), " if self.cut_off else ""
        return (f"{self.items} items: {self.answered} answered, {cut_off}{self.failed} failed, {self.already_done} "
                f"already done; {self.completion_tokens} tokens in {self.seconds:.2f} s ({self.tokens_per_second:.1f} "
                f"tokens/s, {self.items_per_second:.2f} items/s){cut}")


@dataclass
class RemoteBackend:
    """A server instead of the local engine: items go out as chat requests, `parallel` in flight at once.

    The server renders and tokenizes; a connection that fails after the retries (server killed, gone)
    ends the job like a local decode error: what was written stays, and a resume continues from there.
    """

    engine: RemoteEngine
    parallel: int = 4

    @property
    def n_seq_max(self) -> int:
        return self.parallel

    def stream_many(self, requests: list[ChatRequest]) -> Iterator[Event]:
        return self.engine.stream_many(requests, parallel=self.parallel)


def run_batch(job: BatchJob, engine: Engine | RemoteBackend | None, settings: ItemSettings = ItemSettings(), *,
              observer: BatchObserver | None = None, chunk: int | None = None, disk: PromptStore | None = None,
              min_tokens: int = DEFAULT_MIN_TOKENS) -> BatchSummary:
    """Records the new errors, then answers `job.todo` through `engine.stream_many`, `n_seq_max` at a time.

    `engine` may be None when `job.todo` is empty. Items are handed to the engine in chunks (default
    16 per sequence), so that a long INPUT is not all tokenized before the first answer. An error of
    the engine itself (llama_decode failing) ends the job: what was written stays, and a resume
    continues from there. With `disk` (a local engine), a prefix of at least `min_tokens` tokens that every
    item of a chunk shares (a system prompt, a document) is evaluated once, or restored from disk, and each
    item evaluates only its own part (`share_prefix`).
    """
    todo, new_errors = job.todo, job.new_errors
    summary = BatchSummary(len(job.items), job.already_done, failed=job.known_errors,
                           truncated_bytes=job.output.state.truncated_bytes)
    if observer is not None:
        observer.start(len(todo) + len(new_errors))
    started = time.perf_counter()

    def write(record: dict[str, Any], result: Result | None = None) -> None:
        job.output.write(record)
        tokens = result.completion_tokens if result is not None else 0
        cut_off = result is not None and cut_off_while_reasoning(result)
        summary.answered += record["error"] is None and not cut_off
        summary.cut_off += cut_off
        summary.failed += record["error"] is not None
        summary.completion_tokens += tokens
        summary.seconds = time.perf_counter() - started
        if observer is not None:
            observer.record(record, tokens)

    for item in new_errors:
        write(error_record(item, item.error or ""))
    if todo:
        if engine is None:
            raise ValueError("run_batch needs an engine when there are items to answer")
        defaults = {mode: _mode_defaults(mode) for mode in (True, False)}
        size = chunk or 16 * engine.n_seq_max
        for first in range(0, len(todo), size):
            requests: list[Any] = []
            for index in range(first, min(first + size, len(todo))):
                try:
                    if isinstance(engine, RemoteBackend):
                        requests.append(prepare_chat_request(engine, todo[index], settings, defaults, tag=index))
                    else:
                        requests.append(prepare_request(engine, todo[index], settings, defaults, tag=index))
                except CascadeError as exc:
                    write(error_record(todo[index], str(exc)))
            if disk is not None and isinstance(engine, Engine):
                requests = share_prefix(engine, requests, disk, min_tokens)
            for event in engine.stream_many(requests):
                if event.kind == "done":
                    assert event.result is not None
                    write(result_record(todo[event.tag], event.result), event.result)
    summary.seconds = time.perf_counter() - started
    return summary


def share_prefix(engine: Engine, requests: list[Request], disk: PromptStore, min_tokens: int) -> list[Request]:
    """The requests, each starting from the state of the prefix they all share, when it has `min_tokens` or more.

    That state comes from the disk store (a longest stored prefix counts: the rest is evaluated once) and is
    written back to it, so a later batch over the same document restores it too.
    """
    if not requests:
        return requests
    first = requests[0].prompt_tokens
    shared = min(len(r.prompt_tokens) for r in requests) - 1  # each keeps a token of its own, to sample from
    for r in requests[1:]:
        shared = next((i for i in range(shared) if r.prompt_tokens[i] != first[i]), shared)
    if shared < min_tokens:
        return requests
    prefix = first[:shared]
    hit = disk.lookup([*prefix, first[shared]])
    if hit is not None and len(hit[0]) == shared:
        state = hit[1]
    else:
        cache = PromptCache(*hit) if hit else PromptCache()
        engine.generate(Request(first[: shared + 1], max_tokens=1, cache=cache, cache_prefix=shared))
        state = cache.state
        disk.save(prefix, state)
    return [dataclasses.replace(r, cache=PromptCache(list(prefix), state), cache_prefix=shared) for r in requests]


def _mode_defaults(thinking: bool) -> dict[str, Any]:
    from cascade_local.registry import load_registry

    return load_registry().get(None).sampling_defaults(thinking)


def _item_settings(item: BatchItem, settings: ItemSettings,
                   defaults: Mapping[bool, Mapping[str, Any]] | None) -> tuple[ItemSettings, list[Message], Any]:
    s = dataclasses.replace(settings, **item.options)
    messages = item.messages
    if s.system and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": s.system}, *messages]
    if s.max_tokens < 1 or (s.budget is not None and s.budget < 1):
        raise UsageError("max_tokens and budget must be at least 1")
    sampling = sampling_for(s.thinking, defaults=None if defaults is None else defaults[s.thinking],
                            temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p,
                            repeat_penalty=s.repeat_penalty, seed=s.seed, ignore_eos=s.ignore_eos or None)
    return s, messages, sampling


def prepare_chat_request(backend: RemoteBackend, item: BatchItem, settings: ItemSettings,
                         defaults: Mapping[bool, Mapping[str, Any]] | None = None, tag: Any = None) -> ChatRequest:
    """The item as a chat request for a server (which applies its own template)."""
    s, messages, sampling = _item_settings(item, settings, defaults)
    if s.budget is not None:
        raise UsageError("a thinking budget needs the local engine")
    return ChatRequest(messages, s.thinking, sampling, s.max_tokens, tag=tag)


def prepare_request(engine: Engine, item: BatchItem, settings: ItemSettings,
                    defaults: Mapping[bool, Mapping[str, Any]] | None = None, tag: Any = None) -> Request:
    """The item's chat rendered and tokenized with its settings; a CascadeError says why it cannot run."""
    s, messages, sampling = _item_settings(item, settings, defaults)
    tokens = engine.model.encode_prompt(render_prompt(engine.model.template, messages, thinking=s.thinking))
    per_sequence = engine.n_ctx // engine.n_seq_max
    if not tokens:
        raise UsageError("the prompt is empty")
    if len(tokens) + 1 > per_sequence:
        raise UsageError(f"the prompt is {len(tokens)} tokens; the context holds {per_sequence} per sequence "
                         "(raise --ctx)")
    return Request(tokens, sampling, s.max_tokens, in_reasoning=s.thinking,
                   thinking_budget=s.budget if s.thinking else None, tag=tag)
