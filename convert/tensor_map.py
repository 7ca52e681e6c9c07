"""Which checkpoint tensors become which GGUF tensors, declared as tables.

Each row names the checkpoint tensor (relative to `backbone.layers.N.`), the GGUF tensor llama.cpp's
`nemotron_h_moe` loader asks for, the tensor's class (which the quantization policy keys on) and the
one transform it needs, if any. Code exists only for the transforms that really change values or
shapes: stacking per-expert tensors, A = -exp(A_log), and the Mamba reshapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from cascade_local.errors import CheckpointError

from .checkpoint import Checkpoint
from .hf_config import NemotronHConfig


class TensorClass(StrEnum):
    """What a tensor is, for choosing its type. `F32_ONLY` tensors are tiny and precision-critical."""

    TOKEN_EMBD = "token_embd"
    OUTPUT = "output"
    EXPERT_UP = "expert_up"
    EXPERT_DOWN = "expert_down"
    SHARED_UP = "shared_up"
    SHARED_DOWN = "shared_down"
    MAMBA_IN = "mamba_in"
    MAMBA_OUT = "mamba_out"
    ATTN_QKV = "attn_qkv"
    ATTN_OUT = "attn_out"
    F32_ONLY = "f32_only"  # norms, router, conv1d, A, D, dt bias


class Transform(StrEnum):
    NONE = "none"
    NEG_EXP = "neg_exp"  # ssm_a = -exp(A_log)


@dataclass(frozen=True)
class Row:
    source: str  # checkpoint name relative to the layer (or absolute for globals)
    target: str  # GGUF name, `{bid}` for the layer
    cls: TensorClass
    transform: Transform = Transform.NONE


GLOBAL_ROWS = (
    Row("backbone.embeddings.weight", "token_embd.weight", TensorClass.TOKEN_EMBD),
    Row("backbone.norm_f.weight", "output_norm.weight", TensorClass.F32_ONLY),
    Row("lm_head.weight", "output.weight", TensorClass.OUTPUT),
)

EVERY_LAYER_ROWS = (Row("norm.weight", "blk.{bid}.attn_norm.weight", TensorClass.F32_ONLY),)

LAYER_ROWS: dict[str, tuple[Row, ...]] = {
    "M": (
        Row("mixer.in_proj.weight", "blk.{bid}.ssm_in.weight", TensorClass.MAMBA_IN),
        Row("mixer.conv1d.weight", "blk.{bid}.ssm_conv1d.weight", TensorClass.F32_ONLY),
        Row("mixer.conv1d.bias", "blk.{bid}.ssm_conv1d.bias", TensorClass.F32_ONLY),
        Row("mixer.dt_bias", "blk.{bid}.ssm_dt.bias", TensorClass.F32_ONLY),
        Row("mixer.A_log", "blk.{bid}.ssm_a", TensorClass.F32_ONLY, Transform.NEG_EXP),
        Row("mixer.D", "blk.{bid}.ssm_d", TensorClass.F32_ONLY),
        Row("mixer.norm.weight", "blk.{bid}.ssm_norm.weight", TensorClass.F32_ONLY),
        Row("mixer.out_proj.weight", "blk.{bid}.ssm_out.weight", TensorClass.MAMBA_OUT),
    ),
    "*": (
        Row("mixer.q_proj.weight", "blk.{bid}.attn_q.weight", TensorClass.ATTN_QKV),
        Row("mixer.k_proj.weight", "blk.{bid}.attn_k.weight", TensorClass.ATTN_QKV),
        Row("mixer.v_proj.weight", "blk.{bid}.attn_v.weight", TensorClass.ATTN_QKV),
        Row("mixer.o_proj.weight", "blk.{bid}.attn_output.weight", TensorClass.ATTN_OUT),
    ),
    "E": (
        Row("mixer.gate.weight", "blk.{bid}.ffn_gate_inp.weight", TensorClass.F32_ONLY),
        Row("mixer.gate.e_score_correction_bias", "blk.{bid}.exp_probs_b.bias", TensorClass.F32_ONLY),
        Row("mixer.experts.{xid}.up_proj.weight", "blk.{bid}.ffn_up_exps.weight", TensorClass.EXPERT_UP),
        Row("mixer.experts.{xid}.down_proj.weight", "blk.{bid}.ffn_down_exps.weight", TensorClass.EXPERT_DOWN),
        Row("mixer.shared_experts.up_proj.weight", "blk.{bid}.ffn_up_shexp.weight", TensorClass.SHARED_UP),
        Row("mixer.shared_experts.down_proj.weight", "blk.{bid}.ffn_down_shexp.weight", TensorClass.SHARED_DOWN),
    ),
}


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor: where its values come from and the shape llama.cpp expects (numpy order)."""

    name: str
    cls: TensorClass
    layer: int | None
    sources: tuple[str, ...]  # several for stacked experts, in expert order
    shape: tuple[int, ...]
    transform: Transform

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def stacked(self) -> bool:
        """True for per-expert checkpoint tensors stacked into one GGUF tensor (experts outermost)."""
        return self.cls in (TensorClass.EXPERT_UP, TensorClass.EXPERT_DOWN)

    @property
    def row_width(self) -> int:
        return self.shape[-1]


def expected_shapes(cfg: NemotronHConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint shapes (relative names) by layer kind, as transformers lays them out."""
    h, heads = cfg.hidden_size, cfg.mamba_num_heads
    q_dim, kv_dim = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {
        "mixer.in_proj.weight": (cfg.mamba_in_proj_dim, h),
        "mixer.conv1d.weight": (cfg.mamba_conv_dim, 1, cfg.conv_kernel),
        "mixer.conv1d.bias": (cfg.mamba_conv_dim,),
        "mixer.dt_bias": (heads,),
        "mixer.A_log": (heads,),
        "mixer.D": (heads,),
        "mixer.norm.weight": (cfg.mamba_d_inner,),
        "mixer.out_proj.weight": (h, cfg.mamba_d_inner),
        "mixer.q_proj.weight": (q_dim, h),
        "mixer.k_proj.weight": (kv_dim, h),
        "mixer.v_proj.weight": (kv_dim, h),
        "mixer.o_proj.weight": (h, q_dim),
        "mixer.gate.weight": (cfg.n_routed_experts, h),
        "mixer.gate.e_score_correction_bias": (cfg.n_routed_experts,),
        "mixer.experts.{xid}.up_proj.weight": (cfg.moe_intermediate_size, h),
        "mixer.experts.{xid}.down_proj.weight": (h, cfg.moe_intermediate_size),
        "mixer.shared_experts.up_proj.weight": (cfg.moe_shared_expert_intermediate_size, h),
        "mixer.shared_experts.down_proj.weight": (h, cfg.moe_shared_expert_intermediate_size),
        "norm.weight": (h,),
        "backbone.embeddings.weight": (cfg.vocab_size, h),
        "backbone.norm_f.weight": (h,),
        "lm_head.weight": (cfg.vocab_size, h),
    }


def _gguf_shape(row: Row, source_shape: tuple[int, ...], cfg: NemotronHConfig) -> tuple[int, ...]:
    """The shape llama.cpp's loader expects, in numpy (outermost-first) order."""
    if row.source == "mixer.conv1d.weight":
        return (source_shape[0], source_shape[2])  # drop the depthwise channel axis
    if row.source in ("mixer.A_log", "mixer.D"):
        return (source_shape[0], 1)
    if row.source == "mixer.norm.weight":
        return (cfg.n_groups, cfg.mamba_d_inner // cfg.n_groups)
    if "{xid}" in row.source:
        return (cfg.n_routed_experts, *source_shape)
    return source_shape


def plan_tensors(ckpt: Checkpoint) -> list[PlannedTensor]:
    """Every GGUF tensor in writing order, checked against the checkpoint: nothing missing, nothing left over."""
    cfg = ckpt.config
    shapes = expected_shapes(cfg)
    used: set[str] = set()
    planned: list[PlannedTensor] = []

    def add(row: Row, layer: int | None) -> None:
        prefix = "" if layer is None else f"backbone.layers.{layer}."
        if "{xid}" in row.source:
            sources = tuple(prefix + row.source.format(xid=x) for x in range(cfg.n_routed_experts))
        else:
            sources = (prefix + row.source,)
        for name in sources:
            actual = ckpt.entry(name).shape
            if actual != shapes[row.source]:
                raise CheckpointError(
                    f"{name} has shape {list(actual)}, but config.json implies {list(shapes[row.source])}"
                )
            if ckpt.entry(name).dtype not in ("BF16", "F16", "F32"):
                raise CheckpointError(f"{name} is stored as {ckpt.entry(name).dtype}; expected a float type")
        used.update(sources)
        target = row.target.format(bid=layer)
        shape = _gguf_shape(row, shapes[row.source], cfg)
        planned.append(PlannedTensor(target, row.cls, layer, sources, shape, row.transform))

    add(GLOBAL_ROWS[0], None)
    for layer, kind in enumerate(cfg.pattern):
        for row in (*EVERY_LAYER_ROWS, *LAYER_ROWS[kind]):
            if row.source == "mixer.conv1d.bias" and not cfg.use_conv_bias:
                continue
            add(row, layer)
    add(GLOBAL_ROWS[1], None)
    if not cfg.tie_word_embeddings or ckpt.has("lm_head.weight"):
        add(GLOBAL_ROWS[2], None)

    leftover = sorted(set(ckpt.tensor_names) - used)
    if leftover:
        more = f" and {len(leftover) - 3} more" if len(leftover) > 3 else ""
        names = ", ".join(leftover[:3])
        raise CheckpointError(f"the checkpoint has tensors this converter does not map: {names}{more}")
    return planned


TransformFn = Callable[[np.ndarray], np.ndarray]

TRANSFORMS: dict[Transform, TransformFn] = {
    Transform.NONE: lambda x: x,
    Transform.NEG_EXP: lambda x: -np.exp(x.astype(np.float32)),
}
