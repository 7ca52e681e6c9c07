"""Prompt tokenization that matches the reference tokenizer exactly.

When the GGUF carries the original `tokenizer.json` (our converter embeds it), prompts are encoded
with HF `tokenizers` itself; llama.cpp's built-in pre-tokenizers only approximate some split
regexes. Files from elsewhere fall back to llama.cpp's tokenizer.
"""

from __future__ import annotations

from typing import Any, Protocol

HF_JSON_KEY = "tokenizer.huggingface.json"


class PromptTokenizer(Protocol):
    exact: bool

    def encode(self, text: str, *, add_bos: bool) -> list[int]: ...


class HFTokenizer:
    exact = True

    def __init__(self, tokenizer_json: str, bos_id: int | None):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_str(tokenizer_json)
        self._bos_id = bos_id

    def encode(self, text: str, *, add_bos: bool) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self._bos_id, *ids] if add_bos and self._bos_id is not None else ids


class LlamaCppTokenizer:
    """llama.cpp's own tokenizer, through a loaded model's `tokenize(text, add_bos=)`."""

    exact = False

    def __init__(self, model: Any):
        self._model = model

    def encode(self, text: str, *, add_bos: bool) -> list[int]:
        return self._model.tokenize(text, add_bos=add_bos)


def prompt_tokenizer(metadata: dict[str, Any], model: Any) -> PromptTokenizer:
    source = metadata.get(HF_JSON_KEY)
    if isinstance(source, str) and source:
        bos = metadata.get("tokenizer.ggml.bos_token_id")
        return HFTokenizer(source, bos if isinstance(bos, int) else None)
    return LlamaCppTokenizer(model)
