"""Hugging Face Nemotron-H MoE checkpoint -> GGUF for llama.cpp, in one streaming pass.

Installed as `cascade_local.convert` (see pyproject.toml's package-dir mapping).
"""

from .checkpoint import Checkpoint
from .hf_config import NemotronHConfig, load_config
from .pipeline import ConversionProgress, ConversionResult, WrittenTensor, convert
from .policy import UNIFORM_TYPES, TypePolicy, uniform_policy

__all__ = [
    "UNIFORM_TYPES",
    "Checkpoint",
    "ConversionProgress",
    "ConversionResult",
    "NemotronHConfig",
    "TypePolicy",
    "WrittenTensor",
    "convert",
    "load_config",
    "uniform_policy",
]
