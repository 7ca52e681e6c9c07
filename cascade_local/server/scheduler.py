"""One thread owns the engine: it admits requests as they arrive and hands each its events.

HTTP handlers run on an event loop and must never block on decoding, and llama.cpp's context is not
thread-safe. So a single scheduler thread runs `Engine.stream_live`, taking queued tickets whenever
a sequence is free; every event goes back through the ticket's `deliver` callback (the HTTP layer
turns that into a thread-safe hand-off to its loop). A cancelled ticket (client gone, stop string
matched) frees its sequence at the next step.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import count

from cascade_local.engine import Engine, Event, PromptCache, Request
from cascade_local.errors import CascadeError
from cascade_local.prompt_store import DEFAULT_MIN_TOKENS, PromptStore
from cascade_local.server.prefix_cache import PrefixStore

_ids = count(1)


class QueueFull(CascadeError):
    """Every sequence is busy and the waiting queue is at its limit."""


@dataclass(eq=False)
class Ticket:
    """One request's passage through the scheduler. `deliver` gets each Event, or an exception if decoding failed."""

    request: Request
    deliver: Callable[[Event | BaseException], None]
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    cache: PromptCache | None = None


@dataclass
class Metrics:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    prefix_hits: int = 0
    prefix_misses: int = 0
    cancelled: int = 0
    errors: int = 0
    # (finish time, tokens generated, generation seconds) of recent requests, for the tokens/s gauge
    recent: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=1024))

    def tokens_per_second(self, window: float = 30.0) -> float:
        """Generated tokens per second over the last `window` seconds."""
        now = time.monotonic()
        return sum(n for t, n in self.recent if now - t <= window) / window


class Scheduler:
    def __init__(self, engine: Engine, *, queue_limit: int = 64, cache_bytes: int = 2 << 30,
                 disk: PromptStore | None = None, disk_min_tokens: int = DEFAULT_MIN_TOKENS):
        self.engine = engine
        self.queue_limit = queue_limit
        self.prefixes = PrefixStore(cache_bytes)
        # Prompts of disk_min_tokens or more also leave their prefix's state on disk, for the next server too.
        self.disk, self.disk_min_tokens = disk, disk_min_tokens
        self._from_disk: dict[int, int] = {}  # ticket id -> prefix tokens restored (nothing new to save below)
        self.metrics = Metrics()
        self._queue: deque[Ticket] = deque()
        self._running: dict[int, Ticket] = {}
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="cascade-scheduler", daemon=True)
        # Writing a long prompt's state (hundreds of MB for a long document) must not stall the sequences being
        # decoded: one writer thread takes the saves, in order; `stop` waits for them.
        self._writer: ThreadPoolExecutor | None = ThreadPoolExecutor(1, "cascade-state-writer") if disk else None

    # -- called from any thread ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, ticket: Ticket) -> None:
        with self._cv:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            # Free sequences take requests at once; beyond them, queue_limit may wait.
            free = max(0, self.engine.n_seq_max - len(self._running))
            if len(self._queue) >= self.queue_limit + free:
                raise QueueFull(f"{len(self._queue)} requests are already waiting")
            self._queue.append(ticket)
            self._cv.notify()

    def cancel(self, ticket: Ticket) -> None:
        with self._cv:
            ticket.cancelled = True
            if ticket in self._queue:  # never started: nothing to free
                self._queue.remove(ticket)
                self.metrics.cancelled += 1
            self._cv.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        return len(self._running)

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued and running, then end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._writer is not None:
            self._writer.shutdown(wait=True)

    # -- the scheduler thread -----------------------------------------------------------------------

    def _take(self, idle: bool) -> Request | None:
        with self._cv:
            while idle and not self._queue and not self._stopping:
                self._cv.wait()
            if not self._queue:
                return None
            ticket = self._queue.popleft()
            # Counted as running in the same critical section that takes it off the queue: otherwise a submit
            # in between sees neither and admits a request beyond the free sequences.
            self._running[ticket.id] = ticket
        # The prefix store is only touched here and in _dispatch, both on this thread.
        tokens = ticket.request.prompt_tokens
        if self.prefixes.budget_bytes > 0:  # with no budget, skip the snapshot copies too
            ticket.cache = self.prefixes.lookup(tokens)
        if self.disk is not None and len(tokens) >= self.disk_min_tokens:
            known = len(ticket.cache.tokens) if ticket.cache is not None else 0
            hit = self.disk.lookup(tokens, longer_than=known)  # a state memory holds is not read from disk
            if hit is not None and len(hit[0]) > known:
                ticket.cache = PromptCache(*hit)
            ticket.cache = ticket.cache or PromptCache()
            self._from_disk[ticket.id] = max(known, len(hit[0]) if hit else 0)
        return Request(ticket.request.prompt_tokens, ticket.request.sampling, ticket.request.max_tokens,
                       ticket.request.in_reasoning, ticket.request.thinking_budget, tag=ticket.id,
                       cache=ticket.cache, cache_prefix=ticket.request.cache_prefix)

    def _cancelled(self, tag: object) -> bool:
        ticket = self._running.get(tag)  # type: ignore[call-overload]
        return ticket is not None and ticket.cancelled

    def _dispatch(self, event: Event) -> None:
        ticket = self._running.get(event.tag)
        if ticket is None:
            return
        if event.kind == "done":
            with self._cv:
                del self._running[event.tag]
            result = event.result
            assert result is not None
            m = self.metrics
            m.requests += 1
            m.prompt_tokens += result.prompt_tokens
            m.cached_tokens += result.cached_tokens
            m.completion_tokens += result.completion_tokens
            m.recent.append((time.monotonic(), result.completion_tokens))
            if result.cached_tokens:
                m.prefix_hits += 1
            else:
                m.prefix_misses += 1
            if result.finish_reason == "cancelled":
                m.cancelled += 1
            restored = self._from_disk.pop(event.tag, None)
            if ticket.cache is not None:
                if self.prefixes.budget_bytes > 0:
                    self.prefixes.put(ticket.cache)
                if restored is not None and self._writer is not None and len(ticket.cache.tokens) > restored:
                    self._writer.submit(self._save, ticket.cache.tokens, ticket.cache.state)
        ticket.deliver(event)

    def _save(self, tokens: list[int], state: bytes) -> None:
        """On the writer thread. A full disk or unwritable folder costs only the file, never the server."""
        assert self.disk is not None
        try:
            self.disk.save(tokens, state)
        except OSError as exc:
            print(f"cascade-local serve: cannot keep a prompt state on disk: {exc.strerror or exc}", file=sys.stderr)

    def _run(self) -> None:
        while True:
            try:
                for event in self.engine.stream_live(self._take, self._cancelled):
                    self._dispatch(event)
                return  # stopping, and nothing left
            except Exception as exc:  # a failed decode ends every running request, not the server
                self.metrics.errors += 1
                with self._cv:
                    failed = list(self._running.values())
                    self._running.clear()
                for ticket in failed:
                    ticket.deliver(exc)
