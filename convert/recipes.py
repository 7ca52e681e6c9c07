"""Quantization recipes: tensor class (and optionally layer) -> GGML type, declared as data.

A recipe names a type for each tensor class; `override` entries raise or lower the type for chosen
layers (`first_moe`, `last_moe`, or layer indices). Norms, router, Mamba conv and SSM scalars are
always F32 whatever a recipe says. Only types whose block is 32 values are offered: the model's
rows (2688, 1856, 3712) are not multiples of 256, which is why llama.cpp's K-quants fall back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import gguf

from cascade_local.errors import UsageError

from .hf_config import NemotronHConfig
from .policy import TypePolicy
from .tensor_map import TensorClass

T = gguf.GGMLQuantizationType
F = gguf.LlamaFileType

# Name in recipes and on the command line -> GGML type.
TYPE_NAMES: dict[str, gguf.GGMLQuantizationType] = {
    "f32": T.F32,
    "f16": T.F16,
    "bf16": T.BF16,
    "q8_0": T.Q8_0,
    "q5_1": T.Q5_1,
    "q5_0": T.Q5_0,
    "q4_1": T.Q4_1,
    "q4_0": T.Q4_0,
    "iq4_nl": T.IQ4_NL,
    "mxfp4": T.MXFP4,
}

# general.file_type llama.cpp records, from the type of the routed experts (most of the weights).
FILE_TYPES: dict[gguf.GGMLQuantizationType, gguf.LlamaFileType] = {
    T.F32: F.ALL_F32,
    T.F16: F.MOSTLY_F16,
    T.BF16: F.MOSTLY_BF16,
    T.Q8_0: F.MOSTLY_Q8_0,
    T.Q5_1: F.MOSTLY_Q5_1,
    T.Q5_0: F.MOSTLY_Q5_0,
    T.Q4_1: F.MOSTLY_Q4_1,
    T.Q4_0: F.MOSTLY_Q4_0,
    T.IQ4_NL: F.MOSTLY_IQ4_NL,
    T.MXFP4: F.MOSTLY_MXFP4_MOE,
}

CONFIGURABLE = tuple(c for c in TensorClass if c is not TensorClass.F32_ONLY)


def parse_type(name: str, where: str) -> gguf.GGMLQuantizationType:
    try:
        return TYPE_NAMES[name.lower()]
    except (KeyError, AttributeError):
        raise UsageError(f"{where}: unknown type {name!r}; choose one of {', '.join(TYPE_NAMES)}") from None


@dataclass(frozen=True)
class LayerOverride:
    layers: tuple[str | int, ...]  # "first_moe", "last_moe", "all_moe", or layer indices
    types: dict[TensorClass, gguf.GGMLQuantizationType]

    def layer_indices(self, cfg: NemotronHConfig) -> set[int]:
        moe = cfg.layers_of("E")
        chosen: set[int] = set()
        for sel in self.layers:
            if sel == "first_moe":
                chosen.update(moe[:1])
            elif sel == "last_moe":
                chosen.update(moe[-1:])
            elif sel == "all_moe":
                chosen.update(moe)
            elif isinstance(sel, int) and 0 <= sel < cfg.n_layers:
                chosen.add(sel)
            else:
                raise UsageError(f"recipe layer selector {sel!r} is not first_moe, last_moe, all_moe "
                                 f"or a layer index below {cfg.n_layers}")
        return chosen


@dataclass(frozen=True)
class Recipe:
    name: str
    types: dict[TensorClass, gguf.GGMLQuantizationType]
    description: str = ""
    overrides: tuple[LayerOverride, ...] = field(default_factory=tuple)

    def resolve(self, cfg: NemotronHConfig) -> TypePolicy:
        """The concrete policy for one model: overrides expanded to the layers they select."""
        by_layer: dict[tuple[TensorClass, int], gguf.GGMLQuantizationType] = {}
        for override in self.overrides:
            for layer in sorted(override.layer_indices(cfg)):
                for cls, qtype in override.types.items():
                    by_layer[(cls, layer)] = qtype
        file_type = FILE_TYPES[self.types[TensorClass.EXPERT_UP]]
        return TypePolicy(self.name, file_type, dict(self.types), by_layer)


def _class_types(raw: Mapping[str, Any], where: str, *, complete: bool) -> dict[TensorClass, gguf.GGMLQuantizationType]:
    unknown = set(raw) - {c.value for c in CONFIGURABLE}
    if unknown:
        raise UsageError(f"{where}: unknown tensor class {sorted(unknown)[0]!r}; classes are "
                         f"{', '.join(c.value for c in CONFIGURABLE)}")
    if complete:
        missing = [c.value for c in CONFIGURABLE if c.value not in raw]
        if missing:
            raise UsageError(f"{where}: no type given for {', '.join(missing)}")
    return {TensorClass(k): parse_type(v, f"{where}.{k}") for k, v in raw.items()}


def parse_recipe(name: str, raw: Mapping[str, Any]) -> Recipe:
    """A recipe from its models.toml table: `description`, one type per class, `override` list."""
    where = f"recipe {name!r}"
    if not isinstance(raw, Mapping):
        raise UsageError(f"{where} must be a table")
    fields = {k: v for k, v in raw.items() if k not in ("description", "override")}
    types = _class_types(fields, where, complete=True)
    overrides = []
    for i, entry in enumerate(raw.get("override", [])):
        ow = f"{where} override {i + 1}"
        layers = entry.get("layers") if isinstance(entry, Mapping) else None
        if not isinstance(layers, list) or not layers:
            raise UsageError(f"{ow}: `layers` must be a non-empty list")
        override_types = _class_types({k: v for k, v in entry.items() if k != "layers"}, ow, complete=False)
        overrides.append(LayerOverride(tuple(layers), override_types))
    return Recipe(name, types, str(raw.get("description", "")), tuple(overrides))


def uniform_recipe(type_name: str) -> Recipe:
    """`--type X`: every weight matrix X (norms and SSM parameters stay F32)."""
    qtype = parse_type(type_name, "--type")
    return Recipe(type_name.lower(), dict.fromkeys(CONFIGURABLE, qtype), f"every weight matrix {qtype.name}")
