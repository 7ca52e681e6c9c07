"""ggml routines reached through the llama.cpp library that llama-cpp-python already loaded.

Using the loaded handle (not a second dlopen of libggml by path) keeps one copy of ggml in the
process, so its type tables and buffer types are the ones llama.cpp itself uses.
"""

from __future__ import annotations

import ctypes
import itertools
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import gguf
import numpy as np


@cache
def _lib() -> ctypes.CDLL:
    from cascade_local.llama_log import quiet_llama

    quiet_llama()
    import llama_cpp.llama_cpp as llama_cpp_lib

    lib = llama_cpp_lib._lib
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,  # enum ggml_type
        ctypes.c_void_p,  # const float * src
        ctypes.c_void_p,  # void * dst
        ctypes.c_int64,  # start (element index, a multiple of n_per_row)
        ctypes.c_int64,  # nrows
        ctypes.c_int64,  # n_per_row
        ctypes.c_void_p,  # const float * imatrix (may be NULL)
    ]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return lib


def default_threads() -> int:
    """Threads for ggml's work (quantizing, decoding) when none are asked for: the CPUs this process may use.

    The one place that decides it: affinity capped by a container's cgroup quota (cpus.available_cpus).
    """
    from cascade_local.cpus import available_cpus

    return available_cpus()


def row_spans(n_rows: int, parts: int) -> list[tuple[int, int]]:
    """[first, end) ranges that split n_rows rows into at most `parts` shares of nearly equal size, none empty."""
    bounds = np.linspace(0, n_rows, max(1, min(parts, n_rows)) + 1).astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a]


def quantize_into(
    values: np.ndarray,
    qtype: gguf.GGMLQuantizationType,
    out: np.ndarray,
    imatrix: np.ndarray | None = None,
) -> None:
    """Quantize float32 rows (C-contiguous, rows x n_per_row) into `out`, exactly their bytes, on this thread.

    The building block for callers that schedule their own threads; ctypes releases the GIL for the call.
    Rows are quantized independently, so any split of a matrix into row ranges gives the same bytes.
    """
    n_per_row = values.shape[-1]
    nrows = values.size // n_per_row if n_per_row else 0
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if n_per_row % block_size:
        raise ValueError(f"row width {n_per_row} is not a multiple of {qtype.name}'s block size {block_size}")
    if values.dtype != np.float32 or not values.flags.c_contiguous:
        raise ValueError("quantize_into needs C-contiguous float32 rows")
    if not out.flags.c_contiguous or out.nbytes != nrows * (n_per_row // block_size * type_size):
        raise ValueError(f"output buffer of {out.nbytes} bytes does not fit {nrows} rows of {qtype.name}")
    if nrows == 0:
        return
    lib = _lib()
    if imatrix is None and lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise ValueError(f"{qtype.name} needs an importance matrix")
    if imatrix is not None and (imatrix.dtype != np.float32 or imatrix.shape != (n_per_row,)):
        raise ValueError(f"importance matrix has shape {imatrix.shape}, expected ({n_per_row},) float32")
    imat_ptr = imatrix.ctypes.data if imatrix is not None else None
    written = lib.ggml_quantize_chunk(int(qtype), values.ctypes.data, out.ctypes.data, 0, nrows, n_per_row, imat_ptr)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")


def quantize_rows(
    values: np.ndarray,
    qtype: gguf.GGMLQuantizationType,
    imatrix: np.ndarray | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """Quantize a float32 matrix (rows x n_per_row) with ggml's own routine; returns the raw bytes.

    Rows are split across threads; ctypes releases the GIL during each call, so they run in parallel.
    """
    src = np.ascontiguousarray(values, dtype=np.float32)
    n_per_row = src.shape[-1]
    nrows = src.size // n_per_row if n_per_row else 0
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    row_bytes = n_per_row // block_size * type_size
    dst = np.empty(nrows * row_bytes, dtype=np.uint8)
    rows = src.reshape(nrows, n_per_row)
    imat = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)

    def run(first: int, end: int) -> None:  # quantize_into checks the arguments and the bytes written
        quantize_into(rows[first:end], qtype, dst[first * row_bytes : end * row_bytes], imat)

    spans = row_spans(nrows, threads or default_threads())
    if len(spans) <= 1:
        run(0, nrows)
    else:
        with ThreadPoolExecutor(len(spans)) as pool:
            list(pool.map(lambda span: run(*span), spans))
    return dst
