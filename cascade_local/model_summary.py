"""What a GGUF holds, summarized: parameters, bits per weight overall and per tensor class, and its metadata.

Works for any architecture: tensors are classed by their GGUF names alone, through `CLASS_RULES`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from cascade_local.gguf_info import GGUFFile, TensorInfo

# GGUF tensor name -> class, first match wins. The names of the converter's `TensorClass` (which its
# quantization recipes key on), plus `dense_ffn` and `other` for architectures that converter never writes.
CLASS_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), cls)
    for pattern, cls in (
        (r"^token_embd\.", "token_embd"),
        (r"^output\.", "output"),
        (r"\.ffn_(up|gate|gate_up)_exps\.", "expert_up"),  # the gate is an up projection too
        (r"\.ffn_down_exps\.", "expert_down"),
        (r"\.ffn_(up|gate|gate_up)_shexp\.", "shared_up"),
        (r"\.ffn_down_shexp\.", "shared_down"),
        (r"\.ssm_in\.", "mamba_in"),
        (r"\.ssm_out\.", "mamba_out"),
        (r"\.attn_(q|k|v|qkv)\.", "attn_qkv"),
        (r"\.attn_output\.", "attn_out"),
        (r"norm|\.ffn_gate_inp(_shexp)?\.|\.exp_probs_b\.|\.ssm_(conv1d|a|d|dt)(\.|$)", "f32_only"),
        (r"\.ffn_(up|gate|gate_up|down)\.", "dense_ffn"),
        (r"", "other"),
    )
)
CLASS_ORDER = tuple(dict.fromkeys(cls for _, cls in CLASS_RULES))

# Metadata values longer than these are shown as a count ("[131072 strings]", "<10504 chars>").
MAX_SHOWN_ITEMS = 32
MAX_SHOWN_CHARS = 200

HF_JSON_KEY = "tokenizer.huggingface.json"


def tensor_class(name: str) -> str:
    """The class of a GGUF tensor, from its name (for example 'blk.3.ffn_up_exps.weight' -> 'expert_up')."""
    return next(cls for pattern, cls in CLASS_RULES if pattern.search(name))


def bits_per_weight(nbytes: int, params: int) -> float:
    return 8 * nbytes / params if params else 0.0


@dataclass
class ClassSummary:
    """The tensors of one class: how many, their parameters and bytes, and which types they use."""

    name: str
    tensors: int = 0
    params: int = 0
    nbytes: int = 0
    types: Counter[str] = field(default_factory=Counter)

    @property
    def bpw(self) -> float:
        return bits_per_weight(self.nbytes, self.params)

    def add(self, tensor: TensorInfo) -> None:
        self.tensors += 1
        self.params += tensor.n_elements
        self.nbytes += tensor.nbytes
        self.types[tensor.qtype.name] += 1

    def to_dict(self) -> dict[str, Any]:
        return {"class": self.name, "tensors": self.tensors, "params": self.params, "bytes": self.nbytes,
                "bits_per_weight": round(self.bpw, 4), "types": dict(self.types.most_common())}


@dataclass(frozen=True)
class TokenizerSummary:
    model: str | None
    pre: str | None
    n_tokens: int
    chat_template_chars: int | None  # None: no chat template in the file
    hf_json_chars: int | None  # None: no embedded tokenizer.json

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "pre": self.pre, "tokens": self.n_tokens,
                "chat_template_chars": self.chat_template_chars, "tokenizer_json_chars": self.hf_json_chars}


@dataclass(frozen=True)
class ModelSummary:
    """Everything `cascade-local info` shows; `to_dict` is its JSON form."""

    gguf: GGUFFile
    classes: list[ClassSummary]
    tokenizer: TokenizerSummary

    @property
    def params(self) -> int:
        return sum(c.params for c in self.classes)

    @property
    def tensor_bytes(self) -> int:
        return sum(c.nbytes for c in self.classes)

    @property
    def bpw(self) -> float:
        return bits_per_weight(self.tensor_bytes, self.params)

    @property
    def types(self) -> Counter[str]:
        return sum((c.types for c in self.classes), Counter())

    def shown_metadata(self) -> dict[str, Any]:
        """Every key, with long strings and arrays replaced by what they are ('[131072 strings]')."""
        return {key: shown_value(value) for key, value in self.gguf.metadata.items()}

    def to_dict(self, tensors: bool = False) -> dict[str, Any]:
        g = self.gguf
        out: dict[str, Any] = {
            "path": str(g.path), "architecture": g.architecture, "name": g.metadata.get("general.name"),
            "gguf_version": g.version, "file_size": g.file_size, "params": self.params,
            "tensor_bytes": self.tensor_bytes, "bits_per_weight": round(self.bpw, 4),
            "types": dict(self.types.most_common()), "classes": [c.to_dict() for c in self.classes],
            "tokenizer": self.tokenizer.to_dict(), "metadata": self.shown_metadata(),
        }
        if tensors:
            out["tensors"] = [
                {"name": t.name, "class": tensor_class(t.name), "type": t.qtype.name, "shape": list(t.shape),
                 "params": t.n_elements, "bytes": t.nbytes, "offset": t.offset}
                for t in g.tensors
            ]
        return out


def summarize(gguf: GGUFFile) -> ModelSummary:
    """Group a file's tensors by class and describe its tokenizer."""
    classes = {name: ClassSummary(name) for name in CLASS_ORDER}
    for tensor in gguf.tensors:
        classes[tensor_class(tensor.name)].add(tensor)
    meta = gguf.metadata

    def text(key: str) -> str | None:
        value = meta.get(key)
        return value if isinstance(value, str) else None

    tokens = meta.get("tokenizer.ggml.tokens")
    template, hf_json = text("tokenizer.chat_template"), text(HF_JSON_KEY)
    tokenizer = TokenizerSummary(
        model=text("tokenizer.ggml.model"),
        pre=text("tokenizer.ggml.pre"),
        n_tokens=len(tokens) if isinstance(tokens, list) else 0,
        chat_template_chars=None if template is None else len(template),
        hf_json_chars=None if hf_json is None else len(hf_json),
    )
    return ModelSummary(gguf, [c for c in classes.values() if c.tensors], tokenizer)


def shown_value(value: Any) -> Any:
    """A metadata value as JSON can carry it, with long strings and arrays summarized."""
    if isinstance(value, str):
        return value if len(value) <= MAX_SHOWN_CHARS else f"<{len(value)} chars>"
    if isinstance(value, list):
        if len(value) <= MAX_SHOWN_ITEMS:
            return [shown_value(v) for v in value]
        return f"[{len(value)} {_kind(value)}]"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or infinity
    return value


def _kind(items: list[Any]) -> str:
    kinds = {type(v) for v in items}
    if len(kinds) != 1:
        return "items"
    return {str: "strings", int: "ints", float: "floats", bool: "bools", list: "arrays"}[kinds.pop()]
