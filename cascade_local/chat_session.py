"""A conversation with a local GGUF model: render, generate, split thinking from the answer.

This is the first, single-sequence runtime over llama-cpp-python's `Llama`; expert placement,
batching and thinking budgets arrive with the dedicated engine.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from cascade_local.chat_template import ChatTemplate, Message
from cascade_local.errors import ModelLoadError
from cascade_local.gguf_meta import read_metadata
from cascade_local.llama_log import quiet_llama, recent_lines
from cascade_local.thinking import Piece, ThinkingSplitter
from cascade_local.tokenization import prompt_tokenizer

GGUF_MAGIC = b"GGUF"


@dataclass
class Sampling:
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 4096


@dataclass
class Reply:
    reasoning: str = ""
    content: str = ""
    n_tokens: int = 0
    finish_reason: str = "stop"
    pieces: list[Piece] = field(default_factory=list)


def check_gguf(path: Path) -> None:
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")


def load_llama(path: Path, n_ctx: int, threads: int | None = None) -> Any:
    """A llama-cpp-python model, or a ModelLoadError quoting llama.cpp's reason."""
    check_gguf(path)
    quiet_llama()
    from llama_cpp import Llama

    try:
        return Llama(str(path), n_ctx=n_ctx, n_threads=threads or os.cpu_count(), verbose=False)
    except (ValueError, RuntimeError) as exc:
        said = [line for line in recent_lines() if "error" in line.lower() or "failed" in line.lower()]
        reason = said[-1].strip() if said else str(exc)
        raise ModelLoadError(f"llama.cpp could not load {path}: {reason}") from None


def default_template() -> str:
    return resources.files("cascade_local").joinpath("templates/nemotron-cascade-2.jinja").read_text(encoding="utf-8")


class ChatSession:
    def __init__(self, path: Path, *, n_ctx: int = 8192, threads: int | None = None):
        self.path = path
        check_gguf(path)
        meta = read_metadata(path)
        self.llm = load_llama(path, n_ctx, threads)
        tokens = meta.get("tokenizer.ggml.tokens") or []

        def token_text(key: str) -> str:
            tid = meta.get(key)
            return tokens[tid] if isinstance(tid, int) and 0 <= tid < len(tokens) else ""

        self.template = ChatTemplate(
            meta.get("tokenizer.chat_template") or default_template(),
            bos_token=token_text("tokenizer.ggml.bos_token_id"),
            eos_token=token_text("tokenizer.ggml.eos_token_id"),
        )
        self.tokenizer = prompt_tokenizer(meta, self.llm)
        self.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
        self.messages: list[Message] = []

    def render(self, enable_thinking: bool) -> str:
        return self.template.render(self.messages, add_generation_prompt=True, enable_thinking=enable_thinking)

    def stream(self, user_text: str, *, enable_thinking: bool, sampling: Sampling) -> Iterator[Piece]:
        """Yields reasoning and answer pieces; on completion the assistant turn joins the history."""
        import llama_cpp

        self.messages.append({"role": "user", "content": user_text})
        prompt = self.render(enable_thinking)
        tokens = self.tokenizer.encode(prompt, add_bos=self.add_bos)
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        splitter = ThinkingSplitter(in_reasoning=enable_thinking)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        reply = Reply()
        try:
            for token in self.llm.generate(tokens, temp=sampling.temperature, top_p=sampling.top_p,
                                           top_k=sampling.top_k, min_p=sampling.min_p):
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    break
                reply.n_tokens += 1
                text = decoder.decode(self.llm.detokenize([token], special=True))
                yield from splitter.feed(text)
                if reply.n_tokens >= sampling.max_tokens:
                    reply.finish_reason = "length"
                    break
            yield from splitter.feed(decoder.decode(b"", final=True))
            yield from splitter.flush()
        finally:
            self.messages.append(
                {"role": "assistant", "content": splitter.content, "reasoning_content": splitter.reasoning}
            )

    def clear(self) -> None:
        self.messages.clear()
