"""A GGUF header reader for untrusted files: every count, length and offset is checked before it is used.

gguf-py's `GGUFReader` trusts the file: an absurd array count makes it loop for hours, and a bad tensor
type raises whatever numpy raises. This reader walks the header through a buffered file (never the whole
file, never an mmap: real models are tens of GB, their headers tens of MB) and refuses anything a valid
file cannot contain, with one `ModelLoadError` line that names the problem and its byte offset.

Work and memory are bounded twice: by the file's real size (a count can never promise more bytes than
are left) and by caps no real model comes near (`MAX_*` below), so a large hostile file is refused too.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from cascade_local.errors import ModelLoadError, ModelNotFoundError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4

# Caps far above any real model (a 262k-token vocabulary, a 20 MB tokenizer.json, ~10k tensors).
MAX_KEY_BYTES = 64 * 1024
MAX_NAME_BYTES = 64 * 1024
MAX_STRING_BYTES = 256 * 1024 * 1024
MAX_KV_COUNT = 1 << 16
MAX_TENSOR_COUNT = 1 << 20
MAX_ARRAY_ITEMS = 1 << 23  # over all arrays together: what bounds the memory of decoded metadata
MAX_HEADER_BYTES = 1 << 30
MAX_ARRAY_DEPTH = 2  # an array of arrays of scalars; llama.cpp itself refuses any nesting

# The fewest bytes one entry can take, so a count can be checked against the bytes left before looping.
MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, a one-byte value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset
INT64_MAX = (1 << 63) - 1

_SCALARS: dict[GGUFValueType, tuple[str, str]] = {  # struct code, numpy dtype (without byte order)
    GGUFValueType.UINT8: ("B", "u1"),
    GGUFValueType.INT8: ("b", "i1"),
    GGUFValueType.UINT16: ("H", "u2"),
    GGUFValueType.INT16: ("h", "i2"),
    GGUFValueType.UINT32: ("I", "u4"),
    GGUFValueType.INT32: ("i", "i4"),
    GGUFValueType.FLOAT32: ("f", "f4"),
    GGUFValueType.BOOL: ("B", "u1"),
    GGUFValueType.UINT64: ("Q", "u8"),
    GGUFValueType.INT64: ("q", "i8"),
    GGUFValueType.FLOAT64: ("d", "f8"),
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry.

    `shape` is in ggml order (innermost dimension first), as stored in the file, as llama.cpp prints it
    and as gguf-py's `ReaderTensor.shape`; `numpy_shape` is the reverse. `offset` is the absolute byte
    offset of the tensor's data in the file (not relative to the data section, as stored).
    """

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def numpy_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))


@dataclass(frozen=True)
class GGUFFile:
    """A GGUF file's header, checked: its metadata decoded in full and its tensors' places in the file."""

    path: Path
    version: int
    file_size: int
    alignment: int
    data_offset: int  # where the data section starts (the aligned end of the tensor infos)
    metadata: dict[str, Any] = field(repr=False)  # str, int, float, bool, or (nested) lists of them
    tensors: list[TensorInfo] = field(repr=False)
    big_endian: bool = False

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None


def read_gguf(path: Path | str) -> GGUFFile:
    """Read and check a GGUF file's header and tensor table (not its weights).

    Raises ModelNotFoundError when there is no such file, and ModelLoadError when it is not a GGUF file,
    is damaged or truncated, or claims more than it could hold; the message is one line.
    """
    path = Path(path)
    try:
        with open(path, "rb", buffering=1 << 20) as fh:
            return _Parser(fh, path, os.fstat(fh.fileno()).st_size).parse()
    except FileNotFoundError:
        raise ModelNotFoundError(f"model file {path} does not exist") from None
    except IsADirectoryError:
        raise ModelLoadError(f"{path} is a folder, not a GGUF file") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from None


def human_bytes(n: int | float, digits: int = 1, kilo: str = "kB") -> str:
    """1234567 -> '1.2 MB' (decimal units, as file managers and `ls -lh --si` show them)."""
    for unit in ("B", kilo, "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def printable(text: str, limit: int = 80) -> str:
    """A file-supplied string made safe for a one-line message: control characters escaped, length capped."""
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text[:limit])
    return shown + ("…" if len(text) > limit else "")


class _Parser:
    def __init__(self, fh: IO[bytes], path: Path, size: int):
        self.fh = fh
        self.path = path
        self.size = size
        self.pos = 0
        self.end = min(size, MAX_HEADER_BYTES)  # the header must end before this
        self.order = "<"
        self.items_left = MAX_ARRAY_ITEMS

    # -- errors --------------------------------------------------------------------------------------------

    def damaged(self, problem: str, at: int | None = None) -> ModelLoadError:
        where = self.pos if at is None else at
        return ModelLoadError(f"{self.path} is damaged: {problem} (at byte {where})")

    def left(self) -> int:
        return self.end - self.pos

    def room(self) -> str:
        """How much there is to hold the header, for 'exceeds what ... can hold' messages."""
        if self.size > MAX_HEADER_BYTES:
            return f"a GGUF header (at most {human_bytes(MAX_HEADER_BYTES)})"
        return f"a {human_bytes(self.size)} file"

    # -- primitives ----------------------------------------------------------------------------------------

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            if self.end < self.size:
                raise self.damaged(f"{what} ({n} bytes) runs past the {human_bytes(MAX_HEADER_BYTES)} header limit")
            raise self.damaged(f"the file ends inside {what} (truncated at {self.size} bytes)")
        data = self.fh.read(n)
        if len(data) != n:  # the file shrank while we read it
            raise self.damaged(f"the file ends inside {what} (it changed while being read)")
        self.pos += n
        return data

    def scalar(self, vtype: GGUFValueType, what: str) -> Any:
        code, _ = _SCALARS[vtype]
        (value,) = struct.unpack(self.order + code, self.take(struct.calcsize(code), what))
        return value != 0 if vtype == GGUFValueType.BOOL else value

    def u32(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT64, what)

    def string(self, what: str, cap: int = MAX_STRING_BYTES) -> str:
        at = self.pos
        n = self.u64(f"the length of {what}")
        if n > cap:
            raise self.damaged(f"{what} claims {n} bytes, more than the {human_bytes(cap)} any real file uses", at)
        if n > self.left():
            raise self.damaged(f"{what} claims {n} bytes, more than the {self.left()} left in {self.room()}", at)
        return self.take(n, what).decode("utf-8", errors="replace")

    # -- structure -----------------------------------------------------------------------------------------

    def parse(self) -> GGUFFile:
        if self.size == 0:
            raise ModelLoadError(f"{self.path} is empty, not a GGUF file")
        head = self.fh.read(4)
        if head != MAGIC:
            raise ModelLoadError(f"{self.path} is not a GGUF file (it starts with {head!r}, not {MAGIC!r})")
        self.pos = 4
        version = self.version()
        n_tensors = self.count("tensor count", MIN_TENSOR_INFO_BYTES, MAX_TENSOR_COUNT, reserve=0)
        n_kv = self.count("metadata key count", MIN_KV_BYTES, MAX_KV_COUNT, reserve=n_tensors * MIN_TENSOR_INFO_BYTES)
        metadata = self.metadata(n_kv)
        alignment = self.alignment(metadata)
        entries = [self.tensor_info(i) for i in range(n_tensors)]
        data_offset = -(-self.pos // alignment) * alignment
        tensors = self.place(entries, data_offset, alignment)
        return GGUFFile(self.path, version, self.size, alignment, data_offset, metadata, tensors, self.order == ">")

    def version(self) -> int:
        at = self.pos
        raw = self.take(4, "the version")
        version = struct.unpack("<I", raw)[0]
        if version & 0xFFFF == 0 and struct.unpack(">I", raw)[0] in SUPPORTED_VERSIONS:
            self.order, version = ">", struct.unpack(">I", raw)[0]  # written on a big-endian machine
        if version == 1:
            raise ModelLoadError(f"{self.path} is a GGUF version 1 file, which llama.cpp no longer reads; "
                                 "convert the model again")
        if version not in SUPPORTED_VERSIONS:
            raise ModelLoadError(f"{self.path} says it is GGUF version {version} (at byte {at}); "
                                 "this reader knows versions 2 and 3")
        return version

    def count(self, what: str, min_bytes: int, cap: int, reserve: int) -> int:
        at = self.pos
        n = self.u64(what)
        if n * min_bytes > self.left() - reserve:
            raise self.damaged(f"{what} {n} exceeds what {self.room()} can hold", at)
        if n > cap:
            raise self.damaged(f"{what} {n} is more than the {cap} any real model has", at)
        return n

    def metadata(self, n_kv: int) -> dict[str, Any]:
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            at = self.pos
            key = self.string("a metadata key", MAX_KEY_BYTES)
            if key in metadata:
                raise self.damaged(f"metadata key '{printable(key)}' appears twice", at)
            vtype = self.value_type(f"the type of '{printable(key)}'")
            if key == "general.alignment" and vtype != GGUFValueType.UINT32:
                # llama.cpp reads it as u32 and aborts the whole process on any other type.
                raise self.damaged(f"general.alignment has type {vtype.name}; it must be UINT32", at)
            metadata[key] = self.value(vtype, key, depth=0)
        return metadata

    def value_type(self, what: str) -> GGUFValueType:
        at = self.pos
        raw = self.u32(what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.damaged(f"{what} is {raw}, not a GGUF value type", at) from None

    def value(self, vtype: GGUFValueType, key: str, depth: int) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(f"the value of '{printable(key)}'")
        if vtype == GGUFValueType.ARRAY:
            return self.array(key, depth + 1)
        return self.scalar(vtype, f"the value of '{printable(key)}'")

    def array(self, key: str, depth: int) -> list[Any]:
        at = self.pos
        name = f"'{printable(key)}'"
        if depth > MAX_ARRAY_DEPTH:
            raise self.damaged(f"{name} nests arrays more than {MAX_ARRAY_DEPTH} deep", at)
        itype = self.value_type(f"the element type of {name}")
        n = self.u64(f"the length of {name}")
        min_item = {GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}.get(itype) or struct.calcsize(_SCALARS[itype][0])
        if n * min_item > self.left():
            raise self.damaged(f"array {name} claims {n} items, more than the {self.left()} bytes left "
                               f"in {self.room()} can hold", at)
        if n > self.items_left:
            raise self.damaged(f"array {name} claims {n} items; all arrays together may hold "
                               f"at most {MAX_ARRAY_ITEMS}", at)
        self.items_left -= n
        if itype in _SCALARS:
            raw = self.take(n * min_item, f"the items of {name}")
            items = np.frombuffer(raw, dtype=np.dtype(self.order + _SCALARS[itype][1]))
            return (items != 0).tolist() if itype == GGUFValueType.BOOL else items.tolist()
        if itype == GGUFValueType.STRING:
            return self.strings(n, name)
        return [self.array(key, depth + 1) for _ in range(n)]

    def strings(self, n: int, name: str) -> list[str]:
        """`string()` n times, inlined: vocabularies hold hundreds of thousands of short strings."""
        unpack, read = struct.Struct(self.order + "Q").unpack, self.fh.read
        out: list[str] = []
        for i in range(n):
            at, left = self.pos, self.end - self.pos
            raw = read(8) if left >= 8 else b""
            if len(raw) != 8:
                raise self.damaged(f"the file ends inside item {i} of {name} (truncated at {self.size} bytes)", at)
            (length,) = unpack(raw)
            if length > left - 8 or length > MAX_STRING_BYTES:
                raise self.damaged(f"item {i} of {name} claims {length} bytes, more than the {left - 8} left "
                                   f"in {self.room()}", at)
            data = read(length)
            if len(data) != length:
                raise self.damaged(f"the file ends inside item {i} of {name} (it changed while being read)", at)
            self.pos += 8 + length
            out.append(data.decode("utf-8", errors="replace"))
        return out

    def alignment(self, metadata: dict[str, Any]) -> int:
        value = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if value <= 0 or value & (value - 1):
            raise self.damaged(f"general.alignment is {value}, not a power of two")
        return value

    def tensor_info(self, index: int) -> tuple[int, TensorInfo]:
        """Where the entry starts, and the tensor with its offset still relative to the data section."""
        at = self.pos
        name = self.string(f"the name of tensor {index}", MAX_NAME_BYTES)
        shown = f"tensor '{printable(name)}'"
        n_dims = self.u32(f"the number of dimensions of {shown}")
        if n_dims > GGML_MAX_DIMS:  # 0 is a scalar, which llama.cpp accepts
            raise self.damaged(f"{shown} has {n_dims} dimensions; GGUF allows at most {GGML_MAX_DIMS}", at)
        shape = tuple(self.u64(f"the shape of {shown}") for _ in range(n_dims))
        # Zero is refused too: llama.cpp divides by each dimension when it checks the shape.
        if any(d < 1 or d > INT64_MAX for d in shape):
            raise self.damaged(f"{shown} has shape {list(shape)}; every dimension must be at least 1", at)
        n_elements = math.prod(shape)
        if n_elements > INT64_MAX:
            raise self.damaged(f"{shown} has shape {list(shape)}, whose element count overflows 64 bits", at)
        raw_type = self.u32(f"the type of {shown}")
        try:
            qtype = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise self.damaged(f"{shown} has type {raw_type}, not a ggml type this reader knows", at) from None
        row = shape[0] if shape else 1
        if row % block:
            raise self.damaged(f"{shown} of type {qtype.name} has rows of {row} values, "
                               f"not a multiple of its block size {block}", at)
        nbytes = n_elements // block * type_size
        offset = self.u64(f"the data offset of {shown}")
        return at, TensorInfo(name, shape, qtype, offset, nbytes)

    def place(self, entries: list[tuple[int, TensorInfo]], data_offset: int, alignment: int) -> list[TensorInfo]:
        """Check that every tensor's data is aligned, inside the file, and overlaps no other's."""
        tensors: list[TensorInfo] = []
        names: set[str] = set()
        for at, tensor in entries:
            shown = f"tensor '{printable(tensor.name)}'"
            if tensor.name in names:
                raise self.damaged(f"{shown} appears twice", at)
            names.add(tensor.name)
            if tensor.offset % alignment:
                raise self.damaged(f"{shown} has data offset {tensor.offset}, not a multiple of the alignment "
                                   f"{alignment}", at)
            start, end = data_offset + tensor.offset, data_offset + tensor.offset + tensor.nbytes
            if end > self.size:
                raise self.damaged(f"{shown} needs bytes {start}..{end}, past the end of the "
                                   f"{human_bytes(self.size)} file ({self.size} bytes): the file is truncated "
                                   "or its tensor table is damaged", at)
            tensors.append(replace(tensor, offset=start))
        previous: TensorInfo | None = None
        for tensor in sorted(tensors, key=lambda t: t.offset):
            if previous is not None and tensor.offset < previous.offset + previous.nbytes:
                raise self.damaged(f"the data of tensor '{printable(tensor.name)}' overlaps that of "
                                   f"'{printable(previous.name)}'", tensor.offset)
            previous = tensor
        return tensors
