"""The hyper-parameters of a Nemotron-H MoE checkpoint, read from its config.json."""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from cascade_local.errors import CheckpointError

SUPPORTED_ARCHITECTURES = ("NemotronHForCausalLM",)

# transformers spells layer kinds as words in newer configs (`layers_block_type`), as one
# character each in the published ones (`hybrid_override_pattern`).
LAYER_WORDS = {"linear_attention": "M", "mamba": "M", "moe": "E", "full_attention": "*", "attention": "*", "mlp": "-"}


@dataclass(frozen=True)
class NemotronHConfig:
    hidden_size: int
    pattern: str  # one character per layer: M Mamba-2, E MoE, * attention
    vocab_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    moe_intermediate_size: int
    moe_shared_expert_intermediate_size: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    n_group: int
    topk_group: int
    mamba_num_heads: int
    mamba_head_dim: int
    ssm_state_size: int
    n_groups: int
    conv_kernel: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    layer_norm_epsilon: float
    tie_word_embeddings: bool = False
    use_conv_bias: bool = True
    mlp_hidden_act: str = "relu2"
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_layers(self) -> int:
        return len(self.pattern)

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_d_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def mamba_in_proj_dim(self) -> int:
        return self.mamba_d_inner + self.mamba_conv_dim + self.mamba_num_heads

    def layers_of(self, kind: str) -> list[int]:
        return [i for i, c in enumerate(self.pattern) if c == kind]

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> NemotronHConfig:
        """Build from a config.json dict: unknown keys ignored, missing required keys named."""
        archs = raw.get("architectures") or []
        if raw.get("model_type") != "nemotron_h" and not set(archs) & set(SUPPORTED_ARCHITECTURES):
            found = ", ".join(archs) or raw.get("model_type") or "unknown"
            raise CheckpointError(
                f"unsupported architecture {found}: cascade-local converts Nemotron-H MoE checkpoints "
                f"({', '.join(SUPPORTED_ARCHITECTURES)}, model_type nemotron_h)"
            )
        pattern = _pattern(raw)
        if "E" not in pattern:
            raise CheckpointError(
                "this Nemotron-H checkpoint has no MoE layers; only the MoE variant "
                "(Nemotron-3-Nano / Nemotron-Cascade-2) is supported"
            )
        if set(pattern) - set("ME*"):
            raise CheckpointError(f"layer kinds {sorted(set(pattern) - set('ME*'))} are not supported")
        if raw.get("num_nextn_predict_layers"):
            raise CheckpointError("checkpoints with multi-token-prediction layers are not supported yet")
        values: dict[str, Any] = {"pattern": pattern, "raw": raw}
        for f in fields(cls):
            if f.name in values:
                continue
            if f.name in raw and raw[f.name] is not None:
                values[f.name] = raw[f.name]
            elif f.default is not MISSING or f.default_factory is not MISSING:
                continue
            else:
                raise CheckpointError(f"config.json lacks the required key {f.name!r}")
        if values.get("mlp_hidden_act", "relu2") != "relu2":
            raise CheckpointError(f"expert activation {values['mlp_hidden_act']!r} is not supported (relu2 only)")
        config = cls(**values)
        config._check()
        return config

    def _check(self) -> None:
        for name in ("hidden_size", "vocab_size", "n_routed_experts", "num_experts_per_tok",
                     "moe_intermediate_size", "mamba_num_heads", "mamba_head_dim", "ssm_state_size",
                     "n_groups", "conv_kernel", "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CheckpointError(f"config.json: {name} must be a positive integer, got {value!r}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise CheckpointError("config.json: num_experts_per_tok exceeds n_routed_experts")
        if self.mamba_d_inner % self.n_groups:
            raise CheckpointError("config.json: Mamba inner size is not a multiple of n_groups")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError("config.json: num_attention_heads is not a multiple of num_key_value_heads")


def _pattern(raw: dict[str, Any]) -> str:
    pattern = raw.get("hybrid_override_pattern")
    if pattern is None and isinstance(raw.get("layers_block_type"), list):
        try:
            pattern = "".join(LAYER_WORDS[w] for w in raw["layers_block_type"])
        except (KeyError, TypeError):
            raise CheckpointError(f"config.json: unknown layer kind in {raw['layers_block_type']!r}") from None
    if not isinstance(pattern, str) or not pattern:
        raise CheckpointError("config.json has neither hybrid_override_pattern nor layers_block_type")
    n_layers = raw.get("num_hidden_layers")
    if isinstance(n_layers, int) and n_layers != len(pattern):
        raise CheckpointError(
            f"config.json: num_hidden_layers is {n_layers} but the layer pattern has {len(pattern)} layers"
        )
    return pattern


def load_config(folder: Path) -> NemotronHConfig:
    path = folder / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no config.json; is it a Hugging Face checkpoint folder?") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return NemotronHConfig.from_dict(raw)
