"""Snapshots of evaluated prompts, kept across requests and found by token prefix.

Agents resend the whole conversation on every call. Mamba state cannot be cut back to a shorter
prefix, so the engine snapshots each prompt's history (everything but the generation prompt); a later
request whose tokens extend a snapshot restores it and evaluates only the new part. Snapshots are
bounded by a byte budget and evicted least-recently-used first.
"""

from __future__ import annotations

from collections import OrderedDict

from cascade_local.engine import PromptCache


class PrefixStore:
    """Not thread-safe: only the scheduler thread touches it."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[tuple[int, ...], bytes] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, tokens: list[int]) -> PromptCache:
        """A copy of the longest snapshot whose tokens `tokens` strictly extends (empty when none)."""
        best: tuple[int, ...] | None = None
        for key in self._entries:
            if len(key) < len(tokens) and (best is None or len(key) > len(best)) and tokens[: len(key)] == list(key):
                best = key
        if best is None:
            return PromptCache()
        self._entries.move_to_end(best)
        # A copy: the engine replaces the cache's contents with the new prompt's snapshot, and other
        # conversations sharing the shorter prefix (a common system prompt) still want the old one.
        return PromptCache(list(best), self._entries[best])

    def put(self, cache: PromptCache) -> None:
        if not cache.tokens or not cache.state or len(cache.state) > self.budget_bytes:
            return
        key = tuple(cache.tokens)
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= len(old)
        self._entries[key] = cache.state
        self.nbytes += len(cache.state)
        while self.nbytes > self.budget_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.nbytes -= len(dropped)
