"""Hugging Face Nemotron-H MoE checkpoint -> GGUF for llama.cpp, in one streaming pass.

Installed as `cascade_local.convert` (see pyproject.toml's package-dir mapping).
"""

from .checkpoint import Checkpoint
from .hf_config import NemotronHConfig, load_config
from .imatrix import Imatrix, load_imatrix
from .pipeline import ConversionProgress, ConversionResult, WrittenTensor, convert
from .policy import TypePolicy
from .recipes import TYPE_NAMES, Recipe, parse_recipe, uniform_recipe

__all__ = [
    "TYPE_NAMES",
    "Checkpoint",
    "ConversionProgress",
    "ConversionResult",
    "Imatrix",
    "NemotronHConfig",
    "Recipe",
    "TypePolicy",
    "WrittenTensor",
    "convert",
    "load_config",
    "load_imatrix",
    "parse_recipe",
    "uniform_recipe",
]
