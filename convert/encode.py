"""Turns a block of checkpoint rows into the bytes of one GGML type."""

from __future__ import annotations

import gguf
import numpy as np

from cascade_local.ggml import quantize_rows

from .safetensors_file import f32_to_bf16, to_f32

T = gguf.GGMLQuantizationType


def encode_rows(
    raw: np.ndarray,
    src_dtype: str,
    qtype: gguf.GGMLQuantizationType,
    threads: int | None = None,
    importance: np.ndarray | None = None,
) -> np.ndarray:
    """`raw` holds stored elements (BF16 as uint16); the result is little-endian bytes of `qtype`.

    `importance` (one weight per column) steers quantizers that use it; float types ignore it.
    """
    if qtype == T.BF16 and src_dtype == "BF16":
        return raw  # bit-exact pass-through: no rounding, no copy
    if qtype == T.F16 and src_dtype == "F16":
        return raw
    values = to_f32(raw, src_dtype)
    if qtype == T.F32:
        return values
    if qtype == T.F16:
        return values.astype(np.float16)
    if qtype == T.BF16:
        return f32_to_bf16(values)
    return quantize_rows(values.reshape(-1, values.shape[-1]), qtype, imatrix=importance, threads=threads)
