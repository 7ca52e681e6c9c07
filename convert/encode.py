"""Turns a block of checkpoint rows into the bytes of one GGML type."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from types import TracebackType

import gguf
import numpy as np

from cascade_local.ggml import default_threads, quantize_into, quantize_rows, row_spans

from . import mxfp4
from .safetensors_file import f32_to_bf16, to_f32

T = gguf.GGMLQuantizationType

# A quantizing thread widens this many values at a time into its own F32 buffer (256 KB, which stays in the
# core's cache) and quantizes them at once: widening a whole 32 MB block first sent a 64 MB F32 copy through
# memory and cost about as much as reading the block (see the README's profile).
CHUNK_VALUES = 64 * 1024
# The MXFP4 table encoder (mxfp4.py) is a dozen numpy calls per piece; some hold the GIL, and with pieces this
# small two threads ran 1.3x one. At 256k values (1 MB of F32) they run 1.8x one, and 1.6x ggml's two threads.
TABLE_CHUNK_VALUES = 256 * 1024


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


def widen_into(raw: np.ndarray, src_dtype: str, out: np.ndarray) -> None:
    """Stored elements to float32 in `out` (same shape), exactly as `to_f32` does, without a temporary."""
    if src_dtype == "BF16":
        # BF16 is the high half of an F32: one pass, straight into the buffer.
        np.left_shift(raw, 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(out, raw, casting="safe")


class BlockEncoder:
    """`encode_rows` for a stream of blocks, with one set of threads for the whole conversion.

    A quantized block is split into one share of rows per thread; each thread widens and quantizes its
    share in cache-sized pieces (`CHUNK_VALUES`). numpy and ggml release the GIL, so the shares run in
    parallel. Float types go through `encode_rows` unchanged. The bytes are the same either way: ggml
    quantizes each row by itself. MXFP4 from BF16 goes through `mxfp4.encode_bf16` (ggml's bytes, from a
    table instead of ggml's per-value search), and a piece it refuses through ggml.
    """

    def __init__(self, threads: int | None = None):
        self.threads = max(1, threads or default_threads())
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="encode") if self.threads > 1 else None

    def __enter__(self) -> BlockEncoder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def encode(self, raw: np.ndarray, src_dtype: str, qtype: gguf.GGMLQuantizationType,
               importance: np.ndarray | None = None) -> np.ndarray:
        if qtype in (T.F32, T.F16, T.BF16) or src_dtype not in ("BF16", "F16", "F32"):
            return encode_rows(raw, src_dtype, qtype, self.threads, importance)
        rows = raw.reshape(-1, raw.shape[-1])
        n_rows, n_per_row = rows.shape
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if n_per_row % block_size:
            raise ValueError(f"row width {n_per_row} is not a multiple of {qtype.name}'s block size {block_size}")
        row_bytes = n_per_row // block_size * type_size
        out = np.empty(n_rows * row_bytes, dtype=np.uint8)
        imat = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
        by_table = qtype == T.MXFP4 and src_dtype == "BF16"
        step = max(1, (TABLE_CHUNK_VALUES if by_table else CHUNK_VALUES) // max(1, n_per_row))

        def share(first: int, end: int) -> None:
            scratch = np.empty((min(step, end - first), n_per_row), dtype=np.float32)
            for a in range(first, end, step):
                b = min(a + step, end)
                values, encoded = scratch[: b - a], out[a * row_bytes : b * row_bytes]
                if by_table and mxfp4.encode_bf16(rows[a:b], values, encoded):
                    continue
                widen_into(rows[a:b], src_dtype, values)
                quantize_into(values, qtype, encoded, imat)

        spans = row_spans(n_rows, self.threads)
        if self._pool is None or len(spans) == 1:
            for a, b in spans:
                share(a, b)
        else:
            for future in [self._pool.submit(share, a, b) for a, b in spans]:
                future.result()
        return out
