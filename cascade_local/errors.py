"""Domain errors. The library raises these; the CLI turns them into one line and an exit code."""

from __future__ import annotations


class CascadeError(Exception):
    """Base class: the message says what went wrong and, where it can, how to fix it."""

    exit_code = 1


class UsageError(CascadeError):
    """The user asked for something that cannot be done as asked (bad option, existing output...)."""

    exit_code = 1


class NoAnswerError(CascadeError):
    """Generation stopped at the token limit while the model was still reasoning: there is no answer to give."""

    exit_code = 3


class CheckpointError(CascadeError):
    """A Hugging Face checkpoint folder is missing, malformed or of an unsupported architecture."""

    exit_code = 2


class ConversionError(CascadeError):
    """Converting failed part-way (disk full, interrupted, quantization impossible)."""

    exit_code = 2


class TokenizerError(CheckpointError):
    """The tokenizer files cannot be represented in a GGUF that llama.cpp reads correctly."""


class ModelNotFoundError(CascadeError):
    """A model name or path could not be resolved to a local file, and could not be fetched."""

    exit_code = 2


class ModelLoadError(CascadeError):
    """llama.cpp refused the model file, or the file is not a usable GGUF."""

    exit_code = 2


class TemplateError(CascadeError):
    """A chat template failed to render (or tried to escape the sandbox)."""

    exit_code = 2


class ClosedError(CascadeError):
    """A model or engine was used after close(): its native memory is gone (this would have been a crash)."""

    exit_code = 2
