"""The table-driven MXFP4 encoder writes exactly ggml's bytes, and hands ggml what it cannot encode exactly."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from cascade_local.convert.mxfp4 import BLOCK, BLOCK_BYTES, MIN_EXPONENT_FIELD, encode_bf16

from cascade_local.ggml import quantize_into

T = gguf.GGMLQuantizationType


def ggml_bytes(raw: np.ndarray) -> np.ndarray:
    values = (raw.astype(np.uint32) << 16).view(np.float32).reshape(-1, BLOCK)
    out = np.empty(values.shape[0] * BLOCK_BYTES, dtype=np.uint8)
    quantize_into(np.ascontiguousarray(values), T.MXFP4, out)
    return out


def ours(raw: np.ndarray) -> np.ndarray | None:
    out = np.full(raw.size // BLOCK * BLOCK_BYTES, 0xAB, dtype=np.uint8)
    return out if encode_bf16(raw, np.empty(raw.size, dtype=np.float32), out) else None


def bf16(values: np.ndarray) -> np.ndarray:
    return (np.asarray(values, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


def encodable_patterns() -> np.ndarray:
    """Every BF16 bit pattern the table may see as a value: finite, either zero or not tiny."""
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    exponent = (patterns >> 7) & 0xFF
    return patterns[(exponent < 0xFF) & ((exponent >= MIN_EXPONENT_FIELD) | ((patterns & 0x7FFF) == 0))]


def test_every_bf16_value_in_every_position_of_a_block_gives_ggml_bytes():
    """All ~58k values, in blocks whose maximum is each value itself (in order) and in random company."""
    patterns = encodable_patterns()
    patterns = patterns[: patterns.size // BLOCK * BLOCK]
    rng = np.random.default_rng(0)
    for raw in (patterns, rng.permutation(patterns), np.roll(patterns, 7)):
        assert np.array_equal(ours(raw), ggml_bytes(raw))


def test_every_value_against_every_scale_gives_ggml_bytes():
    """Each block holds one maximum (one per exponent, every significand) and 31 values at and below it:
    exact ties between two E2M1 values, values just either side of them, signs, zeros and values so small
    beside the maximum that they vanish when scaled."""
    rng = np.random.default_rng(1)
    blocks = []
    for exponent in range(MIN_EXPONENT_FIELD, 0xFF):
        for mantissa in range(0, 128, 5):
            top = np.uint16((exponent << 7) | mantissa)
            amax = (np.uint32(top) << 16).view(np.float32)
            d = np.float32(2.0) ** (int(exponent) - 130)
            ties = np.array([0.5, 1.5, 2.5, 3.5, 5, 7, 10], dtype=np.float32) * d
            near = np.concatenate([ties, np.nextafter(ties, np.float32(0)), np.nextafter(ties, np.float32(np.inf))])
            company = np.concatenate([near, -near, [0.0, -0.0, amax * 1e-30]])[: BLOCK - 1]
            company = company[np.abs(company) <= amax]
            rest = rng.uniform(-1, 1, BLOCK - 1 - company.size).astype(np.float32) * amax
            blocks.append(np.concatenate([[amax], company, rest]).astype(np.float32))
    raw = bf16(np.concatenate(blocks))
    assert np.array_equal(ours(raw), ggml_bytes(raw))


def test_weight_like_values_and_zero_blocks_give_ggml_bytes():
    rng = np.random.default_rng(2)
    values = rng.standard_normal(BLOCK * 4096).astype(np.float32) * 0.02
    values[: 3 * BLOCK] = 0.0  # all-zero blocks: exponent 0
    values[5 * BLOCK : 6 * BLOCK] = -0.0
    raw = bf16(values)
    assert np.array_equal(ours(raw), ggml_bytes(raw))


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan, 2.0**-110])
def test_a_block_the_table_cannot_encode_exactly_is_left_to_ggml(bad):
    """Infinities, NaNs and tiny scales: refused, and the output left as it was."""
    values = np.random.default_rng(3).standard_normal(BLOCK * 8).astype(np.float32)
    values[BLOCK * 5 : BLOCK * 6] = np.float32(bad)
    raw = bf16(values)
    out = np.full(raw.size // BLOCK * BLOCK_BYTES, 0xAB, dtype=np.uint8)
    assert not encode_bf16(raw, np.empty(raw.size, dtype=np.float32), out)
    assert (out == 0xAB).all()
