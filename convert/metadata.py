"""Model hyper-parameters and general metadata as the keys llama.cpp's `nemotron_h_moe` loader reads."""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from cascade_local import __version__
from cascade_local.errors import CheckpointError

from .hf_config import NemotronHConfig

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.NEMOTRON_H_MOE]  # "nemotron_h_moe"


def write_hparams(meta: gguf.GGUFWriter, cfg: NemotronHConfig) -> None:
    moe, attn = cfg.layers_of("E"), cfg.layers_of("*")
    meta.add_vocab_size(cfg.vocab_size)
    meta.add_context_length(cfg.max_position_embeddings)
    meta.add_embedding_length(cfg.hidden_size)
    meta.add_block_count(cfg.n_layers)
    # llama.cpp tells layer kinds apart by these per-layer arrays: a layer with no KV heads and no
    # feed-forward width is recurrent (Mamba), one with KV heads is attention, one with width is MoE.
    meta.add_feed_forward_length([cfg.moe_intermediate_size if i in moe else 0 for i in range(cfg.n_layers)])
    meta.add_head_count(cfg.num_attention_heads)
    meta.add_head_count_kv([cfg.num_key_value_heads if i in attn else 0 for i in range(cfg.n_layers)])
    meta.add_key_length(cfg.head_dim)
    meta.add_value_length(cfg.head_dim)
    meta.add_layer_norm_eps(cfg.layer_norm_epsilon)
    meta.add_layer_norm_rms_eps(cfg.layer_norm_epsilon)

    meta.add_ssm_conv_kernel(cfg.conv_kernel)
    meta.add_ssm_inner_size(cfg.mamba_d_inner)
    meta.add_ssm_state_size(cfg.ssm_state_size)
    meta.add_ssm_time_step_rank(cfg.mamba_num_heads)
    meta.add_ssm_group_count(cfg.n_groups)

    meta.add_expert_count(cfg.n_routed_experts)
    meta.add_expert_used_count(cfg.num_experts_per_tok)
    meta.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    meta.add_expert_shared_feed_forward_length(cfg.moe_shared_expert_intermediate_size)
    meta.add_expert_shared_count(cfg.n_shared_experts)
    meta.add_expert_weights_norm(cfg.norm_topk_prob)
    meta.add_expert_weights_scale(float(cfg.routed_scaling_factor))
    meta.add_expert_group_count(cfg.n_group)
    meta.add_expert_group_used_count(cfg.topk_group)
    meta.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)


def write_general(meta: gguf.GGUFWriter, name: str, source: str, file_type: gguf.LlamaFileType,
                  recipe: str, size_label: str) -> None:
    meta.add_type(gguf.GGUFType.MODEL)
    meta.add_name(name)
    meta.add_size_label(size_label)
    meta.add_source_url(source) if source.startswith(("http://", "https://")) else meta.add_string(
        "general.source.path", source
    )
    meta.add_file_type(file_type)
    meta.add_quantization_version(gguf.GGML_QUANT_VERSION)
    meta.add_string("cascade_local.converter_version", __version__)
    meta.add_string("cascade_local.recipe", recipe)


def write_sampling_defaults(meta: gguf.GGUFWriter, folder: Path) -> None:
    """The publisher's recommended sampling (generation_config.json), which llama.cpp uses as defaults."""
    path = folder / "generation_config.json"
    try:
        gen = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if isinstance(gen.get("temperature"), (int, float)):
        meta.add_sampling_temp(float(gen["temperature"]))
    if isinstance(gen.get("top_p"), (int, float)):
        meta.add_sampling_top_p(float(gen["top_p"]))
    if isinstance(gen.get("top_k"), int):
        meta.add_sampling_top_k(gen["top_k"])


def size_label(cfg: NemotronHConfig, total_params: int, expert_params: int) -> str:
    """llama.cpp's label, e.g. 128x3.6B: shared parameters plus one expert's share, times the experts."""
    per_expert = expert_params // cfg.n_routed_experts
    return gguf.size_label(total_params, total_params - expert_params, per_expert, cfg.n_routed_experts)
