"""A scripted token source standing in for a model's choices, where a test must fix them.

It plugs into the engine through the same `Sampler` interface as llama.cpp's sampler chain; the
model still evaluates every token (real decode, real detokenization), only the choice is scripted.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class ScriptedSampler:
    def __init__(self, tokens: Iterable[int], then: int | None = None):
        self._tokens = list(tokens)
        self._then = then  # token repeated once the script runs out (None: raise)
        self.accepted: list[int] = []

    def sample(self, ctx: Any, output_index: int) -> int:
        if self._tokens:
            return self._tokens.pop(0)
        if self._then is None:
            raise AssertionError("the scripted token source ran out")
        return self._then

    def accept(self, token: int) -> None:
        self.accepted.append(token)

    def close(self) -> None:
        pass
