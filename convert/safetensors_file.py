"""Lazy, validating reader for one safetensors file.

The `safetensors` package cannot hand BF16 tensors to numpy (numpy has no bfloat16), and the converter
needs raw bytes anyway: BF16 passes through untouched to a BF16 GGUF. The format is an 8-byte header
length, a JSON header and a flat data block, so we memory-map the file and hand out views; nothing is
read from disk until a tensor is used. Every header field is checked against the file's real size,
so a truncated or corrupt shard fails with a message instead of a crash or a garbage tensor.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cascade_local.errors import CheckpointError

from .linux_calls import linux_libc_function

# safetensors dtype -> (numpy storage dtype, bytes per element). BF16 is stored as uint16 bit patterns.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

# A real header is a few hundred KB at most; anything near this is a corrupt length field.
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors spelling: "BF16", "F32", ...
    shape: tuple[int, ...]
    begin: int  # offsets relative to the start of the data block
    end: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """One shard: its header parsed and checked at open, tensors mapped on demand."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._fh = open(path, "rb")  # noqa: SIM115 - lives as long as the mapping
        except FileNotFoundError:
            raise CheckpointError(f"shard {path.name} is missing from {path.parent}") from None
        except OSError as exc:
            raise CheckpointError(f"cannot open shard {path}: {exc.strerror}") from None
        try:
            self.entries, self._data_start = self._read_header()
            size = os.fstat(self._fh.fileno()).st_size
            self._mmap = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except BaseException:
            self._fh.close()
            raise

    def _fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"shard {self.path.name} is corrupt or truncated: {what}")

    def _read_header(self) -> tuple[dict[str, TensorEntry], int]:
        size = os.fstat(self._fh.fileno()).st_size
        prefix = self._fh.read(8)
        if len(prefix) < 8:
            raise self._fail(f"file is {size} bytes, too short for a header")
        header_len = int.from_bytes(prefix, "little")
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise self._fail(f"header length {header_len} exceeds the file ({size} bytes)")
        raw = self._fh.read(header_len)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._fail(f"header is not valid JSON ({exc})") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        data_start = 8 + header_len
        data_len = size - data_start
        entries: dict[str, TensorEntry] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            entries[name] = self._parse_entry(name, info, data_len)
        return entries, data_start

    def _parse_entry(self, name: str, info: object, data_len: int) -> TensorEntry:
        if not isinstance(info, dict):
            raise self._fail(f"entry for {name} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPES:
            raise self._fail(f"{name} has unsupported dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise self._fail(f"{name} has an invalid shape {shape!r}")
        if not (
            isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
        ):
            raise self._fail(f"{name} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if not 0 <= begin <= end or end - begin != expected:
            raise self._fail(f"{name} spans bytes {begin}..{end}, but {dtype}{shape} needs {expected}")
        if end > data_len:
            raise self._fail(f"{name} ends at byte {end} of a {data_len}-byte data block")
        return TensorEntry(name, dtype, tuple(shape), begin, end)

    def raw(self, name: str) -> np.ndarray:
        """A read-only view of the tensor's stored elements (BF16 as uint16), shaped as stored."""
        entry = self.entries[name]
        if entry.nbytes == 0 or self._mmap is None:
            return np.zeros(entry.shape, dtype=DTYPES[entry.dtype])
        return np.frombuffer(
            self._mmap, dtype=DTYPES[entry.dtype], count=entry.n_elements, offset=self._data_start + entry.begin
        ).reshape(entry.shape)

    def release(self, name: str, first_byte: int = 0, end_byte: int | None = None) -> None:
        """Drop consumed bytes of a tensor (all of it by default) from this process's resident set.

        Mapped pages count towards RSS until the kernel reclaims them; without this, converting a
        63 GB checkpoint would look (and, under memory pressure, behave) like reading it all into RAM.
        Only whole pages inside the range are dropped, so a neighbour's pages are never touched twice.
        """
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        entry = self.entries[name]
        end = entry.end if end_byte is None else entry.begin + end_byte
        page = mmap.PAGESIZE
        start = -(-(self._data_start + entry.begin + first_byte) // page) * page
        length = (self._data_start + end) // page * page - start
        if length > 0:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, length)

    def file_span(self, name: str, first_byte: int = 0, end_byte: int | None = None) -> tuple[int, int, int]:
        """(file descriptor, offset in the file, length) of these bytes of a tensor, for in-kernel copies."""
        entry = self.entries[name]
        end = entry.nbytes if end_byte is None else end_byte
        return self._fh.fileno(), self._data_start + entry.begin + first_byte, max(0, end - first_byte)

    def prefetch(self, name: str, first_byte: int = 0, end_byte: int | None = None) -> None:
        """Read these bytes of a tensor ahead of the encoder (called on the read-ahead thread; it waits for the disk).

        posix_fadvise queues the whole range's reads at once; MADV_POPULATE_READ then maps the pages in, so
        the encoder does not stop at page faults. The pages count in this process's resident set until
        `release` drops them, so the read-ahead window bounds what this adds to the peak.
        """
        if self._mmap is None or not hasattr(os, "posix_fadvise"):
            return
        entry = self.entries[name]
        end = entry.nbytes if end_byte is None else end_byte
        if end > first_byte:
            os.posix_fadvise(self._fh.fileno(), self._data_start + entry.begin + first_byte, end - first_byte,
                             os.POSIX_FADV_WILLNEED)
            _populate(self._mmap, self._data_start + entry.begin + first_byte, end - first_byte)

    def close(self) -> None:
        # Views handed out keep the mapping alive; closing the map under them would crash numpy.
        self._fh.close()


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Widen BF16 bit patterns (uint16) to float32 exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """Round float32 to BF16 bit patterns, nearest-even, as torch and ggml do (NaN kept quiet)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Any stored float tensor as float32."""
    if dtype == "BF16":
        return bf16_to_f32(raw)
    return raw.astype(np.float32)



_MADV_POPULATE_READ = 22  # <linux/mman.h>, Linux 5.14+: map the range's pages in, reading them where needed


def _populate(mapped: mmap.mmap, offset: int, length: int) -> None:
    """Reads `length` bytes at `offset` of the map into memory and maps them, on the calling thread.

    ctypes lets go of the GIL for the call, so the read-ahead thread waits for the disk while the encoder works;
    the encoder then finds every page of its block mapped, where it would otherwise stop at page faults, some
    waiting for the disk. A kernel without MADV_POPULATE_READ refuses it (EINVAL), and the encoder faults as before.
    """
    madvise = linux_libc_function("madvise", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if madvise is None or length <= 0:
        return
    base = np.frombuffer(mapped, dtype=np.uint8).ctypes.data
    start = (base + offset) // mmap.PAGESIZE * mmap.PAGESIZE
    madvise(start, base + offset + length - start, _MADV_POPULATE_READ)
