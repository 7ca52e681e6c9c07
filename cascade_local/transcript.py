"""A conversation saved as JSON, and read back: its messages, system prompt and turn settings.

The file is a user's own data, but it may have been edited by hand or come from elsewhere, so reading it checks
every field and says which one is wrong. Writing goes to a temporary file in the same folder that is then renamed,
so an interrupted save never leaves half a file under the name the user chose.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cascade_local.errors import CascadeError, UsageError

if TYPE_CHECKING:
    from cascade_local.conversation import Conversation, TurnSettings

FORMAT = "cascade-local/conversation"
VERSION = 1
# Every message the chat's history can hold: a system turn, the user's, the model's (with its reasoning and
# tool calls) and a tool's answer. `name` and `tool_call_id` are what OpenAI-style tool messages may carry.
ROLES = ("system", "user", "assistant", "tool")
TEXT_KEYS = ("reasoning_content", "name", "tool_call_id")
MESSAGE_KEYS = ("role", "content", *TEXT_KEYS, "tool_calls")


class TranscriptError(CascadeError):
    """A conversation file cannot be written (it exists, the folder is missing) or read (not ours, damaged)."""

    exit_code = 1


@dataclass
class Transcript:
    """What a conversation file holds. `settings` keeps only the keys it knows (see `settings_from_dict`)."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    system: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)


# -- settings ---------------------------------------------------------------------------------------------------------

def settings_to_dict(settings: TurnSettings) -> dict[str, Any]:
    return {"thinking": settings.thinking, "thinking_budget": settings.thinking_budget,
            "max_tokens": settings.max_tokens, "sampling": dataclasses.asdict(settings.sampling)}


def apply_settings(settings: TurnSettings, saved: dict[str, Any]) -> None:
    """Sets what the file recorded on `settings`; what it does not record keeps its current value."""
    from cascade_local.sampling import SamplingParams

    for key in ("thinking", "thinking_budget", "max_tokens"):
        if key in saved:
            setattr(settings, key, saved[key])
    if "sampling" in saved:
        settings.sampling = SamplingParams(**saved["sampling"])


def _check_settings(raw: Any, where: str) -> dict[str, Any]:
    """The known settings, type-checked; unknown keys are ignored (a newer file may add some)."""
    from cascade_local.sampling import SamplingParams

    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise TranscriptError(f"{where}: 'settings' must be an object")
    out: dict[str, Any] = {}
    if "thinking" in raw:
        if not isinstance(raw["thinking"], bool):
            raise TranscriptError(f"{where}: settings.thinking must be true or false")
        out["thinking"] = raw["thinking"]
    for key, nullable in (("thinking_budget", True), ("max_tokens", False)):
        if key in raw:
            value = raw[key]
            if (value is None and not nullable) or (value is not None and not _positive_int(value)):
                raise TranscriptError(f"{where}: settings.{key} must be a positive integer"
                                      + (" or null" if nullable else ""))
            out[key] = value
    if "sampling" in raw:
        sampling = raw["sampling"]
        if not isinstance(sampling, dict):
            raise TranscriptError(f"{where}: settings.sampling must be an object")
        known = {f.name for f in dataclasses.fields(SamplingParams)}
        kept = {k: v for k, v in sampling.items() if k in known}
        try:
            SamplingParams(**kept)  # validates ranges; its message names the bad value
        except (UsageError, TypeError) as exc:
            raise TranscriptError(f"{where}: settings.sampling: {exc}") from None
        out["sampling"] = kept
    return out


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# -- the file ---------------------------------------------------------------------------------------------------------

def to_dict(messages: list[dict[str, Any]], system: str | None, settings: TurnSettings,
            model: str | None = None) -> dict[str, Any]:
    """The JSON object a conversation is saved as (`model` is the file's name, for the reader's information)."""
    return {"format": FORMAT, "version": VERSION, "model": model, "system": system,
            "settings": settings_to_dict(settings),
            "messages": [{k: m[k] for k in MESSAGE_KEYS if k in m} for m in messages]}


def from_dict(data: Any, where: str = "conversation") -> Transcript:
    """Checks a decoded file; raises TranscriptError naming the first field that is wrong."""
    if not isinstance(data, dict):
        raise TranscriptError(f"{where} is not a saved conversation (expected a JSON object)")
    if data.get("format", FORMAT) != FORMAT:
        raise TranscriptError(f"{where} is not a saved conversation (format {data.get('format')!r})")
    version = data.get("version", VERSION)
    if not isinstance(version, int) or version > VERSION:
        raise TranscriptError(f"{where} was written by a newer cascade-local (version {version!r}); upgrade to read it")
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise TranscriptError(f"{where}: 'system' must be a string or null")
    raw_messages = data.get("messages")
    if not isinstance(raw_messages, list):
        raise TranscriptError(f"{where} has no 'messages' list")
    messages = [_check_message(m, f"{where}: message {i + 1}") for i, m in enumerate(raw_messages)]
    return Transcript(messages, system or None, _check_settings(data.get("settings"), where))


def _check_message(m: Any, where: str) -> dict[str, Any]:
    if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
        raise TranscriptError(f"{where} needs a role ({', '.join(ROLES)}) and a string content")
    for key in TEXT_KEYS:
        if not isinstance(m.get(key, ""), str):
            raise TranscriptError(f"{where}: {key} must be a string")
    if "tool_calls" in m:
        if m["role"] != "assistant":
            raise TranscriptError(f"{where}: only an assistant message has tool_calls")
        calls = m["tool_calls"]
        if not isinstance(calls, list) or not all(_is_tool_call(c) for c in calls):
            raise TranscriptError(f"{where}: tool_calls must be a list of "
                                  '{"type": "function", "function": {"name": NAME, "arguments": {...}}}')
    return {k: m[k] for k in MESSAGE_KEYS if k in m}


def _is_tool_call(call: Any) -> bool:
    """The shape the chat template renders: a function's name and its arguments as an object."""
    function = call.get("function") if isinstance(call, dict) else None
    return (isinstance(function, dict) and isinstance(function.get("name"), str)
            and isinstance(function.get("arguments", {}), dict) and isinstance(call.get("type", "function"), str))


def write_json(path: Path, data: Any, *, force: bool = False) -> Path:
    """Writes `data` to `path` through a temporary file in the same folder and a rename.

    Refuses an existing `path` unless `force`. Without `force` the rename is a hard link, which fails if the
    name appeared in the meantime, so two saves cannot clobber each other either.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise TranscriptError(f"{path} is a folder; give a file name, such as {path / 'chat.json'}")
    if path.exists() and not force:
        raise TranscriptError(f"{path} exists; add --force to overwrite it")
    if not path.parent.is_dir():
        raise TranscriptError(f"cannot save to {path}: the folder {path.parent} does not exist")
    text = json.dumps(data, ensure_ascii=False, indent=2) + "\n"
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise TranscriptError(f"cannot save to {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if force:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except OSError as exc:
        raise TranscriptError(f"cannot save to {path}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _link_new(tmp: str, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise TranscriptError(f"{path} exists; add --force to overwrite it") from None
    except OSError:
        # Some file systems (FAT, some network mounts) have no hard links: the exists-check above has to do.
        os.replace(tmp, path)


def read(path: Path) -> Transcript:
    """Reads and checks a conversation file."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TranscriptError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise TranscriptError(f"{path} is a folder, not a saved conversation") from None
    except UnicodeDecodeError:
        raise TranscriptError(f"{path} is not a saved conversation (not UTF-8 text)") from None
    except OSError as exc:
        raise TranscriptError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TranscriptError(f"{path} is not a saved conversation: invalid JSON at line {exc.lineno}, "
                              f"column {exc.colno} ({exc.msg})") from None
    return from_dict(data, str(path))


# -- on a Conversation ------------------------------------------------------------------------------------------------

def save(conversation: Conversation, settings: TurnSettings, path: Path, *, force: bool = False) -> Path:
    """Saves a conversation's messages and system prompt, and the settings of its next turn."""
    model = getattr(getattr(conversation, "model", None), "path", None)
    data = to_dict(conversation.messages, conversation.system, settings, model=Path(model).name if model else None)
    return write_json(path, data, force=force)


def load(conversation: Conversation, settings: TurnSettings, path: Path, *, with_settings: bool = False
         ) -> Transcript:
    """Replaces the conversation's messages with a saved one's; with `with_settings`, its system prompt and the
    settings the file records too (otherwise those the user chose for this chat stay).

    Everything is checked before anything changes: a bad file leaves the conversation as it was.
    """
    transcript = read(path)
    conversation.clear()  # also drops the evaluated-prompt cache, which belonged to the old history
    conversation.messages.extend(transcript.messages)
    if with_settings:
        conversation.system = transcript.system
        apply_settings(settings, transcript.settings)
    return transcript
