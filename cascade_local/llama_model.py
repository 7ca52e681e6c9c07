"""A GGUF model loaded through llama.cpp's low-level API, with its chat template and exact tokenizer."""

from __future__ import annotations

import ctypes
import functools
import weakref
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from cascade_local.chat_template import ChatTemplate
from cascade_local.cpu_extra import process_verdict
from cascade_local.devices import BuftOverrides
from cascade_local.errors import ClosedError, ModelLoadError
from cascade_local.gguf_meta import read_metadata
from cascade_local.interrupt import InterruptFlag, deferred_interrupt
from cascade_local.llama_log import quiet_llama, recent_lines
from cascade_local.tokenization import PromptTokenizer, prompt_tokenizer

SUPPORTED_ARCHITECTURES = ("nemotron_h_moe",)


def check_architecture(metadata: dict[str, Any], path: Path) -> None:
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"{path.name} is a {arch or 'unknown'} model; cascade-local runs "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)} (Nemotron-Cascade-2) models")


def repack_overrides(path: Path, overrides: BuftOverrides | None) -> BuftOverrides:
    """`overrides` plus the weights ggml's repack buffer can take, sent to it by name (see cpu_extra)."""
    from cascade_local.cpu_extra import REPACK, cpu_features, repackable
    from cascade_local.devices import extra_buffer_types, with_forced_buffer
    from cascade_local.gguf_info import read_gguf

    buft = dict(extra_buffer_types())[REPACK]
    return with_forced_buffer(overrides, repackable(read_gguf(path).tensors, cpu_features()), buft)


def default_template() -> str:
    return resources.files("cascade_local").joinpath("templates/nemotron-cascade-2.jinja").read_text(encoding="utf-8")


class Dependent(Protocol):
    """Something built on the model (an engine's context) that must be freed before the model is."""

    def close(self) -> None: ...


class LoadedModel:
    """Owns a llama_model. `overrides` (devices.BuftOverrides) places tensors and sets n_gpu_layers.

    A context manager: leaving it (or `close()`) first closes every engine made on the model, then
    frees the model, once. Using it afterwards raises ClosedError instead of touching freed memory.
    """

    _model: Any = None  # the llama_model pointer (None before loading and after close)
    _dependents: weakref.WeakSet[Dependent]

    def __init__(self, path: Path, *, overrides: BuftOverrides | None = None):
        self._dependents = weakref.WeakSet()
        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        check_architecture(self.metadata, self.path)
        quiet_llama()
        import llama_cpp

        self._lib = llama_cpp
        self.cpu_extra = process_verdict()
        if self.cpu_extra.mode == "repack":
            overrides = repack_overrides(self.path, overrides)
        self._overrides = overrides  # llama.cpp reads the patterns while loading: keep them alive
        # The load's parameters, all set here.
        stop = InterruptFlag()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        # Extra CPU buffer types (AMX, repacking) only where they were seen to run on this machine.
        params.use_extra_bufts = self.cpu_extra.mode == "all"
        if overrides is not None:
            overrides.apply(params)
        # Called between tensors; returning false makes llama.cpp give the load up (Ctrl-C: see _load).
        progress = llama_cpp.llama_progress_callback(lambda _progress, _data: not stop.requested)
        params.progress_callback = progress
        self._model = self._load(params, stop)
        if not self._model:
            said = [line for line in recent_lines() if "error" in line.lower() or "failed" in line.lower()]
            reason = said[-1].strip() if said else "unknown reason"
            raise ModelLoadError(f"llama.cpp could not load {self.path}: {reason} "
                                 "(`cascade-local doctor` shows what this machine and build offer)")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.tokenizer: PromptTokenizer = prompt_tokenizer(self.metadata, self)
        self.add_bos = bool(self.metadata.get("tokenizer.ggml.add_bos_token", False))
        tokens = self.metadata.get("tokenizer.ggml.tokens") or []

        def token_text(key: str) -> str:
            tid = self.metadata.get(key)
            return tokens[tid] if isinstance(tid, int) and 0 <= tid < len(tokens) else ""

        self.template = ChatTemplate(
            self.metadata.get("tokenizer.chat_template") or default_template(),
            bos_token=token_text("tokenizer.ggml.bos_token_id"),
            eos_token=token_text("tokenizer.ggml.eos_token_id"),
        )

    def _load(self, params: Any, stop: InterruptFlag) -> Any:
        """llama_model_load_from_file, stopped by Ctrl-C at any moment (KeyboardInterrupt, nothing left loaded).

        SIGINT only sets `stop` during the native call (Python raised in llama.cpp's callbacks would be
        lost); the progress callback then ends the load, and the interrupt is raised once it returned.
        """
        pointer = None
        try:
            with deferred_interrupt(stop):
                pointer = self._lib.llama_model_load_from_file(str(self.path).encode(), params)
        except KeyboardInterrupt:
            if pointer:  # SIGINT came after the last progress call: the model loaded, and is not wanted
                self._lib.llama_model_free(pointer)
            raise
        return pointer

    # -- ownership -----------------------------------------------------------------------------------

    def _open(self) -> Any:
        if not self._model:
            raise ClosedError(f"the model {self.path.name} was closed; load it again to use it")
        return self._model

    @property
    def model(self) -> Any:
        """The llama_model pointer, for llama.cpp calls; ClosedError once the model was closed."""
        return self._open()

    @property
    def vocab(self) -> Any:
        """The vocabulary pointer; it lives inside the model and dies with it."""
        self._open()
        return self._vocab

    @property
    def closed(self) -> bool:
        return not self._model

    def attach(self, dependent: Dependent) -> None:
        """Registers an engine built on this model, to be closed before the model is freed."""
        self._open()  # nothing may be built on a closed model
        self._dependents.add(dependent)

    def close(self) -> None:
        """Closes the engines made on the model, then frees it. Safe to call again."""
        pointer, self._model = self._model, None  # closed from here on, also to the engines closing below
        for dependent in list(getattr(self, "_dependents", ())):
            dependent.close()
        if pointer:
            self._lib.llama_model_free(pointer)

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # -- tokens ---------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = False) -> list[int]:
        """llama.cpp's own tokenizer (special tokens parsed); used where no exact tokenizer is embedded."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (self._lib.llama_token * capacity)()
        n = self._lib.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_bos, True)
        if n < 0:
            capacity = -n
            buf = (self._lib.llama_token * capacity)()
            n = self._lib.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_bos, True)
        return list(buf[:n])

    def encode_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=self.add_bos)

    def piece(self, token: int) -> bytes:
        """The bytes one token stands for, special tokens included (so `</think>` is visible)."""
        buf = ctypes.create_string_buffer(64)
        n = self._lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[:n]

    @functools.cached_property
    def eog_tokens(self) -> tuple[int, ...]:
        """Every end-of-generation token (end of turn, end of text...), as llama.cpp marks them."""
        return tuple(t for t in range(self.n_vocab) if self._lib.llama_vocab_is_eog(self.vocab, t))

    def is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self.vocab, token))
