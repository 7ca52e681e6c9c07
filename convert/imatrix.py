"""Importance matrices produced by llama.cpp's `llama-imatrix`, in its GGUF or legacy `.dat` format.

Both hold, per GGUF tensor name, the mean squared activation of each input column, one row of
`n_per_row` values per expert for stacked expert tensors. They are normalised here exactly as
llama-quantize does: GGUF `in_sum2 / counts` per matrix (1 where a matrix saw no data), legacy
values divided by their call count.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from cascade_local.errors import UsageError

Imatrix = dict[str, np.ndarray]  # tensor name -> float32 [n_matrices, n_per_row]


def load_imatrix(path: Path) -> Imatrix:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read importance matrix {path}: {exc.strerror}") from None
    try:
        entries = _from_gguf(path) if data[:4] == b"GGUF" else _from_legacy(data)
    except (ValueError, struct.error, IndexError, KeyError) as exc:
        raise UsageError(f"{path} is not a llama.cpp importance matrix: {exc}") from None
    if not entries:
        raise UsageError(f"{path} holds no importance data")
    return entries


def _from_gguf(path: Path) -> Imatrix:
    import gguf

    reader = gguf.GGUFReader(path)
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    entries: Imatrix = {}
    for name, sums in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name.removesuffix(".in_sum2")
        counts = tensors[f"{base}.counts"].reshape(-1)
        sums = sums.reshape(len(counts), -1)
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.where(counts[:, None] > 0, sums / counts[:, None], 1.0)
        entries[base] = values.astype(np.float32)
    return entries


def _from_legacy(data: bytes) -> Imatrix:
    (n_entries,) = struct.unpack_from("<i", data, 0)
    if not 0 < n_entries < 1_000_000:
        raise ValueError(f"implausible entry count {n_entries}")
    pos = 4
    entries: Imatrix = {}
    for _ in range(n_entries):
        (length,) = struct.unpack_from("<i", data, pos)
        if not 0 < length <= 4096:
            raise ValueError(f"implausible name length {length} at byte {pos}")
        name = data[pos + 4 : pos + 4 + length].decode("utf-8")
        pos += 4 + length
        ncall, nval = struct.unpack_from("<ii", data, pos)
        pos += 8
        if nval <= 0 or pos + 4 * nval > len(data):
            raise ValueError(f"entry {name} claims {nval} values past the end of the file")
        values = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        entries[name] = values / ncall if ncall > 0 else values
    return entries


def rows_for(imatrix: Imatrix | None, tensor_name: str, n_matrices: int, n_per_row: int) -> np.ndarray | None:
    """The importance rows for one GGUF tensor, shaped [n_matrices, n_per_row], or None if absent."""
    if imatrix is None or tensor_name not in imatrix:
        return None
    values = imatrix[tensor_name]
    if values.size != n_matrices * n_per_row:
        raise UsageError(f"importance matrix for {tensor_name} has {values.size} values, "
                         f"expected {n_matrices} x {n_per_row}: was it made for another model?")
    return values.reshape(n_matrices, n_per_row)
