"""The converter's read and write stages as threads, so that reading, encoding and writing overlap.

Done one after another, the three stages' times add up (see the README's profile). Here a read-ahead
thread keeps the kernel reading the next blocks while the encoder works on the current one, and a
writer thread drains encoded blocks to the file behind it. Both hand-offs are bounded (a byte window
ahead, a queue of a few blocks behind), so memory stays flat whatever the model's size. An error in a
stage thread is raised again in the thread that drives the pipeline; leaving the `with` block stops
and joins both threads, so nothing touches the file or the shards after it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

# How often a waiting thread looks up from its queue or condition to see whether it should stop.
_POLL_S = 0.05


class ReadAhead:
    """Asks for each range in `ranges` (in order) to be read, at most `window` bytes ahead of `consumed()`.

    `read(i)` reads range i ahead of the encoder (it may wait for the disk: it runs on this class's own
    thread); range i's bytes are `sizes[i]`.
    """

    def __init__(self, read: Callable[[int], None], sizes: Sequence[int], window: int):
        self._read, self._sizes, self._window = read, sizes, window
        self._consumed = 0
        self._wake = threading.Condition()
        self._stop = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="read-ahead", daemon=True)

    def __enter__(self) -> ReadAhead:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join()

    def consumed(self, n_bytes: int) -> None:
        """The encoder is done with another `n_bytes`: the window moves on."""
        with self._wake:
            self._consumed += n_bytes
            self._wake.notify()

    def _run(self) -> None:
        ahead = 0  # bytes of the ranges handed to the kernel so far
        try:
            for i, size in enumerate(self._sizes):
                with self._wake:
                    # The first range always goes: a block bigger than the window must still be read.
                    while not self._stop and ahead > 0 and ahead + size > self._consumed + self._window:
                        self._wake.wait(_POLL_S)
                    if self._stop:
                        return
                self._read(i)
                ahead += size
        except BaseException as exc:  # read-ahead only speeds things up: the encoder reads regardless
            self.error = exc


class BlockWriter:
    """Writes blocks handed over by `put` on its own thread, in order, through `write`; then runs each block's `done`.

    At most `depth` blocks wait in the queue. A failed write stops the thread; the next `put` or `finish`
    raises its exception in the caller.
    """

    _END = object()

    def __init__(self, write: Callable[[Any], None], depth: int):
        self._write = write
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="block-writer", daemon=True)

    def __enter__(self) -> BlockWriter:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()  # after an error or Ctrl-C: no more writes, whatever is still queued
        self._thread.join()

    def put(self, data: object, done: Callable[[], None]) -> None:
        """Queue a block; waits while the queue is full, and raises the writer's error if it has failed."""
        self._hand_over((data, done))

    def finish(self) -> None:
        """Wait until every queued block is written; raise the writer's error if it failed."""
        self._hand_over(self._END)
        while self._thread.is_alive():
            self._thread.join(_POLL_S)
        self._raise_error()

    def _hand_over(self, item: object) -> None:
        while True:
            self._raise_error()
            if not self._thread.is_alive():
                raise RuntimeError("internal error: the block writer has stopped")
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    item = self._queue.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                if item is self._END:
                    return
                assert isinstance(item, tuple)
                data: object = item[0]
                done: Callable[[], None] = item[1]
                self._write(data)
                done()
        except BaseException as exc:
            self.error = exc
