"""Random Nemotron-H MoE checkpoints in the real on-disk layout: the tiny test fixture and real-width slices.

Layout as the published checkpoint: `backbone.*` names, one tensor per expert, BF16 weights with the
FP32 tensors the real model keeps in FP32 (A_log, D, dt_bias, router weight and bias), at least two
shards with an index. Weights are scaled well above transformers' 0.02 init so that every layer
changes the residual stream and the output distribution is far from uniform: a KL test on
near-uniform logits would prove nothing.

    python -m cascade_local.testing.checkpoint_fixture tiny OUT_DIR
    python -m cascade_local.testing.checkpoint_fixture slice OUT_DIR --pattern MEM*E
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .safetensors_writer import TensorSpec, write_shards
from .tokenizer_fixture import write_tokenizer_files

TINY_CONFIG: dict[str, Any] = {
    "architectures": ["NemotronHForCausalLM"],
    "model_type": "nemotron_h",
    "hidden_size": 128,
    "hybrid_override_pattern": "MEM*E",
    "num_hidden_layers": 5,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "moe_intermediate_size": 64,
    "moe_shared_expert_intermediate_size": 96,
    "mlp_hidden_act": "relu2",
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "n_group": 1,
    "topk_group": 1,
    "mamba_num_heads": 8,
    "mamba_head_dim": 16,
    "ssm_state_size": 16,
    "n_groups": 2,
    "conv_kernel": 4,
    "chunk_size": 16,
    "expand": 2,
    "mamba_hidden_act": "silu",
    "mamba_ssm_cache_dtype": "float32",
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 1024,
    "max_position_embeddings": 4096,
    "layer_norm_epsilon": 1e-05,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "use_conv_bias": True,
    "use_bias": False,
    "attention_bias": False,
    "mamba_proj_bias": False,
    "mlp_bias": False,
}

GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": [2, 11], "pad_token_id": 0, "do_sample": True,
                     "temperature": 1.0, "top_p": 0.95}


def real_config() -> dict[str, Any]:
    """The published Nemotron-Cascade-2 hyper-parameters (a copy of shared/reference's config)."""
    return json.loads(resources.files("cascade_local.testing").joinpath("nemotron-cascade-2-config.json").read_text())


def chat_template() -> str:
    return resources.files("cascade_local").joinpath("templates/nemotron-cascade-2.jinja").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Scales:
    """How strongly each part acts: enough that outputs discriminate, not so much that rounding flips routes."""

    output: float = 10.0  # lm_head: sets how peaked the next-token distribution is
    router: float = 2.0  # router logits' spread
    router_bias: float = 0.1  # e_score_correction_bias spread
    dt_rows: float = 0.3  # in_proj rows feeding dt: small keeps softplus(dt) well above dt_min
    expert_down: float = 0.5


def tensor_specs(cfg: dict[str, Any], seed: int, scales: Scales) -> list[TensorSpec]:
    """Every tensor of the checkpoint in `save_pretrained` order, with lazily drawn values."""
    h = cfg["hidden_size"]
    heads, head_dim = cfg["mamba_num_heads"], cfg["mamba_head_dim"]
    d_inner = heads * head_dim
    conv_dim = d_inner + 2 * cfg["n_groups"] * cfg["ssm_state_size"]
    q_dim, kv_dim = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    n_exp, ff, ff_sh = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["moe_shared_expert_intermediate_size"]
    specs: list[TensorSpec] = []
    counter = iter(range(1 << 30))

    def add(name: str, shape: tuple[int, ...], fill: str, dtype: str = "BF16", scale: float = 1.0) -> None:
        # Each tensor has its own stream so a slice's values do not depend on the order of generation.
        stream = next(counter)

        def draw() -> np.ndarray:
            rng = np.random.default_rng([seed, stream])
            if fill == "linear":  # rows of unit-ish output: std 1/sqrt(fan_in)
                return (rng.standard_normal(shape, dtype=np.float32) * (scale / np.sqrt(shape[-1]))).astype(np.float32)
            if fill == "norm":
                return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
            if fill == "normal":
                return (scale * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
            if fill == "a_log":  # A in [1, 16], as Mamba-2 initialises it
                return np.log(rng.uniform(1.0, 16.0, shape)).astype(np.float32)
            if fill == "dt_bias":  # softplus^-1 of dt in [0.01, 0.1]
                dt = rng.uniform(0.01, 0.1, shape)
                return (dt + np.log(-np.expm1(-dt))).astype(np.float32)
            if fill == "in_proj":  # the dt rows (last `heads`) kept small so softplus(dt) stays >> dt_min
                w = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1])
                w[-heads:] *= scales.dt_rows
                return w.astype(np.float32)
            raise ValueError(fill)

        specs.append(TensorSpec(name, dtype, shape, draw))

    add("backbone.embeddings.weight", (cfg["vocab_size"], h), "normal")
    for i, kind in enumerate(cfg["hybrid_override_pattern"]):
        p = f"backbone.layers.{i}."
        if kind == "M":
            add(p + "mixer.A_log", (heads,), "a_log", "F32")
            add(p + "mixer.D", (heads,), "norm", "F32")
            add(p + "mixer.conv1d.bias", (conv_dim,), "normal", scale=0.1)
            add(p + "mixer.conv1d.weight", (conv_dim, 1, cfg["conv_kernel"]), "normal", scale=0.5)
            add(p + "mixer.dt_bias", (heads,), "dt_bias", "F32")
            add(p + "mixer.in_proj.weight", (2 * d_inner + 2 * cfg["n_groups"] * cfg["ssm_state_size"] + heads, h),
                "in_proj")
            add(p + "mixer.norm.weight", (d_inner,), "norm")
            add(p + "mixer.out_proj.weight", (h, d_inner), "linear")
        elif kind == "*":
            add(p + "mixer.k_proj.weight", (kv_dim, h), "linear")
            add(p + "mixer.o_proj.weight", (h, q_dim), "linear")
            add(p + "mixer.q_proj.weight", (q_dim, h), "linear", scale=2.0)
            add(p + "mixer.v_proj.weight", (kv_dim, h), "linear")
        elif kind == "E":
            for x in range(n_exp):
                add(p + f"mixer.experts.{x}.down_proj.weight", (h, ff), "linear", scale=scales.expert_down)
                add(p + f"mixer.experts.{x}.up_proj.weight", (ff, h), "linear")
            add(p + "mixer.gate.e_score_correction_bias", (n_exp,), "normal", "F32", scale=scales.router_bias)
            add(p + "mixer.gate.weight", (n_exp, h), "linear", "F32", scale=scales.router)
            add(p + "mixer.shared_experts.down_proj.weight", (h, ff_sh), "linear", scale=scales.expert_down)
            add(p + "mixer.shared_experts.up_proj.weight", (ff_sh, h), "linear")
        add(p + "norm.weight", (h,), "norm")
    add("backbone.norm_f.weight", (h,), "norm")
    add("lm_head.weight", (cfg["vocab_size"], h), "linear", scale=scales.output)
    return specs


def write_checkpoint(folder: Path, cfg: dict[str, Any], *, seed: int, scales: Scales,
                     shard_bytes: int, tokenizer_vocab: int = 1024) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    write_tokenizer_files(folder, chat_template(), vocab_size=tokenizer_vocab)
    write_shards(folder, tensor_specs(cfg, seed, scales), shard_bytes=shard_bytes)
    return folder


# Calibrated so rounding noise at the level of llama.cpp's CPU kernels (BF16 or Q8_0 activations) rarely
# flips an expert choice, as in a trained model, while the top token still averages ~0.3 probability.
TINY_SCALES = Scales(output=3.0, router=1.0, router_bias=0.5, expert_down=0.25)


def write_tiny_checkpoint(folder: Path, seed: int = 0, scales: Scales = TINY_SCALES) -> Path:
    """About 1.6 MB: every layer kind, two MoE layers, attention not first, three shards."""
    return write_checkpoint(folder, TINY_CONFIG, seed=seed, scales=scales, shard_bytes=700_000)


# As the tiny fixture's, with an output scale that gives the top of 131,072 tokens ~0.4 probability.
SLICE_SCALES = Scales(output=5.0, router=1.0, router_bias=0.5, expert_down=0.25)


def slice_config(pattern: str) -> dict[str, Any]:
    cfg = real_config()
    cfg["hybrid_override_pattern"] = pattern
    cfg["num_hidden_layers"] = len(pattern)
    return cfg


def write_slice_checkpoint(folder: Path, pattern: str = "MEM*E", seed: int = 0) -> Path:
    """Real widths, few layers (`MEM*E` is 3.4 B parameters, 6.8 GB); written one tensor at a time."""
    return write_checkpoint(folder, slice_config(pattern), seed=seed, scales=SLICE_SCALES, shard_bytes=2 << 30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["tiny", "slice"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--pattern", default="MEM*E", help="layer pattern of a slice (M, E, *)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.kind == "tiny":
        write_tiny_checkpoint(args.out, args.seed)
    else:
        write_slice_checkpoint(args.out, args.pattern, args.seed)
    print(args.out)


if __name__ == "__main__":
    main()
