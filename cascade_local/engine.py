"""The generation engine: several sequences decoded together in one llama.cpp batch.

One llama_context holds `n_seq_max` sequences (each with its own Mamba state and KV cells). New
requests are admitted as others finish (continuous batching); each step decodes one token for every
active sequence in a single `llama_decode`, then samples each with its own sampler chain. Text is
detokenized incrementally (never a broken UTF-8 sequence) and split into reasoning and answer; a
thinking budget closes the thought by injecting `</think>` when the model has not.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import dataclasses
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from cascade_local.errors import CascadeError, ClosedError, UsageError
from cascade_local.expert_stats import ExpertStats
from cascade_local.ggml import default_threads
from cascade_local.interrupt import deferred_interrupt
from cascade_local.llama_model import LoadedModel
from cascade_local.sampling import SamplerChain, SamplingParams
from cascade_local.thinking import ThinkingSplitter

FinishReason = Literal["stop", "length", "cancelled"]
CLOSE_THINKING = "\n</think>\n\n"


class DecodeError(CascadeError):
    """llama.cpp could not create the context or evaluate a batch; `code` is llama_decode's return value."""

    exit_code = 2

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


def decode_error(code: int, n_ctx: int, n_seq_max: int) -> DecodeError:
    """What a nonzero llama_decode return means, and what to do about it (llama.h documents each code)."""
    if code == 1:
        what = (f"no room left in the context for this batch (no free KV slot; {n_ctx} tokens shared by "
                f"{n_seq_max} sequences): use a larger --ctx or fewer --parallel, or shorter prompts")
    elif code == -1:
        what = "llama.cpp rejected the batch as invalid: a bug in cascade-local, please report it"
    elif code == 2:
        what = "decoding was aborted before the batch was done"
    else:
        what = ("the computation failed (out of memory, or the GPU backend failed): try a smaller --ctx, "
                "fewer --parallel, or less of the model on the GPU (--gpu-mem, --cpu-moe)")
    return DecodeError(f"llama_decode returned {code}: {what}", code)


class Sampler(Protocol):
    """Chooses each token. The real one is a llama.cpp sampler chain; tests may script the choices."""

    def sample(self, ctx: Any, output_index: int) -> int: ...
    def accept(self, token: int) -> None: ...
    def close(self) -> None: ...


@dataclass
class PromptCache:
    """The state of a sequence right after its last prompt was evaluated (Mamba state and KV cells).

    Mamba layers keep one running state, not per-token entries, so an evaluated prefix cannot be cut
    back to a shorter one. A chat's next prompt extends the previous *prompt* (the template drops the
    old reasoning, so it does not extend the generated tokens): restoring this snapshot and feeding
    only the new suffix gives the same state as evaluating everything again.
    """

    tokens: list[int] = field(default_factory=list)
    state: bytes = b""


@dataclass(frozen=True)
class Request:
    prompt_tokens: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 4096
    in_reasoning: bool = False  # the prompt opened <think> (thinking mode)
    thinking_budget: int | None = None  # reasoning tokens before the engine closes the thought
    tag: Any = None  # the caller's id, handed back in events
    cache: PromptCache | None = None  # reuse (and update) a snapshot of an earlier prompt
    cache_prefix: int | None = None  # snapshot after this many prompt tokens (default: all of them)
    on_snapshot: Callable[[list[int], bytes], None] | None = None  # told each snapshot (to keep it on disk)
    on_progress: Callable[[int, int], None] | None = None  # (prompt tokens done, total) after each batch of them


@dataclass
class Result:
    content: str = ""
    reasoning: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, restored from a PromptCache instead of evaluated
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    finish_reason: FinishReason = "stop"
    budget_closed: bool = False  # the engine, not the model, ended the reasoning
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generation_tokens_per_second(self) -> float:
        return self.completion_tokens / self.generation_seconds if self.generation_seconds else 0.0


@dataclass(frozen=True)
class Event:
    """A piece of streamed text (`reasoning` or `content`), or `done` with the final result."""

    tag: Any
    kind: Literal["reasoning", "content", "done"]
    text: str = ""
    result: Result | None = None
    # The request's reasoning tokens so far (None where unknown, as from a server): once the answer has begun it
    # is the final count, so a display can say "thought for N tokens" with the number the Result will give.
    reasoning_tokens: int | None = None
    # The engine's Result as it fills (text pieces of the local engine): the counts of a stream stopped part-way.
    progress: Result | None = None


@dataclass
class _Slot:
    seq: int
    request: Request
    sampler: Sampler
    splitter: ThinkingSplitter
    decoder: codecs.IncrementalDecoder
    result: Result
    pos: int = 0
    pending: list[int] = field(default_factory=list)  # tokens to feed at the next decode
    started: float = 0.0
    generated: list[int] = field(default_factory=list)


class Engine:
    """Decodes up to `n_seq_max` requests at once on one context of `n_ctx` tokens in total.

    A context manager. Its native objects (batch, context, and the model if `owns_model`) are freed
    once, in the reverse of their creation, by `close()`, by leaving the `with` block, or by closing
    the model (which closes its engines first). After that every use raises ClosedError.
    """

    def __init__(self, model: LoadedModel, *, n_ctx: int = 8192, n_seq_max: int = 1, n_batch: int = 512,
                 threads: int | None = None, sampler_factory: Callable[[SamplingParams], Sampler] | None = None,
                 expert_stats: ExpertStats | None = None, owns_model: bool = False, kv_type: str = "f16",
                 n_outputs_max: int | None = None):
        import llama_cpp

        from cascade_local.placement import check_kv_type

        if n_seq_max < 1:
            raise UsageError("parallel sequences must be at least 1")
        check_kv_type(kv_type)
        self._lib = llama_cpp
        self.model = model
        self._closed_by: str | None = None  # why the engine is closed (None while it is open)
        self._resources = contextlib.ExitStack()  # frees, last first: batch, context, then an owned model
        if owns_model:
            self._resources.callback(model.close)
        self.n_seq_max = n_seq_max
        self._sampler_factory = sampler_factory or (
            lambda params: SamplerChain(params, model.eog_tokens if params.ignore_eos else (), model.n_vocab))
        self.n_batch = max(n_batch, n_seq_max)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = n_seq_max
        # The engine asks for one row of logits per sequence in a batch (the last prompt token, or the token being
        # decoded), so that is all llama.cpp reserves: by default it reserves a whole batch's, 512 rows of the
        # 131,072-token vocabulary, 256 MiB of compute buffer never used. llama.cpp aborts the process on a batch
        # that asks for more, so `_fill` refuses one first.
        self.n_outputs_max = n_outputs_max or n_seq_max
        params.n_outputs_max = self.n_outputs_max
        params.kv_unified = False  # each sequence its own n_ctx / n_seq_max cells, as the planner counts them
        # llama.cpp's own default is 4 threads whatever the machine: use the CPUs we may run on unless told.
        params.n_threads = params.n_threads_batch = threads or default_threads()
        params.no_perf = True
        self.kv_type = kv_type
        if kv_type != "f16":
            params.type_k = params.type_v = getattr(llama_cpp, f"GGML_TYPE_{kv_type.upper()}")
            # llama.cpp refuses a quantized V cache without flash attention ("auto" may leave it off).
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        self.expert_stats = expert_stats
        if expert_stats is not None:
            params.cb_eval = expert_stats.callback
        try:
            with deferred_interrupt():  # llama.cpp logs (calls Python) while it reserves the context's memory
                ctx = llama_cpp.llama_init_from_model(model.model, params)
                if ctx:
                    self._resources.callback(llama_cpp.llama_free, ctx)
        except KeyboardInterrupt:
            self._resources.close()
            raise
        if not ctx:
            self._resources.close()
            raise DecodeError(f"llama.cpp could not create a context of {n_ctx} tokens for {n_seq_max} sequences")
        self._ctx = ctx
        self.n_ctx = llama_cpp.llama_n_ctx(ctx)
        self._memory = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._resources.callback(llama_cpp.llama_batch_free, self._batch)
        model.attach(self)
        self._close_tokens = model.tokenize(CLOSE_THINKING)

    # -- public API ------------------------------------------------------------------------------------

    def stream(self, request: Request) -> Iterator[Event]:
        """One request; yields its text pieces, then `done`."""
        yield from self.stream_many([request])

    def stream_many(self, requests: Iterable[Request]) -> Iterator[Event]:
        """Runs requests `n_seq_max` at a time, admitting the next as one finishes; events interleave."""
        queue = deque(requests)
        # The live loop with a queue known in advance: no request is ever waited for, none is cancelled.
        yield from self.stream_live(lambda idle: queue.popleft() if queue else None)

    def stream_live(self, take: Callable[[bool], Request | None],
                    cancelled: Callable[[Any], bool] = lambda tag: False) -> Iterator[Event]:
        """Continuous batching for a server: requests arrive while others run.

        Whenever a sequence is free, `take(idle)` is asked for the next request (`idle` is True when
        nothing runs, so the caller may block until one arrives); None means none for now, or, when
        idle, that the stream should end. A running request whose tag `cancelled` reports is ended at
        once (a client went away): its `done` event has finish_reason "cancelled" and its slot is free.
        """
        slots: dict[int, _Slot] = {}
        try:
            while True:
                for slot in [s for s in slots.values() if cancelled(s.request.tag)]:
                    yield from self._finish(slots, slot, "cancelled")
                for seq in range(self.n_seq_max):
                    if seq in slots:
                        continue
                    request = take(not slots)
                    if request is None:
                        if not slots:  # nothing runs and nothing comes: done
                            return
                        break
                    slot = self._admit(seq, request)
                    slots[seq] = slot
                    yield from self._after_sample(slots, slot, slot.sampler.sample(self.ctx, -1))
                if slots:
                    yield from self._step(slots)
        finally:
            for slot in slots.values():
                slot.sampler.close()
                self._forget(slot.seq)

    def generate(self, request: Request) -> Result:
        """Runs one request to completion and returns its result."""
        return self.generate_many([request])[0]

    def generate_many(self, requests: list[Request]) -> list[Result]:
        results: dict[int, Result] = {}
        tagged = [dataclasses.replace(r, tag=i) for i, r in enumerate(requests)]
        for event in self.stream_many(tagged):
            if event.kind == "done":
                assert event.result is not None
                results[event.tag] = event.result
        return [results[i] for i in range(len(requests))]

    @property
    def ctx(self) -> Any:
        """The llama_context pointer; ClosedError once the engine was closed."""
        return self._open()

    @property
    def closed(self) -> bool:
        return self._closed_by is not None

    def close(self) -> None:
        """Frees the batch and the context (and the model if the engine owns it). Safe to call again.

        A stream still suspended keeps no claim on them: resuming it raises ClosedError.
        """
        resources = getattr(self, "_resources", None)
        if resources is None or self._closed_by is not None:
            return
        model = self.model
        self._closed_by = (f"the model {model.path.name} was closed, and the engine with it; load it again"
                           if model.closed else "the engine was closed; open a new one to generate")
        self._ctx = self._memory = self._batch = None
        resources.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------------

    def _open(self) -> Any:
        if self._closed_by is not None:
            raise ClosedError(self._closed_by)
        return self._ctx

    def _forget(self, seq: int) -> None:
        if self._closed_by is None:  # a closed context took every sequence with it
            self._lib.llama_memory_seq_rm(self._memory, seq, -1, -1)

    def _admit(self, seq: int, request: Request) -> _Slot:
        tokens = request.prompt_tokens
        if not tokens:
            raise UsageError("empty prompt")
        per_seq = self.n_ctx // self.n_seq_max
        if len(tokens) + 1 > per_seq:
            shared = f" shared by {self.n_seq_max} sequences" if self.n_seq_max > 1 else ""
            raise UsageError(f"prompt of {len(tokens)} tokens does not fit the context ({self.n_ctx} tokens{shared})")
        self._forget(seq)
        slot = _Slot(seq, request, self._sampler_factory(request.sampling), ThinkingSplitter(request.in_reasoning),
                     codecs.getincrementaldecoder("utf-8")(errors="replace"),
                     Result(prompt_tokens=len(tokens)))
        started = time.perf_counter()
        done = self._restore(seq, request.cache, tokens)
        slot.result.cached_tokens = done
        # The snapshot point leaves at least the last token to evaluate after it, for the logits to sample from.
        prefix = len(tokens) - 1 if request.cache_prefix is None else request.cache_prefix
        cut = max(done, min(prefix, len(tokens) - 1))
        if request.cache is not None and not (done and cut == done):  # a restored state at `cut` is the snapshot
            self._evaluate(seq, tokens, done, cut, logits_at_end=False, progress=request.on_progress)
            request.cache.tokens, request.cache.state = list(tokens[:cut]), self._snapshot(seq)
            if request.on_snapshot is not None:
                request.on_snapshot(request.cache.tokens, request.cache.state)
            done = cut
        self._evaluate(seq, tokens, done, len(tokens), logits_at_end=True, progress=request.on_progress)
        slot.pos = len(tokens)
        slot.started = time.perf_counter()
        slot.result.prompt_seconds = slot.started - started
        return slot

    def _evaluate(self, seq: int, tokens: list[int], start: int, end: int, *, logits_at_end: bool,
                  progress: Callable[[int, int], None] | None = None) -> None:
        for first in range(start, end, self.n_batch):
            chunk = tokens[first : min(end, first + self.n_batch)]
            last = first + len(chunk) >= end
            self._fill([(seq, t, first + i, logits_at_end and last and i == len(chunk) - 1)
                        for i, t in enumerate(chunk)])
            self._decode()
            if progress is not None:  # between native calls, never inside one
                progress(first + len(chunk), len(tokens))

    def _restore(self, seq: int, cache: PromptCache | None, tokens: list[int]) -> int:
        """Load the cached state if the new prompt strictly extends the cached one; tokens already done."""
        if cache is None or not cache.state or len(tokens) <= len(cache.tokens) or not cache.tokens:
            return 0
        if tokens[: len(cache.tokens)] != cache.tokens:
            return 0
        # llama.cpp reads the bytes where they are (a c_char_p of bytes points into the object): no copy.
        src = ctypes.cast(ctypes.c_char_p(cache.state), ctypes.POINTER(ctypes.c_uint8))
        if self._lib.llama_state_seq_set_data(self.ctx, src, len(cache.state), seq) == 0:
            self._forget(seq)
            return 0
        return len(cache.tokens)

    def _snapshot(self, seq: int) -> bytes:
        """The sequence's state: llama.cpp writes it into a buffer, copied once into bytes Python owns.

        (Slicing the ctypes array would build a list of ints first: 10x the memory, 50x the time.)
        """
        ctx = self.ctx
        size = self._lib.llama_state_seq_get_size(ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        written = self._lib.llama_state_seq_get_data(ctx, buf, size, seq)
        return ctypes.string_at(buf, written)

    def _fill(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """Batch rows of (sequence, token, position, wants logits)."""
        if len(entries) > self.n_batch:  # past the end of llama_batch's arrays is someone else's memory
            raise ValueError(f"{len(entries)} rows do not fit a batch of {self.n_batch}")
        if sum(e[3] for e in entries) > self.n_outputs_max:
            raise ValueError(f"a batch asks for {sum(e[3] for e in entries)} rows of logits; the context reserved "
                             f"{self.n_outputs_max}")
        self._open()  # the batch is freed with the context
        b = self._batch
        for i, (seq, token, pos, logits) in enumerate(entries):
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(entries)

    def _decode(self) -> None:
        rc = self._lib.llama_decode(self.ctx, self._batch)
        if rc != 0:
            raise decode_error(rc, self.n_ctx, self.n_seq_max)

    def _step(self, slots: dict[int, _Slot]) -> Iterator[Event]:
        """Feeds every slot its pending tokens and samples its next one.

        A closing thought feeds `</think>` too, so a step may hold more rows than one batch: it is then
        decoded in pieces of at most `n_batch` rows, each piece's rows sampled before the next decode
        overwrites the logits. A sequence's rows stay in order; its last (the one sampled) comes after the others.
        """
        entries: list[tuple[int, int, int, bool]] = []
        sampled_at: dict[int, _Slot] = {}  # entry index -> the slot whose next token its logits give
        for slot in slots.values():
            for k, token in enumerate(slot.pending):
                last = k == len(slot.pending) - 1
                if last:
                    sampled_at[len(entries)] = slot
                entries.append((slot.seq, token, slot.pos, last))
                slot.pos += 1
            slot.pending = []
        for first in range(0, len(entries), self.n_batch):
            piece = entries[first : first + self.n_batch]
            self._fill(piece)
            self._decode()
            for row in range(len(piece)):
                owner = sampled_at.get(first + row)
                if owner is not None:
                    yield from self._after_sample(slots, owner, owner.sampler.sample(self.ctx, row))

    def _after_sample(self, slots: dict[int, _Slot], slot: _Slot, token: int) -> Iterator[Event]:
        request, result = slot.request, slot.result
        if self.model.is_eog(token):
            yield from self._finish(slots, slot, "stop")
            return
        result.completion_tokens += 1
        result.generation_seconds = time.perf_counter() - slot.started  # so far: a stopped stream has it too
        slot.generated.append(token)
        if slot.splitter.in_reasoning:
            result.reasoning_tokens += 1
        feed = [token]
        yield from self._emit(slot, self.model.piece(token))
        budget = request.thinking_budget
        if budget is not None and slot.splitter.in_reasoning and result.reasoning_tokens >= budget:
            # The model would think on; close the thought for it, as if it had written the tag itself.
            for injected in self._close_tokens:
                slot.sampler.accept(injected)
            feed += self._close_tokens
            result.budget_closed = True
            yield from self._emit(slot, b"".join(self.model.piece(t) for t in self._close_tokens))
        if result.completion_tokens >= request.max_tokens:
            yield from self._finish(slots, slot, "length")
            return
        if slot.pos + len(feed) >= self.n_ctx // self.n_seq_max:
            yield from self._finish(slots, slot, "length")
            return
        slot.pending = feed

    def _emit(self, slot: _Slot, data: bytes) -> Iterator[Event]:
        for piece in slot.splitter.feed(slot.decoder.decode(data)):
            yield Event(slot.request.tag, piece.kind, piece.text, reasoning_tokens=slot.result.reasoning_tokens,
                        progress=slot.result)

    def _finish(self, slots: dict[int, _Slot], slot: _Slot, reason: FinishReason) -> Iterator[Event]:
        yield from self._emit(slot, b"")
        for piece in [*slot.splitter.feed(slot.decoder.decode(b"", final=True)), *slot.splitter.flush()]:
            yield Event(slot.request.tag, piece.kind, piece.text, reasoning_tokens=slot.result.reasoning_tokens)
        result = slot.result
        result.finish_reason = reason
        result.content, result.reasoning = slot.splitter.content.strip(), slot.splitter.reasoning.strip()
        result.generation_seconds = time.perf_counter() - slot.started
        slot.sampler.close()
        self._forget(slot.seq)
        del slots[slot.seq]
        yield Event(slot.request.tag, "done", result=result)
