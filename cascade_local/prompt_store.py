"""Prompt states on disk: read a long document once, ask many questions about it, each in a fresh process.

A file holds the llama.cpp sequence state (Mamba state and KV cells) right after a prompt prefix was
evaluated, with the prefix's tokens. It is found by the model file's identity and the exact tokens:

    NAME = {identity[:16]}-{n_tokens}-{sha256(identity, tokens)[:32]}.state

so a lookup lists the folder, keeps the names of this model with fewer tokens than the prompt, and hashes
the prompt's first n tokens for each n: the longest match wins, no file is opened until then.

Layout: MAGIC, an 8-byte little-endian header length, a JSON header (identity, n_tokens, state_bytes,
sha256 of the tokens and state), the tokens as int32 little-endian, the state. A file that is truncated,
corrupted (checksum), of another model or another format is removed and reported as a miss: its bytes
never reach llama.cpp. Writes go to a unique temporary name and are renamed when complete, so readers see
whole files or none; two writers of the same prefix write the same bytes. The folder is bounded by a byte
budget: after each write the least recently used files (by mtime, refreshed on every hit) are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import sys
import tempfile
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"CLPSTATE1\n"
SUFFIX = ".state"
DEFAULT_CACHE_SIZE = 4 << 30
DEFAULT_MIN_TOKENS = 2048
_HEADER_MAX = 1 << 16


FOLDER_ENV = "CASCADE_LOCAL_PROMPT_CACHE"


def default_folder() -> Path:
    """$CASCADE_LOCAL_PROMPT_CACHE if set, else `prompts` in the user's cache folder ($XDG_CACHE_HOME/cascade-local)."""
    from cascade_local.cpu_extra import cache_dir

    return Path(os.environ.get(FOLDER_ENV) or cache_dir() / "prompts")


def model_identity(path: Path, kv_type: str = "f16") -> str:
    """The model file's size, mtime and a hash of its first MiB (the GGUF header and metadata), hashed.

    The KV cache type is part of it: llama.cpp refuses a state saved with another type, so each type keeps its own.
    """
    st = Path(path).stat()
    with open(path, "rb") as fh:
        head = hashlib.sha256(fh.read(1 << 20)).hexdigest()
    return hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}:{head}:{kv_type}".encode()).hexdigest()


def _tokens_bytes(tokens: Sequence[int]) -> bytes:
    data = array("i", tokens)
    if data.itemsize != 4:  # pragma: no cover - every platform llama.cpp runs on has a 4-byte int
        raise RuntimeError("int is not 32 bits here")
    if sys.byteorder != "little":  # pragma: no cover
        data.byteswap()
    return data.tobytes()


def _key(identity: str, tokens: Sequence[int]) -> str:
    return hashlib.sha256(identity.encode() + _tokens_bytes(tokens)).hexdigest()[:32]


@dataclass(frozen=True)
class Entry:
    path: Path
    model: str  # the first 16 hex digits of the model identity
    n_tokens: int
    nbytes: int
    used: float  # mtime: the last write or hit


def _parse_name(path: Path) -> tuple[str, int, str] | None:
    parts = path.name[: -len(SUFFIX)].split("-") if path.name.endswith(SUFFIX) else []
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), parts[2]


class PromptStore:
    """The prompt-state folder for one model file (`identity`); `budget` bytes at most for the whole folder."""

    def __init__(self, folder: Path, identity: str, *, budget: int = DEFAULT_CACHE_SIZE):
        self.folder = Path(folder)
        self.identity = identity
        self.budget = budget
        self.removed: list[str] = []  # why files were dropped as unreadable (for the caller to report)

    def _name(self, tokens: Sequence[int]) -> str:
        return f"{self.identity[:16]}-{len(tokens)}-{_key(self.identity, tokens)}{SUFFIX}"

    def lookup(self, tokens: Sequence[int], longer_than: int = 0) -> tuple[list[int], bytes] | None:
        """The longest stored prefix that `tokens` strictly extends, verified, as (prefix tokens, state).

        Files of `longer_than` tokens or fewer are not read: the caller already holds as much in memory.
        """
        lengths = sorted({n for e in entries(self.folder) if e.model == self.identity[:16]
                          and max(0, longer_than) < (n := e.n_tokens) < len(tokens)}, reverse=True)
        for n in lengths:
            path = self.folder / self._name(tokens[:n])
            if not path.exists():
                continue
            state = self._read(path, tokens[:n])
            if state is not None:
                with contextlib.suppress(OSError):
                    os.utime(path)  # recently used: evicted last
                return list(tokens[:n]), state
        return None

    def _read(self, path: Path, tokens: Sequence[int]) -> bytes | None:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError:
            return None  # removed by another process's eviction between listing and reading: a miss
        why = _check(data, self.identity, tokens)
        if isinstance(why, str):
            self.removed.append(f"{path.name}: {why}")
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return why

    def save(self, tokens: Sequence[int], state: bytes) -> Path | None:
        """Writes the state of `tokens` (atomically), then evicts down to the budget; None if it cannot fit."""
        body = _tokens_bytes(tokens) + state
        header = json.dumps({"identity": self.identity, "n_tokens": len(tokens), "state_bytes": len(state),
                             "sha256": hashlib.sha256(body).hexdigest()}).encode()
        blob = MAGIC + struct.pack("<Q", len(header)) + header + body
        if len(blob) > self.budget:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / self._name(tokens)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(blob)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        evict(self.folder, self.budget, keep=target)
        return target


def _check(data: bytes, identity: str, tokens: Sequence[int]) -> bytes | str:
    """The state held in `data` if it is whole and belongs to (identity, tokens); else why not."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 8:
        return "not a prompt-state file"
    (size,) = struct.unpack_from("<Q", data, len(MAGIC))
    start = len(MAGIC) + 8
    if size > _HEADER_MAX or start + size > len(data):
        return "truncated header"
    try:
        header = json.loads(data[start : start + size])
        n, nstate, digest, owner = (int(header["n_tokens"]), int(header["state_bytes"]), str(header["sha256"]),
                                    str(header["identity"]))
    except (ValueError, KeyError, TypeError):
        return "unreadable header"
    body = data[start + size :]
    if owner != identity:
        return "written for another model file"
    if len(body) != 4 * n + nstate:
        return f"truncated: {len(body)} of {4 * n + nstate} bytes"
    if hashlib.sha256(body).hexdigest() != digest:
        return "checksum mismatch"
    if body[: 4 * n] != _tokens_bytes(tokens):
        return "holds other tokens"
    return body[4 * n :]


def entries(folder: Path) -> list[Entry]:
    """The state files in `folder`, oldest use first (temporary files and strangers left out)."""
    out = []
    try:
        paths = list(Path(folder).iterdir())
    except OSError:
        return []
    for path in paths:
        parsed = _parse_name(path)
        if parsed is None:
            continue
        try:
            st = path.stat()
        except OSError:
            continue
        out.append(Entry(path, parsed[0], parsed[1], st.st_size, st.st_mtime))
    return sorted(out, key=lambda e: e.used)


def evict(folder: Path, budget: int, *, keep: Path | None = None) -> list[Path]:
    """Removes the least recently used files until the folder holds at most `budget` bytes; returns them."""
    found = entries(folder)
    total = sum(e.nbytes for e in found)
    removed = []
    for e in found:
        if total <= budget:
            break
        if e.path == keep:
            continue
        with contextlib.suppress(OSError):
            e.path.unlink()
            removed.append(e.path)
        total -= e.nbytes
    return removed


def clear(folder: Path) -> tuple[int, int]:
    """Removes every state file; (files, bytes) removed. Temporary files are left to the writers that own them."""
    count = size = 0
    for e in entries(folder):
        with contextlib.suppress(OSError):
            e.path.unlink()
            count, size = count + 1, size + e.nbytes
    return count, size


def question_start(tokens: list[int], other: list[int]) -> int:
    """How many leading tokens `tokens` shares with `other`, the same prompt asking something else: where the
    question begins (a token its first characters merge into is left out). At least the last token is left to
    evaluate, for the logits to sample from."""
    shared = next((i for i, (a, b) in enumerate(zip(tokens, other, strict=False)) if a != b),
                  min(len(tokens), len(other)))
    return min(shared, len(tokens) - 1)


def open_store(model: Path, kv_type: str, budget: int) -> PromptStore | None:
    """The disk cache of prompt states for this model file and KV type, or None when the budget is 0 (off)."""
    return PromptStore(default_folder(), model_identity(model, kv_type), budget=budget) if budget else None
