"""Splits a streamed completion into reasoning and answer.

The tags may arrive whole (special tokens) or in pieces (`</th` + `ink>`), or never: a prompt that
opened `<think>` means the stream starts inside the reasoning, and a stream cut short by a token
limit may never close it. Text that could still turn out to be the start of a tag is held back
until the next piece decides it.

Once the thought is closed (by the model, or by a prompt with thinking off, which ends in
`<think></think>`), there is no thought left to open: later tags are answer text, so a stray
`</think>` or `<think>` can never turn the answer into reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

OPEN, CLOSE = "<think>", "</think>"
Kind = Literal["reasoning", "content"]


@dataclass(frozen=True)
class Piece:
    kind: Kind
    text: str


class ThinkingSplitter:
    def __init__(self, in_reasoning: bool, may_open: bool = False):
        """`in_reasoning`: the prompt opened the thought. `may_open`: it did not, and the model may write the
        opening tag itself first (a server whose template leaves that to the model)."""
        self.in_reasoning = in_reasoning
        self._may_open = may_open and not in_reasoning
        self._held = ""
        self.reasoning = ""
        self.content = ""

    def feed(self, text: str) -> list[Piece]:
        buf = self._held + text
        self._held = ""
        out: list[Piece] = []
        while buf:
            if not (self.in_reasoning or self._may_open):
                self._emit(out, buf)  # the thought is over: everything else is the answer, tags and all
                break
            tag = CLOSE if self.in_reasoning else OPEN
            at = buf.find(tag)
            if at >= 0:
                self._emit(out, buf[:at])
                buf = buf[at + len(tag) :]
                self.in_reasoning, self._may_open = not self.in_reasoning, False
                continue
            keep = _partial_suffix(buf, tag)
            self._emit(out, buf[: len(buf) - keep])
            self._held = buf[len(buf) - keep :]
            break
        return out

    def flush(self) -> list[Piece]:
        """End of stream: whatever was held back is plain text after all."""
        out: list[Piece] = []
        self._emit(out, self._held)
        self._held = ""
        return out

    def _emit(self, out: list[Piece], text: str) -> None:
        if not text:
            return
        kind: Kind = "reasoning" if self.in_reasoning else "content"
        if kind == "reasoning":
            self.reasoning += text
        else:
            self.content += text
        out.append(Piece(kind, text))


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
